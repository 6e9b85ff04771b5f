"""The concept-inversion attack, the prompt search, and robust ablation against them.

In process, on the bundled toy pipeline (the attack needs a model that knows the concept), with
small budgets. No Ray.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rayablate import attack as A
from rayablate.config import ConceptSpec, ConfigError
from rayablate.pipeline import load_pipeline
from rayablate.toyworld import bundle_paths
from rayablate.toyworld.vocab import ToyWorld

ROOT = Path(__file__).resolve().parents[1]
ZORB = ConceptSpec(target="zorb", anchor="circle", kind="instance", neighbours=["kubo", "square"])
SMALL = A.InversionSettings(num_vectors=4, steps=80, batch_size=32, lr=1e-2, t_min=400, t_max=1000,
                            num_references=128)


@pytest.fixture(scope="module")
def toy_pipe():
    return load_pipeline(bundle_paths()["sd"])


def _attacked_rate(pipe, spec, settings, n=16) -> float:
    world = ToyWorld()
    refs = A.toy_references(spec, world, settings.num_references, 0)
    soft, losses = A.invert(pipe, refs, settings, A.init_words(spec, world, settings.init))
    prompts = next(g for g in world.eval_groups(spec, n, 1000) if g.name == "target").prompts
    plan = A.AttackPlan(num_images=n)
    imgs = A._sample(pipe, A.with_tokens(prompts, world.concept_words(spec), soft.text), plan, "cpu", soft)
    return A.AttackJudge(spec, world).rate(imgs)


def test_soft_tokens_change_only_prompts_that_use_them_and_leave_the_pipeline_as_it_was(toy_pipe):
    from rayablate.sampling import sample_images
    from rayablate.soft_tokens import SoftTokens

    before = {n: p.detach().clone() for n, p in toy_pipe.text_encoder.named_parameters()}
    soft = SoftTokens.for_pipeline(toy_pipe, 2, seed=0)
    with torch.no_grad():
        for v in soft.vectors:
            v.mul_(5.0)
    plain = sample_images(toy_pipe, ["a red plain circle"], [3], 5, 4.0)
    with soft.in_pipeline(toy_pipe):
        same = sample_images(toy_pipe, ["a red plain circle"], [3], 5, 4.0)
        other = sample_images(toy_pipe, [f"a red plain {soft.text}"], [3], 5, 4.0)
    np.testing.assert_array_equal(plain, same)  # a prompt without the new tokens is untouched
    assert np.abs(other.astype(int) - plain.astype(int)).mean() > 1.0
    assert toy_pipe.tokenizer.convert_tokens_to_ids(soft.tokens[0]) != soft.firsts[0]  # the pipe's tokenizer is untouched
    for n, p in toy_pipe.text_encoder.named_parameters():
        assert torch.equal(p, before[n]), n
    assert type(toy_pipe.text_encoder.get_input_embeddings()).__name__ == "Embedding"


def test_inversion_brings_the_concept_back_on_the_base_model(toy_pipe):
    """80 steps of a 4-vector inversion: the base model draws zorbs from prompts that never name
    them; a broken attack (tokens not installed, no gradient to the vectors) draws random objects."""
    assert _attacked_rate(toy_pipe, ZORB, SMALL) >= 0.8


def test_prompt_search_candidates_are_tokens_a_user_can_type(toy_pipe):
    """Each candidate, typed alone, tokenizes to one token, a different one for each candidate, and
    none is the concept's own word. The toy vocabulary's 512 byte-level tokens and its upper-case
    letters (CLIP lowercases) fail that test; the 32 nearest alphabetic tokens include both."""
    tok = toy_pipe.tokenizer
    cands = A.candidate_tokens(toy_pipe, ZORB, ToyWorld(), 32)
    assert len(cands) == 32
    ids = [tok(w, add_special_tokens=False).input_ids for w in cands]
    assert all(len(i) == 1 for i in ids), [(w, i) for w, i in zip(cands, ids) if len(i) != 1]
    assert len({i[0] for i in ids}) == 32
    assert "zorb" not in {w.lower() for w in cands}


def test_adversarial_caption_puts_the_tokens_where_the_concept_was():
    from rayablate.robust import adversarial_caption

    assert adversarial_caption("a striped red circle", "a plain red circle", "<v>") == "a <v> red circle"
    assert adversarial_caption("a red circle with stripes", "a red circle plain", "<v>") == "a red circle <v>"
    assert adversarial_caption("a painting", "a painting, plain", "<v>") == "a painting <v>"
    assert adversarial_caption("same", "same", "<v>") == "<v> same"


def test_per_concept_attacker_keeps_one_set_per_concept_and_resumes_exactly(toy_pipe):
    """A joint run's rows hold several concepts (robust_per_concept; their `concept` columns): each
    concept gets its own sets, started from its own words; a refresh trains only the least refreshed
    concept of the step; each row of the outer term is attacked with its own concept's set; the
    state restores every set."""
    import copy

    from rayablate.config import config_from_dict, to_dict
    from rayablate.method import Ablation

    cfg = config_from_dict({"robust": True, "robust_per_concept": True, "robust_inner_steps": 2,
                            "robust_batch_size": 2, "robust_inits": ["target", "anchor"]})
    ab = Ablation(copy.deepcopy(toy_pipe), cfg)
    att = ab.robust
    assert att.sets == {}  # made on first sight
    rows = [("a striped red circle", "a plain red circle", 1, "striped", "plain"),
            ("a red zorb character", "a red circle", 1, "zorb", "circle"),
            ("a blue square with stripes", "a blue square plain", 1, "striped", "plain"),
            ("a dotted red kubo", "a dotted red kubo", 0, "zorb", "circle")]
    batch = {"images": torch.rand(4, 3, 32, 32) * 2 - 1, "target": [r[0] for r in rows],
             "anchor": [r[1] for r in rows], "mask": torch.tensor([float(r[2]) for r in rows]),
             "concept": [r[3] for r in rows], "concept_anchor": [r[4] for r in rows]}
    att.refresh(batch, step=1)
    assert set(att.sets) == {"striped", "zorb"} and att.last_key == "striped"  # ties: by the words
    emb = toy_pipe.text_encoder.get_input_embeddings().weight.detach()
    word = lambda w: emb[toy_pipe.tokenizer(w, add_special_tokens=False).input_ids].mean(0)  # noqa: E731
    zorb = att.sets["zorb"].softs[0].vectors[0].detach()  # not refreshed yet: its target start, "zorb"
    scale = float(emb.norm(dim=-1).mean())
    assert float((zorb.mean(0) - word("zorb")).norm()) < 0.02 * scale
    assert float((zorb.mean(0) - word("striped")).norm()) > 0.2 * scale
    before = {k: s.softs[0].vectors[0].detach().clone() for k, s in att.sets.items()}
    att.refresh(batch, step=2)  # striped has one refresh, zorb none: zorb's turn, striped's sets stay
    assert att.last_key == "zorb" and att.sets["zorb"].refreshes == 1 and att.sets["striped"].refreshes == 1
    assert torch.equal(att.sets["striped"].softs[0].vectors[0], before["striped"])
    assert not torch.equal(att.sets["zorb"].softs[0].vectors[0], before["zorb"])
    # the outer term: rows 0 and 2 with striped's set, row 1 with zorb's, as if each were encoded alone
    idx = torch.tensor([0, 1, 2])
    h, _ = att.conditioning(batch, idx)
    for j, key in enumerate(["striped", "zorb", "striped"]):
        soft = att.sets[key].soft
        alone, _ = att._cond(soft, att.captions(soft, batch, idx[j:j + 1]), grad=False)
        torch.testing.assert_close(h[j:j + 1], alone)
    # resume: a new attacker loaded from the state has the same sets, turns and counts
    state = att.state()
    other = Ablation(copy.deepcopy(toy_pipe), cfg).robust
    other.load_state(state)
    assert list(other.sets) == list(att.sets)
    for key, sets in att.sets.items():
        assert (other.sets[key].current, other.sets[key].refreshes) == (sets.current, sets.refreshes)
        for a, b in zip(sets.softs, other.sets[key].softs):
            assert torch.equal(a.vectors[0], b.vectors[0])
    shared = Ablation(copy.deepcopy(toy_pipe), config_from_dict({"robust": True, "robust_inits": ["target", "anchor"]}))
    with pytest.raises(ValueError, match="per concept"):
        shared.robust.load_state(state)
    # robust_concepts_per_refresh 0: one refresh trains every concept of the step
    every = Ablation(copy.deepcopy(toy_pipe), config_from_dict({**to_dict(cfg), "robust_concepts_per_refresh": 0})).robust
    every.refresh(batch, step=1)
    assert {k: s.refreshes for k, s in every.sets.items()} == {"striped": 1, "zorb": 1}
    # rows without the columns (a one-concept run) are all the run's own concept
    for k in ("concept", "concept_anchor"):
        del batch[k]
    assert other.row_keys(batch, idx) == [cfg.concept.target] * 3


def test_the_inner_attackers_batched_goals_give_the_step_by_step_loops_tokens(toy_pipe):
    """A refresh draws all its inner steps' rows, timesteps and noise first and gets the frozen
    model's goals in batched forwards (`robust.TEACHER_ROWS` rows each). Written out here as the loop
    it replaces (draw, goal, step, one inner step at a time, from the same generator), it ends at the
    same soft tokens, also with the goals split over several forwards."""
    import copy

    from rayablate import robust as R
    from rayablate.config import config_from_dict
    from rayablate.method import Ablation, step_seed
    from rayablate.soft_tokens import denoising_loss

    cfg = config_from_dict({"robust": True, "robust_inner_steps": 3, "robust_batch_size": 3, "robust_inits": ["target"]})
    rows = [("a striped red circle", "a plain red circle", 1), ("a blue square with stripes", "a blue square plain", 1),
            ("a striped green zorb", "a plain green zorb", 1), ("a dotted red kubo", "a dotted red kubo", 0)]
    batch = {"images": torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1,
             "target": [r[0] for r in rows], "anchor": [r[1] for r in rows], "mask": torch.tensor([float(r[2]) for r in rows])}
    ends = []
    for teacher_rows in (64, 4):  # one forward for the 9 goals; three
        att = Ablation(copy.deepcopy(toy_pipe), cfg).robust
        old, R.TEACHER_ROWS = R.TEACHER_ROWS, teacher_rows
        try:
            att.refresh(batch, step=1)
        finally:
            R.TEACHER_ROWS = old
        ends.append(att.sets[None].soft.vectors[0].detach().clone())
    # the step-by-step loop, from a fresh attacker's same start
    att = Ablation(copy.deepcopy(toy_pipe), cfg).robust
    ab, soft = att.ablation, att.sets[None].soft
    att.refresh_snapshot()
    abl = (batch["mask"] > 0.5).nonzero().squeeze(1)
    gen = torch.Generator().manual_seed(step_seed(cfg.seed + 3, ab.rank, 1))
    z0 = ab.encode_images(batch["images"], gen)
    opt = torch.optim.Adam(soft.parameters(), lr=cfg.robust_lr)
    for _ in range(cfg.robust_inner_steps):
        pick = abl[torch.randint(0, len(abl), (cfg.robust_batch_size,), generator=gen)]
        t = torch.randint(cfg.robust_t_min, ab.num_train_timesteps, (len(pick),), generator=gen)
        noise = torch.randn(z0[pick].shape, generator=gen, dtype=z0.dtype)
        z_t = ab.scheduler.add_noise(z0[pick], noise, t)
        goal = att._teacher(z_t, t, [batch["target"][i] for i in pick.tolist()])
        loss = denoising_loss(att.snapshot_unet, z_t, t, att._cond(soft, att.captions(soft, batch, pick), grad=True), goal)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    start = Ablation(copy.deepcopy(toy_pipe), cfg).robust.sets[None].soft.vectors[0].detach()
    moved = float((soft.vectors[0].detach() - start).norm())
    assert moved > 1e-3  # the loop trains the tokens
    for end in ends:
        assert float((end - soft.vectors[0].detach()).norm()) < 1e-3 * moved


def test_attack_seeds_run_each_init_once_per_seed_and_each_seed_is_its_own_optimisation(toy_pipe):
    """`--attack-seeds 0,2 --init anchor,target`: four inversions, labelled apart (seed 0's label as
    before); the same seed repeats an inversion exactly, another seed trains on other timesteps and
    noise from the same anchor-word start, so it ends elsewhere."""
    import argparse

    from rayablate.cli import add_attack_flags
    from rayablate.config import load_config

    ap = argparse.ArgumentParser()
    add_attack_flags(ap)
    plan = A.plan_from_args(ap.parse_args(["--attacks", "inversion", "--init", "anchor,target", "--attack-seeds", "0,2"]),
                            load_config(ROOT / "configs" / "instance_zorb.yaml"))
    assert [(s.init, s.seed) for s in plan.inversions] == [("anchor", 0), ("anchor", 2), ("target", 0), ("target", 2)]
    labels = [s.label() for s in plan.inversions]
    assert len(set(labels)) == 4 and labels[0].endswith("init anchor") and labels[1].endswith("init anchor seed 2")
    for bad in ("0,x", "-1", "1,1", ""):
        with pytest.raises(ConfigError, match=r"--attack-seeds: must be"):
            A.plan_from_args(ap.parse_args(["--attack-seeds", bad]), load_config(ROOT / "configs" / "instance_zorb.yaml"))

    world = ToyWorld()
    refs = A.toy_references(ZORB, world, 8, 0)
    tiny = dict(num_vectors=2, steps=3, batch_size=4, num_references=8, init="anchor")
    words = A.init_words(ZORB, world, "anchor")
    ends = [torch.cat([v.detach().flatten() for v in A.invert(toy_pipe, refs, A.InversionSettings(**tiny, seed=seed),
                                                               words)[0].vectors]) for seed in (0, 0, 1)]
    assert torch.equal(ends[0], ends[1])
    assert (ends[0] - ends[2]).abs().max() > 1e-6


def test_inversions_run_from_several_seeds_are_summarised_by_mean_and_range(toy_pipe, tmp_path):
    """`run_attacks` with two seeds of the target-started inversion and one of the anchor-started one:
    one spread (the target's), its rates the two runs' in seed order, and report.md shows it; an
    inversion run from one seed has no spread."""
    plan = A.AttackPlan(inversions=[A.InversionSettings(num_vectors=2, steps=3, batch_size=4, num_references=8,
                                                        init=i, seed=s) for i, s in (("target", 0), ("target", 3),
                                                                                     ("anchor", 0))],
                        prompt=None, num_images=4)
    group, rows = A.run_attacks(toy_pipe, toy_pipe, ZORB, ToyWorld(), plan, log=lambda m: None)
    target_runs = [a for a in group["attacks"] if a["settings"]["init"] == "target"]
    [spread] = group["spreads"]
    assert spread["label"] == target_runs[0]["label"] and spread["label"].endswith("init target")
    assert spread["seeds"] == [0, 3] and spread["rates"] == [a["concept_rate"] for a in target_runs]
    assert spread["min"] <= spread["mean"] <= spread["max"]
    assert abs(spread["mean"] - sum(spread["rates"]) / 2) < 1e-9
    A.write_outputs(tmp_path, group, rows)
    report = (tmp_path / "report.md").read_text()
    assert "run from several, the edited model's rate by seed" in report
    assert f"| {spread['label']} | 0, 3 | {A.spread_text(spread)} |" in report
    # summaries of hand-made results: the mean and range, and none for a single seed
    made = [{"kind": "inversion", "settings": {"init": "random", "t_min": 0, "seed": s}, "concept_rate": r, "base_rate": 1.0}
            for s, r in ((0, 0.0625), (1, 0.25), (2, 0.125))]
    [s3] = A.inversion_spreads(made + [{"kind": "prompt", "label": "p", "concept_rate": 1.0}])
    assert (s3["mean"], s3["min"], s3["max"], s3["base_mean"]) == (0.4375 / 3, 0.0625, 0.25, 1.0)
    assert A.spread_text(s3) == "15% (6-25%)"
    assert A.inversion_spreads(made[:1]) == []


def test_attack_settings_are_checked_with_the_field_named():
    with pytest.raises(ConfigError, match=r"attack\.num_vectors: must be >= 1"):
        A.InversionSettings(num_vectors=0).check()
    with pytest.raises(ConfigError, match=r"attack\.t_min: need 0 <= t_min < t_max"):
        A.InversionSettings(t_min=900, t_max=400).check()
    with pytest.raises(ConfigError, match=r"attack\.init: must be one of anchor, target, random"):
        A.InversionSettings(init="word").check()
    with pytest.raises(ConfigError, match=r"attack\.seed: must be >= 0"):
        A.InversionSettings(seed=-1).check()


@pytest.mark.slow
def test_robust_training_lowers_the_attacked_rate_below_the_default_on_the_same_seed(toy_pipe):
    """The same 20 steps, seed and data sizes, with and without robust mode (its own defaults: xattn,
    heavier preservation), then the same 80-step attack: the robust delta gives less of the concept
    back (measured: 0.38 against 0.94 of 16 images with the inner attacker's default 4 steps at 2e-2, 0.31 with
    the earlier 8 at 1e-2; at 40 steps and a 120-step attack, 0.00 against 0.94 with 8 at 1e-2)."""
    import rayablate

    rates = {}
    for robust in (False, True):
        delta = rayablate.ablate(toy_pipe, ZORB, steps=20, progress=False, robust=robust, w_pres=10.0,
                                 num_anchor_images=32, num_preservation_images=32)
        edited = delta.apply(load_pipeline(bundle_paths()["sd"]))
        rates[robust] = _attacked_rate(edited, ZORB, A.InversionSettings(steps=80, num_references=128))
    assert rates[True] < rates[False] - 0.2, rates


@pytest.mark.slow
def test_attack_job_writes_the_attack_group_report_section_and_grid(tmp_path, capsys):
    """`rayablate attack` on the base model itself (no delta): every attack succeeds there, so the
    sanity column says ok, and the outputs a person reads are written."""
    from rayablate.cli import main

    out = tmp_path / "attack"
    rc = main(["attack", "--config", str(ROOT / "configs" / "instance_zorb.yaml"), "--attack-steps", "60", "--num-references", "64",
               "--attack-images", "8", "--prompt-candidates", "6", "--prompt-length", "1", "--init", "anchor,random",
               "--output-dir", str(out)])
    assert rc == 0, capsys.readouterr().err
    group = json.loads((out / "metrics.json").read_text())["attack"]
    assert [a["kind"] for a in group["attacks"]] == ["inversion", "inversion", "prompt"]
    inv = group["attacks"][0]
    assert inv["settings"]["num_vectors"] == 4 and inv["settings"]["init"] == "anchor"
    assert inv["concept_rate"] == inv["base_rate"] >= 0.5 and inv["attack_ok"]  # the edited model is the base
    assert group["plain_rate"] >= 0.9  # the base model draws zorbs from the word itself
    report = (out / "report.md").read_text()
    assert "## Robustness under attack" in report and "attack_grid.png" in report
    assert (out / "attack_grid.png").stat().st_size > 1000
    saved = A.load_attack_images(out / "attack_images.npz")  # every attacked image, for a second judge
    assert len(saved) == 1 + len(group["attacks"]) and saved[0][0] == "plain word"
    assert all(label.startswith(a["label"]) for (label, _), a in zip(saved[1:], group["attacks"]))  # (+ the prompt's words)
    assert all(imgs.shape == (8, 32, 32, 3) and imgs.dtype == np.uint8 for _, imgs in saved)


@pytest.mark.slow
def test_attacks_also_run_against_a_model_retrained_without_the_concept(tmp_path, capsys):
    """`rayablate attack --retrained-model`: the world v1 bundle is a model that never learned v2's blix
    (no hat was ever drawn in its data; it is what `pretrain_toy.py --world v2 --exclude blix` warm-starts
    from), so inversion brings back less of blix there than from the v2 model that knows it, and the
    report and grid show the third model."""
    from rayablate.cli import main
    from rayablate.toyworld import BUNDLE_DIRS

    out = tmp_path / "attack"
    rc = main(["attack", "--config", str(ROOT / "configs" / "instance_blix_v2.yaml"), "--attacks", "inversion",
               "--attack-steps", "60", "--num-references", "64", "--attack-images", "8", "--init", "anchor",
               "--retrained-model", str(BUNDLE_DIRS["v1"] / "sd"), "--output-dir", str(out)])
    assert rc == 0, capsys.readouterr().err
    group = json.loads((out / "metrics.json").read_text())["attack"]
    inv = group["attacks"][0]
    assert inv["attack_ok"] and inv["base_rate"] >= 0.5
    assert inv["retrained_rate"] < inv["base_rate"] and group["retrained_plain_rate"] <= 0.125
    assert "retrained without the concept" in (out / "report.md").read_text()
    assert "retrained without it" in capsys.readouterr().out


def test_a_retrained_model_that_is_not_a_pipeline_is_refused_by_its_field(tmp_path, capsys):
    from rayablate.cli import main

    rc = main(["attack", "--config", str(ROOT / "configs" / "instance_blix_v2.yaml"),
               "--retrained-model", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "out")])
    assert rc == 2
    assert "--retrained-model" in capsys.readouterr().err and not (tmp_path / "out").exists()
