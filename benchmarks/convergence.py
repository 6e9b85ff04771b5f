"""How many training steps the default ablation needs, from the base weights and from the closed-form edit.

    python benchmarks/convergence.py                       # both default concepts, both starts
    python benchmarks/convergence.py --concepts zorb --steps 0,20,40

For each concept (striped: the default config; zorb: configs/instance_zorb.yaml) and each start
(`init: base`, `init: closed-form`), the in-process core (`rayablate.api.ablate_rows`) trains on the
job's rows for each number of steps, and the job's evaluation groups are judged (the same prompts,
seeds and images per group as the job; the before-images are made once per concept). The rows per
step are the Ray job's (batch_size x num_workers: the job's two workers each train 8 rows), so a
step here is a step of the job. Steps 0 with init closed-form is the closed-form edit alone.

It prints one table per concept (target, held-out paraphrase and the lowest kept rate of the anchor
and neighbours, after / before) and marks each row that meets the default job's quality bar
(target <= 0.02, paraphrase <= 0.05, kept >= 0.97), and writes convergence.json under --output-dir.
The default `steps` and `init` in config.py come from this table.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from benchmarks.robust_inprocess import CONFIGS, parse_overrides  # noqa: E402

BAR = {"target": 0.02, "paraphrase": 0.05, "kept": 0.97}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concepts", default="striped,zorb", help="comma list of: " + ", ".join(CONFIGS))
    ap.add_argument("--inits", default="base,closed-form")
    ap.add_argument("--steps", default="0,10,20,30,50,100", help="comma list of step counts to train")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="a config override for every run (JSON value), repeatable")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output-dir", default="outputs/bench-convergence")
    args = ap.parse_args()
    steps_list = [int(s) for s in args.steps.split(",") if s]
    over = parse_overrides(ap, args.set)

    import torch

    torch.set_num_threads(args.threads)
    import rayablate
    from rayablate.api import ablate_rows, training_rows
    from rayablate.clip import ClipScorer
    from rayablate.config import load_config
    from rayablate.evaluation import sample_groups
    from rayablate.metrics import measure_groups
    from rayablate.pipeline import load_pipeline
    from rayablate.toyworld import bundle_paths
    from rayablate.worlds import world_for

    paths = bundle_paths()
    pipe = load_pipeline(str(paths["sd"]))
    world = world_for("", str(paths["probe"]))
    scorer = ClipScorer.load(str(paths["clip"]))
    results = []
    for name in [c for c in args.concepts.split(",") if c]:
        cfg = load_config(CONFIGS[name], over)
        groups = world.eval_groups(cfg.concept, cfg.eval_images, cfg.eval_seed)
        before = sample_groups(pipe, groups, cfg.eval_seed, cfg.eval_steps, cfg.guidance_scale)
        rows = training_rows(pipe, cfg, world, str(paths["clip"]), progress=False)
        print(f"[convergence] {name}: {len(rows['seed'])} rows, {int(rows['mask'].sum())} ablation rows", flush=True)
        for init in [i for i in args.inits.split(",") if i]:
            for steps in steps_list:
                if steps == 0 and init == "base":
                    continue
                run = dataclasses.replace(cfg, init=init, steps=steps, batch_size=cfg.batch_size * cfg.num_workers)
                t = time.time()
                if steps == 0:  # the closed-form edit alone
                    delta = rayablate.ablate(pipe, cfg.concept, config=cfg, world=world, method="closed-form")
                else:
                    delta = ablate_rows(pipe, run, rows, world, progress=False)
                train_s = time.time() - t
                edited = load_pipeline(str(paths["sd"]))
                delta.apply(edited)
                after = sample_groups(edited, groups, cfg.eval_seed, cfg.eval_steps, cfg.guidance_scale)
                rep = measure_groups(groups, {g.name: {"before": before[g.name], "after": after[g.name]} for g in groups},
                                     cfg.concept, scorer, world.judge(), world)
                kept = {k: v["concept_rate_after"] / max(v["concept_rate_before"], 1e-9) for k, v in rep.items()
                        if k == "anchor" or k.startswith("neighbours.")}
                res = {"concept": name, "overrides": over, "init": init, "steps": steps, "train_s": round(train_s, 1),
                       "target": rep["target"]["concept_rate_after"],
                       "paraphrase": rep.get("paraphrases", {}).get("concept_rate_after"),
                       "kept_min": min(kept.values()), "kept": kept}
                res["meets_bar"] = (res["target"] <= BAR["target"] and res["kept_min"] >= BAR["kept"]
                                    and (res["paraphrase"] is None or res["paraphrase"] <= BAR["paraphrase"]))
                results.append(res)
                print(json.dumps(res), flush=True)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "convergence.json").write_text(json.dumps(results, indent=1))
    for name in dict.fromkeys(r["concept"] for r in results):
        print(f"\n{name} (32 images a group; bar: target <= {BAR['target']}, paraphrase <= {BAR['paraphrase']}, "
              f"kept >= {BAR['kept']})")
        print("| init | steps | target | paraphrase | kept (min) | train s | meets bar |")
        print("|---|---|---|---|---|---|---|")
        for r in results:
            if r["concept"] == name:
                para = "–" if r["paraphrase"] is None else f"{r['paraphrase']:.2f}"
                print(f"| {r['init']} | {r['steps']} | {r['target']:.2f} | {para} | {r['kept_min']:.2f} | "
                      f"{r['train_s']} | {'yes' if r['meets_bar'] else 'no'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
