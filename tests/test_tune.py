"""Ray Tune over ablation runs: the search space is checked, trials run Ray Train inside Tune, a failed
trial does not stop the others, and best_config.yaml is a config jobs/train.py accepts."""
import csv
import math
from pathlib import Path

import numpy as np
import pytest

from rayablate.config import AblationConfig, ConfigError, load_config
from rayablate.job import shutdown_ray
from rayablate.tune import (SEARCHABLE, TuneSettings, apply_params, default_space, load_space, objective_parts,
                            parse_flag, parse_param)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name,spec,field", [
    ("lr_unet", {"dist": "loguniform", "low": 1e-4, "high": 1e-2}, "space.lr_unet"),
    ("lr_matcher", {"dist": "loguniform", "low": 0.0, "high": 1e-2}, "space.lr_matcher.low"),
    ("lr_matcher", {"dist": "uniform", "low": 1e-2, "high": 1e-4}, "space.lr_matcher"),
    ("clip_threshold", {"dist": "uniform", "low": 0.5, "high": 1.5}, "space.clip_threshold"),
    ("margin", {"dist": "gaussian", "low": 0.0, "high": 1.0}, "space.margin.dist"),
    ("w_adv", {"dist": "choice", "values": []}, "space.w_adv.values"),
    ("w_con", {"dist": "choice", "values": [0.1, -1.0]}, "space.w_con"),
    ("w_reg", {"dist": "uniform", "low": 0.0, "hi": 1.0}, "space.w_reg.hi"),
    ("w_pres", "lots", "space.w_pres"),
])
def test_invalid_search_space_is_refused_naming_the_parameter(name, spec, field):
    with pytest.raises(ConfigError) as e:
        parse_param(name, spec)
    assert e.value.field == field
    assert field in str(e.value)


def test_space_from_yaml_and_flags(tmp_path):
    cfg = AblationConfig()
    f = tmp_path / "space.yaml"
    f.write_text("space:\n  w_adv: {dist: choice, values: [0, 0.02]}\n  w_reg: 0.5\n")
    space = load_space(cfg, f, ["lr_matcher=loguniform:1e-4:1e-2", "margin=grid:0.01,0.05"])
    assert set(space) == set(SEARCHABLE) - {"w_robust", "robust_lr"}  # those only with robust: true
    assert {"w_robust", "robust_lr"} <= set(load_space(AblationConfig(robust=True)))
    assert space["w_adv"].dist == "choice" and space["w_adv"].values == [0.0, 0.02]
    assert space["w_reg"].dist == "fixed" and space["w_reg"].values == [0.5]
    assert (space["lr_matcher"].low, space["lr_matcher"].high) == (1e-4, 1e-2)
    assert space["margin"].dist == "grid"
    assert set(load_space(cfg, None, [], ["lr_matcher", "w_pres"])) == {"lr_matcher", "w_pres"}
    with pytest.raises(ConfigError, match="space.steps"):
        load_space(cfg, None, [], ["steps"])
    with pytest.raises(ConfigError, match="space.lr_matcher"):
        parse_flag("lr_matcher=loguniform:1e-2")
    bad = tmp_path / "bad.yaml"
    bad.write_text("space: [1, 2\n")
    with pytest.raises(ConfigError, match="space"):
        load_space(cfg, bad)


def test_default_priors_are_centred_on_the_base_config():
    cfg = AblationConfig(lr_matcher=2e-3, clip_threshold=0.7)
    s = default_space(cfg)
    assert s["lr_matcher"].dist == "loguniform"
    assert math.isclose(math.sqrt(s["lr_matcher"].low * s["lr_matcher"].high), 2e-3)
    assert s["clip_threshold"].low == pytest.approx(0.6) and s["clip_threshold"].high == pytest.approx(0.8)
    c = apply_params(cfg, {"lr_matcher": 5e-4, "w_adv": 0.0})
    assert c.lr_matcher == 5e-4 and c.w_adv == 0.0 and c.concept == cfg.concept


def test_settings_refuse_bad_rungs_and_a_heldout_seed_equal_to_the_search_seed():
    cfg = AblationConfig(steps=10, eval_seed=5)
    assert TuneSettings().rung_steps(cfg) == [5, 10]
    with pytest.raises(ConfigError, match="rungs"):
        TuneSettings(rungs=[10, 5]).check(cfg)
    with pytest.raises(ConfigError, match="heldout_seed"):
        TuneSettings(heldout_seed=5).check(cfg)
    with pytest.raises(ConfigError, match="num_samples"):
        TuneSettings(num_samples=0).check(cfg)


def test_objective_multiplies_ablation_and_preservation_and_subtracts_kid():
    m = {"target": {"concept": "striped", "concept_rate_before": 0.9, "concept_rate_after": 0.1},
         "anchor": {"concept": "plain", "concept_rate_before": 1.0, "concept_rate_after": 1.0, "kid": -0.002},
         "neighbours.dotted": {"concept": "dotted", "concept_rate_before": 0.8, "concept_rate_after": 0.4,
                               "kid": 0.02},
         "paraphrases": {"concept": "striped", "concept_rate_before": 1.0, "concept_rate_after": 0.25},
         "wall_seconds": 3.0}
    p = objective_parts(m, kid_weight=1.0)
    assert p["ablation"] == pytest.approx(0.9)
    assert p["preservation"] == pytest.approx((1.0 + 0.5) / 2)
    assert p["kid"] == pytest.approx(0.01)  # negative KID estimates count as 0
    assert p["objective"] == pytest.approx(0.9 * 0.75 - 0.01)
    assert p["paraphrase_leakage"] == 0.25 and p["keep/neighbours.dotted"] == pytest.approx(0.5)
    # Without a probe (a real model): CLIP accuracy for the target, CLIP score ratios for preservation.
    real = {"target": {"clip_accuracy_before": 1.0, "clip_accuracy_after": 0.2},
            "anchor": {"clip_score_before": 0.30, "clip_score_after": 0.27, "kid": 0.0}}
    q = objective_parts(real)
    assert q["ablation"] == pytest.approx(0.8) and q["preservation"] == pytest.approx(0.9)
    # With the search's attack, ablation counts the worse of the plain word and the attacked rate.
    hit = objective_parts(m, kid_weight=1.0, attacked_rate=0.6)
    assert hit["ablation"] == pytest.approx(0.4) and hit["attacked_rate"] == 0.6
    assert hit["objective"] == pytest.approx(0.4 * 0.75 - 0.01)
    assert objective_parts(m, attacked_rate=0.05)["ablation"] == pytest.approx(0.9)  # the word is worse


def test_with_a_floor_only_the_attacked_rate_above_it_counts():
    """A retrained model's rate under the same attack is the floor: 0.6 attacked over a 0.5 floor is a
    leak of (0.6 - 0.5) / (1 - 0.5) = 0.2; at or under the floor nothing leaks; a floor of 1 (a concept
    the kept ones compose) leaves only the plain word; no floor is the raw rate, as before."""
    m = {"target": {"concept_rate_before": 1.0, "concept_rate_after": 0.1},
         "anchor": {"concept_rate_before": 1.0, "concept_rate_after": 1.0}}
    p = objective_parts(m, attacked_rate=0.6, floor_rate=0.5)
    assert p["attack_leak"] == pytest.approx(0.2) and p["ablation"] == pytest.approx(0.8)
    assert p["attacked_rate"] == 0.6 and p["floor_rate"] == 0.5
    assert objective_parts(m, attacked_rate=0.9, floor_rate=0.0)["ablation"] == pytest.approx(0.1)
    assert objective_parts(m, attacked_rate=0.3, floor_rate=0.5)["ablation"] == pytest.approx(0.9)  # the word
    assert objective_parts(m, attacked_rate=1.0, floor_rate=1.0)["ablation"] == pytest.approx(0.9)
    assert objective_parts(m, attacked_rate=0.6)["ablation"] == pytest.approx(0.4)


def test_settings_refuse_a_floor_without_an_attack_or_a_model(tmp_path):
    cfg = AblationConfig(steps=10)
    with pytest.raises(ConfigError, match="retrained_model.*none"):
        TuneSettings(retrained_model=str(tmp_path)).check(cfg)  # no attack in a plain search
    with pytest.raises(ConfigError, match="retrained_model"):
        TuneSettings(attack_steps=5, retrained_model=str(tmp_path / "nowhere")).check(cfg)
    for bad in ([], [1, 1], [-1]):
        with pytest.raises(ConfigError, match=r"attack_seeds: must be distinct integers >= 0"):
            TuneSettings(attack_steps=5, attack_seeds=bad).check(cfg)


@pytest.mark.slow
def test_the_trials_attack_measures_its_floor_on_the_retrained_model():
    """`--retrained-model`: the search's attack runs once on the base model and once on the model
    trained without the concept. The world v1 bundle never drew a hat, so the same inversion brings
    world v2's blix back from it less often than from v2 (the attack test's model pair); that rate
    becomes the floor every trial's objective reads (its summary and report name it). With two attack
    seeds the base model's rate and the floor are each the mean of the two runs (`--attack-seeds`)."""
    from rayablate.job import resolve_models
    from rayablate.toyworld import BUNDLE_DIRS
    from rayablate.tune.report import report_markdown
    from rayablate.tune.search import ATTACK_SUMMARY, _base_attack, _floor

    cfg = load_config(ROOT / "configs" / "instance_blix_v2.yaml")
    cfg.eval_steps = 10
    retrained = str(BUNDLE_DIRS["v1"] / "sd")
    settings = TuneSettings(attack_steps=60, trial_eval_images=8, retrained_model=retrained, attack_seeds=[0, 1])
    settings.check(cfg)
    attack = _base_attack(cfg, resolve_models(cfg), settings)
    assert attack["attack_ok"] and attack["floor_rate"] < attack["base_rate"]
    runs = {k: v for k, v in attack["base_cache"].items() if "inversion" in k}
    base = [v["rate"] for k, v in runs.items() if k[0] == "inversion"]
    floor = [v["rate"] for k, v in runs.items() if k[0] == "retrained"]
    assert len(base) == len(floor) == 2 and {k[-1] for k in runs} == {0, 1}  # each seed its own inversion
    assert attack["base_rate"] == pytest.approx(sum(base) / 2) and attack["floor_rate"] == pytest.approx(sum(floor) / 2)
    assert attack["label"].endswith("init target, mean over seeds 0, 1")
    assert _floor({"attack": attack}) == attack["floor_rate"] and attack["retrained_model"] == retrained
    summary = {"concept": "blix", "kid_weight": 1.0, "rungs": [2], "num_trials": 0, "failed_trials": 0,
               "attack": {k: attack[k] for k in ATTACK_SUMMARY}}
    assert f"brings it back in {attack['floor_rate']:.0%} of images" in report_markdown(summary, [], {})


@pytest.fixture(scope="module")
def search(tmp_path_factory, tiny_sd_path, tiny_clip_path):
    """One 2-trial search on the tiny pipeline through the CLI, as a user runs it (quiet console, Ray
    started by the job): lr_matcher on a grid whose second value diverges. Yields (out, summary, console)."""
    import contextlib
    import io
    import json

    import yaml

    from rayablate.cli import main

    base = tmp_path_factory.mktemp("tune")
    cfg = {"model": str(tiny_sd_path), "clip": str(tiny_clip_path),
           "concept": {"target": "striped", "anchor": "plain", "templates": ["a {} square", "a {} circle"],
                       "neighbours": ["dotted"]},
           "steps": 4, "batch_size": 4, "num_anchor_images": 8, "eval_images": 4, "eval_steps": 2, "anchor_steps": 2,
           "report_every": 2, "checkpoint_every": 2}
    (base / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = base / "out"
    console = io.StringIO()
    try:
        # a 3-step attack on every trial: the attacked rate's path through the trials and the report
        with contextlib.redirect_stdout(console):
            rc = main(["tune", "--config", str(base / "c.yaml"), "--num-samples", "1", "--trial-eval-images", "4",
                       "--rungs", "2,4", "--attack-steps", "3", "--attack-seeds", "0,1",
                       "--param", "lr_matcher=grid:1e-3,1e30",
                       "--param", "w_adv=0.0", "--search", "lr_matcher", "w_adv", "--output-dir", str(out)])
        assert rc == 0, console.getvalue()[-3000:]
        yield out, json.loads((out / "tune_summary.json").read_text()), console.getvalue()
    finally:
        shutdown_ray()


@pytest.mark.slow
def test_the_search_console_is_a_line_per_stage_and_trial_report(search):
    out, summary, console = search
    lines = [x for x in console.splitlines() if x.strip()]
    assert len(lines) <= 30, console
    reports = [x for x in lines if x.startswith("[tune]     trial ")]
    assert reports and len(reports) == len(set(reports)), console  # each report once, from the driver
    assert any("lr_matcher=0.001" in x and "at 4 steps: objective" in x for x in reports), console
    assert any("lr_matcher=1e+30" in x and "failed" in x for x in reports), console  # the diverging trial
    assert not any(k in x for x in lines for k in ("TrainingReport", "Trial status", "Configuration for experiment",
                                                   "RayTrainWorker", "logging_progress", "Warning")), console
    assert "[tune] 4/4 default vs best" in console and "logs/" in lines[-1]
    assert "[tune] 3/4 search" in (out / "logs" / "job.log").read_text()  # the console's lines, kept


@pytest.mark.slow
def test_a_failing_trial_does_not_stop_the_others(search):
    out, summary, _ = search
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert len(rows) == 2
    by_lr = {float(r["lr_matcher"]): r for r in rows}
    assert by_lr[1e-3]["status"] == "ok" and by_lr[1e-3]["steps"] == "4"
    assert by_lr[1e30]["status"] == "failed" and by_lr[1e30]["error"]
    assert summary["failed_trials"] == 1
    assert np.isfinite(float(by_lr[1e-3]["objective"]))
    attacked = float(by_lr[1e-3]["attacked_rate"])
    assert 0.0 <= attacked <= 1.0
    assert float(by_lr[1e-3]["ablation"]) <= 1.0 - attacked + 1e-9  # the attacked rate is in the objective
    assert summary["attack"]["label"].startswith("inversion 4v 3 steps") and summary["attack"]["num_images"] == 4
    assert summary["attack"]["label"].endswith("mean over seeds 0, 1")  # --attack-seeds reached the search


@pytest.mark.slow
def test_search_writes_a_best_config_that_loads(search):
    out, summary, _ = search
    cfg = load_config(out / "best_config.yaml")
    assert cfg.lr_matcher == 1e-3 and cfg.w_adv == 0.0 and cfg.steps == 4
    assert (out / "objective_vs_params.png").stat().st_size > 1000
    report = (out / "tune_report.md").read_text()
    assert "Default vs best" in report and "Every trial was attacked" in report
    assert not list(out.rglob("*.tmp"))
    final = summary["final"]["best"]
    assert summary["heldout_seed"] != summary["search_seed_eval"]
    assert (out / "final" / "best" / "metrics.json").exists() and 0.0 <= final["ablation"] <= 1.0
