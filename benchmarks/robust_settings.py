"""Robust mode's settings side by side: the same robust jobs with different knobs, then the same attacks.

    python benchmarks/robust_settings.py --settings "robust_inner_steps=8,robust_lr=0.01;robust_inner_steps=4,robust_lr=0.02" \\
        --concepts striped,zorb --seeds 0,1                  # how session 44 chose robust mode's inner attacker
    python benchmarks/robust_settings.py --settings "w_robust=1;w_robust=3" --concepts zorb --seeds 0
    python benchmarks/robust_settings.py --settings "robust_inner_steps=1" --steps 10 --quick   # a smoke run
    python benchmarks/robust_settings.py --settings "defaults;robust_vectors=16,steps=400" --concepts striped \\
        --num-vectors 16 --attack-steps 1800                 # against a 4x larger inversion (session 48)

For each concept (`benchmarks/robustness.py`'s: striped, zorb, blix_v2, zorb_v2, wavy_v2), each
setting (`;`-separated; each a `,`-separated list of `key=value` config fields, values read as YAML, or
`defaults`)
and each training seed, it runs the concept's robust job (`jobs/train.py --config <file> --no-resume
--robust --seed S` as `benchmarks/robustness.py` runs its jobs, the file being the concept's config with
`robust: true`, its `when_robust` fields and then the setting's written over it; a fresh process with its
own local Ray; one job at a time), then
attacks its delta with `benchmarks/robustness.py`'s inversions (4 vectors, 600 steps at batch 32,
lr 1e-2, from the anchor word and from the target word on t in [400, 1000), random on [0, 1000); one
inversion seed, `--attack-seed`; `--num-vectors` and `--attack-steps` for a larger attacker than
robust mode trains against), judged by the toy world's probe on `--images` images each. Each job's
attack outputs (report, grid, every attacked image) go to <job>/attack: `benchmarks/stripe_judge.py`
judges striped's images a second way.

Printed side by side, one row per job: the three inversions' attacked rates, the job's own target and
held-out paraphrase rates after, the lowest kept rate over its anchor and neighbours (its
evaluation, 32 images a group), its training stage and wall seconds; then per setting the mean and
the worst attacked rate over all its inversions, the mean and the worst of its jobs' lowest kept
rates, its mean training stage, and each setting's training stage as a ratio of the first setting's.
A single inversion of one job moves by an image (3 points at 32 images): compare settings over
several seeds and concepts, not one row.

Writes robust_settings.json and robust_settings.md into --output-dir (jobs under it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import robustness as R  # noqa: E402  (the concepts, the attack suite and the toy-world helpers)


def parse_settings(text: str) -> list[dict]:
    """"a=1,b=x;c=2e-2" -> [{"a": 1, "b": "x"}, {"c": 0.02}]; "defaults" is the config as it is."""
    import yaml

    out = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        setting = {}
        if part == "defaults":
            out.append(setting)
            continue
        for item in filter(None, (s.strip() for s in part.split(","))):
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise SystemExit(f"--settings: {item!r} is not key=value")
            v = yaml.safe_load(value)
            if isinstance(v, str):  # YAML reads "2e-2" (no dot) as a string
                try:
                    v = float(v)
                except ValueError:
                    pass
            setting[key.strip()] = v
        out.append(setting)
    if not out:
        raise SystemExit("--settings: no setting given")
    return out


def label(setting: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in setting.items()) or "defaults"


def job_config(name: str, setting: dict, steps: int | None, path: Path) -> Path:
    """The concept's config with robust on, its when_robust fields applied, then `setting` over them."""
    import yaml

    from rayablate.config import apply_when_robust, load_config

    src = R.CONCEPTS[name] or "configs/style_striped.yaml"
    data = yaml.safe_load((ROOT / src).read_text()) or {}
    data = apply_when_robust({**data, "robust": True})
    data.update(setting)
    if steps is not None:
        data["steps"] = steps
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    load_config(path)  # a bad key or value stops here, before any job runs
    return path


def attack(out: Path, inversions: list, images: int, cache: dict, bases: dict) -> list[dict]:
    """The job's delta under `inversions`; the attack's outputs (report, grid, every image) in out/attack."""
    from rayablate.attack import AttackPlan, run_attacks, write_outputs
    from rayablate.config import load_config
    from rayablate.pipeline import apply_delta, load_pipeline

    cfg = load_config(out / "config.yaml")
    world, sd = R.world_of(cfg)
    if sd not in bases:
        bases[sd] = load_pipeline(sd)
    pipe = load_pipeline(sd)
    apply_delta(pipe, str(out / "matcher_delta.safetensors"))
    plan = AttackPlan(inversions=inversions, prompt=None, num_images=images, seed=cfg.eval_seed)
    group, rows = run_attacks(pipe, bases[sd], cfg.concept, world, plan, None, "cpu", lambda m: None,
                              cache.setdefault(sd, {}))
    write_outputs(out / "attack", group, rows)
    return [{"init": a["settings"]["init"], "rate": a["concept_rate"], "base_rate": a["base_rate"]}
            for a in group["attacks"]]


def job_summary(out: Path) -> dict:
    m = json.loads((out / "metrics.json").read_text())
    groups = R.job_groups(m)
    kept = R.job_kept(groups)
    worst = min(kept, key=kept.get)
    return {"target": groups["target"]["concept_rate_after"],
            "paraphrase": groups.get("paraphrases", {}).get("concept_rate_after"),
            "kept_min": round(kept[worst], 3), "kept_group": worst, "training_s": m["stage_seconds"]["training"]}


def summary(rows: list[dict], settings: list[dict]) -> list[dict]:
    out = []
    for s in settings:
        mine = [r for r in rows if r["setting"] == s]
        rates = [a["rate"] for r in mine for a in r["attacks"]]
        out.append({"setting": s, "jobs": len(mine), "attacked_mean": sum(rates) / len(rates),
                    "attacked_worst": max(rates), "kept_mean": sum(r["kept_min"] for r in mine) / len(mine),
                    "kept_worst": min(r["kept_min"] for r in mine),
                    "training_s": sum(r["training_s"] for r in mine) / len(mine)})
    first = out[0]["training_s"]
    for o in out:
        o["training_ratio"] = o["training_s"] / first
    return out


def markdown(rows: list[dict], summ: list[dict]) -> str:
    pct = lambda v: "-" if v is None else f"{100 * v:.0f} %"  # noqa: E731
    lines = ["| concept | setting | seed | inversions (" + " / ".join(a["init"] for a in rows[0]["attacks"]) +
             ") | target, paraphrase | kept (min) | training | wall |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['concept']} | {label(r['setting'])} | {r['seed']} | "
                     + " / ".join(pct(a["rate"]) for a in r["attacks"])
                     + f" | {pct(r['target'])}, {pct(r['paraphrase'])} | {r['kept_min']:.2f} ({r['kept_group']}) | "
                     f"{r['training_s']:.0f} s | {r['wall_s']:.0f} s |")
    lines += ["", "| setting | jobs | attacked, mean | attacked, worst | kept (min), mean / worst | training (mean) "
                  "| training / first setting's |", "|---|---|---|---|---|---|---|"]
    for s in summ:
        lines.append(f"| {label(s['setting'])} | {s['jobs']} | {100 * s['attacked_mean']:.1f} % | {pct(s['attacked_worst'])} | "
                     f"{s['kept_mean']:.2f} / {s['kept_worst']:.2f} | {s['training_s']:.0f} s | **{s['training_ratio']:.2f}x** |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", required=True,
                    help="';'-separated settings, each ','-separated key=value config fields (e.g. "
                         "\"robust_inner_steps=8;robust_inner_steps=4\"); the first is the ratios' reference")
    ap.add_argument("--concepts", default="striped,zorb", help=f"comma-separated, of: {', '.join(R.CONCEPTS)}")
    ap.add_argument("--seeds", default="0", help="training seeds, comma-separated (each job's --seed)")
    ap.add_argument("--attack-seed", type=int, default=0, help="the inversions' seed")
    ap.add_argument("--images", type=int, default=32, help="images per attack")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the robust job's own)")
    ap.add_argument("--num-vectors", type=int, default=4,
                    help="new vectors per inversion (robust mode's inner attacker trains robust_vectors: 4)")
    ap.add_argument("--attack-steps", type=int, default=600, help="steps per inversion")
    ap.add_argument("--quick", action="store_true",
                    help="the short inversions of robustness.py --quick (a smoke run; ignores the two above)")
    ap.add_argument("--output-dir", default="outputs/robust_settings")
    args = ap.parse_args()
    names = [n for n in args.concepts.split(",") if n]
    unknown = [n for n in names if n not in R.CONCEPTS]
    if unknown:
        ap.error(f"--concepts: unknown {', '.join(unknown)}; known: {', '.join(R.CONCEPTS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        ap.error(f"--seeds: expected comma-separated integers, not {args.seeds!r}")
    settings = parse_settings(args.settings)
    from rayablate.config import ConfigError

    try:
        inversions = R.suite(args.quick, [args.attack_seed], args.num_vectors, args.attack_steps)[0]
        for inv in inversions:  # --num-vectors, --attack-steps: checked before any job runs
            inv.check()
    except ConfigError as e:
        ap.error(str(e))
    root = Path(args.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    plans = [(n, i, s) for n in names for i in range(len(settings)) for s in seeds]
    for n, i, _ in plans:  # every config checked before the first job
        try:
            job_config(n, settings[i], args.steps, root / f"{n}_setting{i}.yaml")
        except ConfigError as e:
            ap.error(f"--settings {label(settings[i])!r} on {n}: {e}")
    rows, cache, bases = [], {}, {}
    log = lambda msg: print(f"[robust_settings] {msg}", flush=True)  # noqa: E731
    import torch

    torch.set_num_threads(2)
    for k, (name, i, seed) in enumerate(plans, 1):
        out = root / f"{name}_setting{i}_seed{seed}"
        log(f"{k}/{len(plans)} {name}, {label(settings[i])}, seed {seed}: robust job")
        wall = R.run_job(str((root / f"{name}_setting{i}.yaml").resolve()), True, out, log, ["--seed", str(seed)])
        log(f"    {wall:.0f} s; attacking")
        rows.append({"concept": name, "setting": settings[i], "seed": seed, "wall_s": wall, **job_summary(out),
                     "attacks": attack(out, inversions, args.images, cache, bases)})
        (root / "robust_settings.json").write_text(json.dumps({"rows": rows}, indent=1))
    summ = summary(rows, settings)
    table = markdown(rows, summ)
    (root / "robust_settings.json").write_text(json.dumps({"rows": rows, "summary": summ}, indent=1))
    (root / "robust_settings.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
