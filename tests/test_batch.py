"""Batch ablation: validation of the batch file, failure isolation, resumption, merged and joint models.

One Ray instance (2 CPUs) for the module; every concept run is 2 steps of the tiny random pipeline.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from local_ray import start_local_ray
from rayablate.job import shutdown_ray

from rayablate.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]

TINY = {"steps": 2, "num_workers": 1, "batch_size": 4, "num_anchor_images": 8, "anchor_steps": 2,
        "eval_images": 4, "eval_steps": 2, "report_every": 1, "checkpoint_every": 2, "w_adv": 0.0}


def _batch(**settings):
    return {
        "batch": {"max_concurrent": 2, "evaluate_sum": False, "joint_overrides": {"steps": 2}, "joint_compositions": 1,
                  **settings},
        "defaults": dict(TINY),
        "concepts": [
            {"concept": {"target": "striped", "anchor": "plain", "kind": "style", "neighbours": ["dotted", "zorb"]}},
            {"concept": {"target": "zorb", "anchor": "circle", "kind": "instance", "neighbours": ["square"]},
             "w_pres": 10.0},
            # deliberately broken: passes the schema, but its prompt file does not exist
            {"concept": {"target": "Van Gogh", "anchor": "painting", "kind": "style",
                         "prompt_file": "/definitely/not/here/prompts.txt"}},
        ],
    }


# --- the batch file (no Ray) ---------------------------------------------------------------------

def test_batch_file_errors_name_the_concept_and_field():
    from rayablate.batch import batch_from_dict

    data = _batch()
    data["concepts"][2]["concept"]["anchor"] = "Van Gogh"
    with pytest.raises(ConfigError) as e:
        batch_from_dict(data)
    assert e.value.field == "concepts[2].concept.anchor"
    data = _batch()
    data["concepts"][1]["lr_matcher"] = -1.0
    with pytest.raises(ConfigError, match=r"^concepts\[1\]\.lr_matcher"):
        batch_from_dict(data)
    data = _batch()
    data["defaults"]["stepz"] = 3
    with pytest.raises(ConfigError, match=r"^defaults\.stepz: unknown key"):
        batch_from_dict(data)
    data = _batch()
    data["concepts"][1]["concept"]["anchor"] = "striped"  # an anchor another concept removes
    with pytest.raises(ConfigError, match=r"concepts\[1\]\.concept\.anchor.*target of concepts\[0\]"):
        batch_from_dict(data)
    data = _batch(max_concurrent=0)
    with pytest.raises(ConfigError, match=r"^batch\.max_concurrent"):
        batch_from_dict(data)
    data = _batch(joint_overrides={"steps": 0})  # the joint run's config is checked before anything runs
    with pytest.raises(ConfigError, match=r"^batch\.joint_overrides\.steps"):
        batch_from_dict(data)
    data = _batch(joint_compositions=-1)
    with pytest.raises(ConfigError, match=r"^batch\.joint_compositions: expected an integer >= 0"):
        batch_from_dict(data)
    data = _batch(check_min_kept=95)  # a rate, not a percentage
    with pytest.raises(ConfigError, match=r"^batch\.check_min_kept: expected a rate between 0 and 1"):
        batch_from_dict(data)
    data = _batch()
    data["concepts"].append({"concept": {"target": "striped", "anchor": "plain"}, "seed": 3})
    with pytest.raises(ConfigError, match=r"^concepts\[3\]\.concept\.target: 'striped' is already"):
        batch_from_dict(data)


def test_the_batch_check_uses_the_batch_files_bar_and_names_the_batch_model():
    from rayablate.batch.report import acceptance, batch_model

    def row(name, variants):
        return {"name": name, "status": "succeeded", "variants": {
            v: {"target_after": t, "neighbours": {"kubo": {"kept": k}}} for v, (t, k) in variants.items()}}

    rows = [row("zorb", {"merged": (0.12, 0.62), "joint": (0.06, 1.0)}),
            row("vell", {"merged": (0.0, 1.0), "joint": (0.0, 0.94)})]
    loose = {v: acceptance(rows, v) for v in ("merged", "joint")}
    strict = {v: acceptance(rows, v, 0.05, 0.95) for v in ("merged", "joint")}
    assert [loose[v]["passed"] for v in ("merged", "joint")] == [False, True]
    assert strict["joint"]["failures"] == ["zorb: target 0.06", "vell: neighbour kubo kept 0.94"]
    m = batch_model({"output_dir": "/o", "acceptance": loose})
    assert (m["variant"], m["passed"], m["delta"]) == ("joint", True, "/o/joint/matcher_delta.safetensors")
    # neither passes: two misses each (merged twice on zorb, joint once on each concept), so the joint;
    # with more misses the joint loses to the merged model
    m = batch_model({"output_dir": "/o", "acceptance": strict})
    assert (m["variant"], m["passed"], m["misses"]) == ("joint", False, 2)
    strict["joint"]["failures"] += ["x", "y"]
    assert batch_model({"output_dir": "/o", "acceptance": strict})["variant"] == "merged"
    # both pass: the joint model, unless a concept is robust (the merge adds robust deltas as trained)
    both = {v: acceptance(rows, v, 0.2, 0.5) for v in ("merged", "joint")}
    assert all(a["passed"] for a in both.values())
    assert batch_model({"output_dir": "/o", "acceptance": both, "concepts": rows})["variant"] == "joint"
    rows[1]["robust"] = True
    m = batch_model({"output_dir": "/o", "acceptance": both, "concepts": rows})
    assert (m["variant"], m["delta"]) == ("merged", "/o/merged/merged_delta.safetensors")
    # ... and only on a tie: a merged model that misses is not the batch's model
    assert batch_model({"output_dir": "/o", "acceptance": loose, "concepts": rows})["variant"] == "joint"


def test_defaults_overrides_and_neighbours_that_the_batch_removes():
    from rayablate.batch import batch_from_dict

    b = batch_from_dict(_batch(), overrides={"eval_images": 3})
    striped, zorb, gogh = b.concepts
    assert [c.name for c in b.concepts] == ["striped", "zorb", "van-gogh"]
    assert zorb.cfg.w_pres == 10.0 and striped.cfg.w_pres == 1.0 and striped.cfg.steps == 2
    assert all(c.cfg.eval_images == 3 for c in b.concepts)
    # zorb is removed by the batch: it cannot be one of striped's neighbours in the merged model
    assert striped.cfg.concept.neighbours == ["dotted"] and striped.dropped_neighbours == ["zorb"]


def test_the_joint_run_takes_the_command_lines_overrides_and_a_robust_concepts_attacker():
    from rayablate.batch import batch_from_dict, joint_config

    spec = _batch()
    b = batch_from_dict(spec, overrides={"model": "/elsewhere/sd", "eval_images": 3})
    j = joint_config(b, ["striped", "zorb"])
    # the command line's --model reaches the joint run as it reaches every concept's
    assert j.model == "/elsewhere/sd" and j.eval_images == 3 and not j.robust and j.param_group == "xattn-kv"
    assert j.steps == 2  # joint_overrides.steps

    # one robust concept makes the joint model robust, with that concept's attacker
    spec["concepts"][1].update(robust=True, w_robust=5.0, robust_inits=["target"])
    b = batch_from_dict(spec)
    assert not b.concepts[0].cfg.robust and b.concepts[1].cfg.robust
    j = joint_config(b, ["striped", "zorb"])
    assert j.robust and j.w_robust == 5.0 and j.robust_inits == ["target"]
    assert j.robust_per_concept and not b.concepts[1].cfg.robust_per_concept  # the joint run's rows hold both
    assert j.param_group == "xattn" and j.w_uncond == 30.0  # robust mode's defaults, as for a robust concept
    assert not joint_config(b, ["striped", "van-gogh"]).robust  # neither of these is robust

    # joint_overrides decides where it says so
    spec["batch"]["joint_overrides"] = {"steps": 2, "robust": False}
    j = joint_config(batch_from_dict(spec), ["striped", "zorb"])
    assert not j.robust and not j.robust_per_concept
    spec["batch"]["joint_overrides"] = {"steps": 2, "robust_per_concept": False}
    j = joint_config(batch_from_dict(spec), ["striped", "zorb"])
    assert j.robust and not j.robust_per_concept


def test_a_concepts_when_robust_applies_to_it_when_robust_below_the_command_line():
    from rayablate.batch import batch_from_dict, joint_config

    spec = _batch()
    spec["defaults"]["when_robust"] = {"w_pres": 7.0}
    spec["concepts"][1].update(robust=True, when_robust={"num_preservation_images": 96})
    b = batch_from_dict(spec)
    striped, zorb, _ = b.concepts
    assert (zorb.cfg.num_preservation_images, zorb.cfg.w_pres) == (96, 7.0)  # its own and the defaults'
    assert not striped.cfg.robust and striped.cfg.w_pres == 1.0  # not robust: the defaults' when_robust stays out
    assert batch_from_dict(spec, overrides={"num_preservation_images": 8}).concepts[1].cfg.num_preservation_images == 8
    # the robust joint run takes the defaults' when_robust too, and still the steps its own rule gives
    j = joint_config(b, ["striped", "zorb"])
    assert j.robust and j.w_pres == 7.0 and j.steps == 2


def test_joint_rows_of_a_toy_concept_name_no_other_target_of_the_batch():
    from rayablate.batch.merge import names_any
    from rayablate.config import config_from_dict
    from rayablate.data import prompt_rows
    from rayablate.toyworld.vocab import ToyWorld

    world = ToyWorld(world="v2")
    cfg = config_from_dict({"concept": {"target": "wavy", "anchor": "plain", "kind": "style", "neighbours": ["gridded"]},
                            "num_anchor_images": 64, "num_preservation_images": 64})
    others = ["tafi", "zorb", "striped", "dotted"]
    words = [world.concept_words(config_from_dict({"concept": {"target": t, "anchor": "x"}}).concept) for t in others]
    alone, joint = prompt_rows(cfg, world), prompt_rows(cfg, world, exclude=others)
    assert len(joint) == len(alone) == 128
    assert any(names_any(r["target_caption"], words) for r in alone)  # the separate run's rows name them
    assert not any(names_any(r["target_caption"], words) or names_any(r["anchor_caption"], words) for r in joint)
    # still wavy's rows: every ablation candidate names wavy and anchors it to plain; neighbours first
    wavy = [world.concept_words(cfg.concept)]
    assert all(names_any(r["target_caption"], wavy) and "plain" in r["anchor_caption"] for r in joint[:64])
    assert sum("gridded" in r["target_caption"] for r in joint[64:96]) == 32
    # a world that cannot steer its captions ignores `exclude` (the joint run re-anchors its rows)
    real = config_from_dict({"concept": {"target": "Van Gogh", "anchor": "painting",
                                         "templates": ["a {} house", "a {} dog"]}})
    from rayablate.worlds import PromptWorld

    assert prompt_rows(real, PromptWorld(), exclude=["dog"]) == prompt_rows(real, PromptWorld())


def test_a_separate_runs_rows_are_reused_only_if_made_from_the_same_prompt_rows(tmp_path):
    from rayablate.batch.run import _made_from
    from rayablate.config import config_from_dict, save_config
    from rayablate.data import prompt_rows
    from rayablate.toyworld.vocab import ToyWorld

    world = ToyWorld(world="v2")
    spec = {"target": "zorb", "anchor": "circle", "kind": "instance"}
    made = config_from_dict({"concept": dict(spec, neighbours=["kubo", "quen", "lorx", "nax"])})
    wanted = config_from_dict({"concept": dict(spec, neighbours=["kubo", "quen", "zeph", "vell"])})
    save_config(made, tmp_path / "config.yaml")
    assert _made_from(tmp_path / "config.yaml", prompt_rows(made, world), world)
    # linked from a batch where zeph and vell were removed: its rows protect neither
    assert not _made_from(tmp_path / "config.yaml", prompt_rows(wanted, world), world)
    assert not _made_from(tmp_path / "none.yaml", prompt_rows(made, world), world)


def test_composition_rows_are_the_first_ablation_rows_that_name_another_target():
    from rayablate.batch.run import _anchor_every_target, composition_rows
    from rayablate.config import config_from_dict
    from rayablate.data import prompt_rows
    from rayablate.toyworld.vocab import ToyWorld

    world = ToyWorld(world="v2")
    specs = [config_from_dict({"concept": c}).concept for c in (
        {"target": "zeph", "anchor": "diamond", "kind": "instance", "neighbours": ["kubo"]},
        {"target": "checkered", "anchor": "plain", "kind": "style"}, {"target": "wavy", "anchor": "plain", "kind": "style"})]
    words = [world.concept_words(s) for s in specs]
    cfg = config_from_dict({"concept": {"target": "zeph", "anchor": "diamond", "kind": "instance",
                                        "neighbours": ["kubo"]}, "num_anchor_images": 64})
    rows = [dict(r, mask=int(r["target_caption"] != r["anchor_caption"])) for r in prompt_rows(cfg, world)]
    picked = composition_rows(list(reversed(rows)), words[1:], 5)
    assert len(picked) == 5 and [r["seed"] for r in picked] == sorted(r["seed"] for r in picked)
    assert all(r["mask"] and "zeph" in r["target_caption"] for r in picked)
    assert all(any(w in r["target_caption"] for w in ("checkered", "checks", "wavy", "waves")) for r in picked), picked
    # re-anchored for the joint run, the composition goes to the plain shape: both targets removed
    anchored = [_anchor_every_target(r, world, specs, words)["anchor_caption"] for r in picked]
    assert all("diamond" in a and "plain" in a and "checkered" not in a and "wavy" not in a for a in anchored), anchored
    assert composition_rows(rows, words[1:], 0) == [] and composition_rows(rows, [], 5) == []


def test_counterpart_rows_swap_each_removed_character_for_its_kept_neighbours_and_keep_them():
    """A composition of two removed concepts gets, per kept neighbour of its removed character, the
    same caption with that neighbour; re-anchored for the joint run it loses the removed style only."""
    from rayablate.batch.run import _anchor_every_target, counterpart_rows
    from rayablate.config import config_from_dict
    from rayablate.toyworld.vocab import ToyWorld

    world = ToyWorld(world="v2")
    specs = [config_from_dict({"concept": c}).concept for c in (
        {"target": "tafi", "anchor": "square", "kind": "instance"}, {"target": "barred", "anchor": "plain", "kind": "style"})]
    words = [world.concept_words(s) for s in specs]
    row = {"target_caption": "a barred yellow tafi", "anchor_caption": "a barred yellow square",
           "anchor_if_ablated": "a barred yellow square", "mask": 1, "seed": 7, "image": b"png"}
    got = counterpart_rows([row], {"tafi": ["kubo", "plon"], "zorb": ["quen"]})
    assert [r["target_caption"] for r in got] == ["a barred yellow kubo", "a barred yellow plon"]
    assert all(r["mask"] == 1 and r["image"] == b"png" and r["seed"] == 7 for r in got)
    anchored = [_anchor_every_target(r, world, specs, words)["anchor_caption"] for r in got]
    assert anchored == ["a plain yellow kubo", "a plain yellow plon"], anchored
    # a word inside another word is not a character: "tafis" stays, and no swap, no row
    assert counterpart_rows([dict(row, target_caption="two barred tafis")], {"tafi": ["kubo"]}) == []
    assert counterpart_rows([row], {}) == []


def test_an_exclusion_no_caption_can_escape_is_given_up_not_looped_on():
    from rayablate.toyworld import world as W

    v2 = W.by_name("v2")
    # "striped zorb" and "zorb" in one batch: every caption of the composition names zorb
    got = [lab for _, lab in v2.iter_prompts_naming("striped zorb", 4, 0, exclude=["zorb", "dotted"])]
    assert len(got) == 4 and all(lab.object == "zorb" and lab.pattern == "striped" for lab in got)
    # every object excluded but the target's: anything but zorb is still drawn, and never zorb
    objects = [o for o in v2.objects if o != "zorb"]
    got = [lab for _, lab in v2.iter_prompts_not_naming("zorb", 4, 0, exclude=objects)]
    assert len(got) == 4 and all(lab.object != "zorb" for lab in got)
    # a satisfiable exclusion is kept
    assert all(lab.colour != "red" for _, lab in v2.iter_prompts_not_naming("zorb", 20, 0, exclude=["red"]))


def test_joint_rows_anchor_every_target_their_anchor_caption_still_names():
    from rayablate.batch.run import _anchor_every_target
    from rayablate.config import ConceptSpec
    from rayablate.toyworld.vocab import ToyWorld

    world = ToyWorld(world="v2")
    specs = [ConceptSpec(target="blix", anchor="circle", kind="instance", neighbours=[]),
             ConceptSpec(target="barred", anchor="plain", kind="style", neighbours=[])]
    words = [world.concept_words(s) for s in specs]
    # blix's row keeps "barred" in its anchor caption: the joint matcher would learn to keep barred
    row = {"target_caption": "a barred yellow blix", "anchor_caption": "a barred yellow circle", "mask": 1,
           "anchor_if_ablated": "a barred yellow circle"}
    fixed = _anchor_every_target(row, world, specs, words)
    assert fixed["anchor_caption"] == fixed["anchor_if_ablated"] == "a plain yellow circle"
    assert fixed["target_caption"] == "a barred yellow blix" and row["anchor_caption"] == "a barred yellow circle"
    # a caption naming no batch target, and a preservation row's own caption, stay as they are
    kept = {"target_caption": "a dotted red kubo", "anchor_caption": "a dotted red kubo", "mask": 0,
            "anchor_if_ablated": "a dotted red circle"}
    assert _anchor_every_target(kept, world, specs, words) == kept
    # a preservation row naming another batch target would keep what that target removes: it
    # becomes an ablation row to the anchored caption, which still keeps the concept it was for
    pres = {"target_caption": "a barred red kubo", "anchor_caption": "a barred red kubo", "mask": 0,
            "anchor_if_ablated": "a barred red circle"}
    conv = _anchor_every_target(pres, world, specs, words)
    assert conv["mask"] == 1 and conv["anchor_caption"] == "a plain red kubo"
    assert conv["target_caption"] == "a barred red kubo"


def test_bad_batch_file_exits_2_and_writes_nothing(tmp_path):
    import yaml

    data = _batch()
    data["concepts"][2]["concept"]["kind"] = "painter"
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(data))
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run([sys.executable, "jobs/batch_ablate.py", str(tmp_path / "b.yaml"), "--output-dir",
                        str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "error: concepts[2].concept.kind" in r.stderr
    assert not (tmp_path / "out").exists()


# --- runs on Ray --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_session():
    ray = start_local_ray(300)
    yield ray
    shutdown_ray()


@pytest.fixture(scope="module")
def models(tiny_sd_path, tiny_clip_path):
    from rayablate.job import Models
    from rayablate.toyworld import bundle_paths
    from rayablate.toyworld.vocab import ToyWorld

    return Models(str(tiny_sd_path), str(tiny_clip_path), ToyWorld(str(bundle_paths()["probe"])))


@pytest.fixture(scope="module")
def first_run(ray_session, models, tmp_path_factory):
    from rayablate.batch import batch_from_dict, run_batch

    out = tmp_path_factory.mktemp("batch")
    lines = []
    t = time.time()
    summary = run_batch(batch_from_dict(_batch()), out, models, progress=lines.append)
    return {"out": out, "summary": summary, "lines": lines, "seconds": time.time() - t}


def _snapshot(out: Path) -> dict:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*")
            if p.is_file() and "van-gogh" not in str(p) and p.name not in ("summary.json", "summary.md", "batch.json")}


@pytest.mark.slow
def test_a_broken_concept_fails_alone_and_the_others_finish(first_run):
    out, s = first_run["out"], first_run["summary"]
    rows = {r["name"]: r for r in s["concepts"]}
    assert rows["van-gogh"]["status"] == "failed"
    assert "prompt file does not exist" in rows["van-gogh"]["error"]
    assert rows["striped"]["status"] == rows["zorb"]["status"] == "succeeded"
    for n in ("striped", "zorb"):
        d = out / "concepts" / n
        assert (d / "matcher_delta.safetensors").exists() and (d / "metrics.json").exists()
        assert json.loads((d / "status.json").read_text())["status"] == "succeeded"
        # the merged and joint models are evaluated on every succeeded concept
        for v in ("separate", "merged", "joint"):
            row = rows[n]["variants"][v]
            assert row["target_before"] is not None and row["target_after"] is not None
            assert row["paraphrase_after"] is not None
        assert set(rows[n]["variants"]["merged"]["neighbours"]) == set(
            {"striped": ["dotted"], "zorb": ["square"]}[n])
    assert "van-gogh" not in json.loads((out / "merged" / "merge.json").read_text())["concepts"]
    assert json.loads((out / "joint" / "status.json").read_text())["status"] == "succeeded"
    # the joint run's rows were made for it: its captions name no other target (each separate run's
    # do), but for `joint_compositions` (1) ablation row of each concept's own that names both,
    # re-anchored to neither
    import pyarrow.parquet as pq

    def both(path):
        rows = pq.read_table(str(path), columns=["target_caption", "anchor_caption", "mask"]).to_pylist()
        return [r for r in rows if "zorb" in r["target_caption"]
                and any(w in r["target_caption"] for w in ("striped", "stripes"))]

    assert len(both(out / "concepts" / "striped" / "data")) >= 1
    comps = both(out / "joint" / "rows")
    assert 1 <= len(comps) <= 2, comps
    assert all(r["mask"] == 1 and "zorb" not in r["anchor_caption"] and "stripe" not in r["anchor_caption"]
               for r in comps), comps
    md = (out / "summary.md").read_text()
    assert "van-gogh" in md and "failed" in md and "left out: zorb" in md
    # both good concepts were in flight at once
    started = [i for i, l in enumerate(first_run["lines"]) if ": started" in l]
    first_done = next(i for i, l in enumerate(first_run["lines"]) if "succeeded in" in l or "failed in" in l)
    assert sum(1 for i in started if i < first_done) == 2


@pytest.mark.slow
def test_a_second_run_redoes_nothing_that_finished(first_run, models):
    from rayablate.batch import batch_from_dict, run_batch

    out = first_run["out"]
    before = _snapshot(out)
    lines = []
    t = time.time()
    s = run_batch(batch_from_dict(_batch()), out, models, progress=lines.append)
    took = time.time() - t
    assert _snapshot(out) == before  # no file of a finished stage was rewritten
    text = "\n".join(lines)
    for what in ("striped: already finished, skipped", "zorb: already finished, skipped",
                 "merge: already done, skipped", "joint: already trained, skipped",
                 "merged evaluation: already done, skipped", "joint evaluation: already done, skipped"):
        assert what in text, text
    rows = {r["name"]: r for r in s["concepts"]}
    assert rows["striped"]["skipped"] and rows["zorb"]["skipped"]
    assert rows["van-gogh"]["status"] == "failed"  # tried again: it had not finished
    assert took < first_run["seconds"] / 3, (took, first_run["seconds"])


@pytest.mark.slow
def test_a_changed_joint_config_trains_the_joint_model_again(first_run, models):
    from rayablate.batch import batch_from_dict, run_batch

    out = first_run["out"]
    delta = out / "joint" / "matcher_delta.safetensors"
    old = delta.read_bytes()
    lines = []
    # made robust: one inner attacker per concept, which reads each row's concept column
    robust = {"steps": 3, "robust": True, "robust_inner_steps": 1, "robust_batch_size": 2}
    run_batch(batch_from_dict(_batch(joint_overrides=robust)), out, models, progress=lines.append)
    text = "\n".join(lines)
    assert "joint: its config changed since it was trained; training again" in text, text
    assert "robust, one inner attacker per concept" in text, text
    import pyarrow.parquet as pq

    rows = pq.read_table(str(out / "joint" / "rows"), columns=["target_caption", "concept", "concept_anchor"]).to_pylist()
    assert {(r["concept"], r["concept_anchor"]) for r in rows} == {("striped", "plain"), ("zorb", "circle")}
    assert all(r["concept"] == "zorb" for r in rows if "zorb" in r["target_caption"] and "stripe" not in r["target_caption"])
    assert "striped: already finished, skipped" in text and "merge: already done, skipped" in text
    assert "joint evaluation: already done, skipped" not in text  # a new joint model is evaluated again
    assert json.loads((out / "joint" / "status.json").read_text())["steps"] == 3
    assert delta.read_bytes() != old
