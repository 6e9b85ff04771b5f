"""One robust-mode setting, in-process, measured the way benchmarks/robustness.py measures it.

    python benchmarks/robust_inprocess.py zorb                               # the robust defaults
    python benchmarks/robust_inprocess.py striped --set w_uncond=0 --set w_robust=1
    python benchmarks/robust_inprocess.py zorb --inits target,anchor,random

A faster loop for choosing robust-mode knobs than the full benchmark (no Ray, no default job, no
base-model sanity runs): `rayablate.ablate` with `robust: true` and the overrides, the job's
evaluation groups (32 images each: target, paraphrase, anchor and neighbours, kept = after/before),
then the strongest concept inversions (4 vectors, 600 steps at batch 32, lr 1e-2, t in [400, 1000);
the random start on t in [0, 1000)). Prints one JSON line and appends it to --results. The
numbers in docs/design.md's robust section (the attacker's starts, the unconditional term) came
from this loop.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
CONFIGS = {"striped": None, "zorb": ROOT / "configs" / "instance_zorb.yaml"}


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_overrides(ap: argparse.ArgumentParser, items: list[str]) -> dict:
    """--set FIELD=VALUE items as config overrides (JSON values, else strings); benchmarks/convergence.py
    takes its --set the same way."""
    over = {}
    for item in items:
        if "=" not in item:
            ap.error(f"--set wants FIELD=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        over[k] = parse_value(v)
    return over


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("concept", choices=sorted(CONFIGS))
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="a config override (JSON value), repeatable")
    ap.add_argument("--inits", default="target,anchor,random", help="inversions to run, by init")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", default="outputs/robust_inprocess.jsonl")
    args = ap.parse_args()
    over = parse_overrides(ap, args.set)

    import torch

    torch.set_num_threads(args.threads)
    import rayablate
    from rayablate.attack import AttackPlan, InversionSettings, run_attacks
    from rayablate.config import load_config
    from rayablate.pipeline import load_pipeline
    from rayablate.toyworld import bundle_paths
    from rayablate.toyworld.vocab import ToyWorld

    cfg = load_config(CONFIGS[args.concept], {"robust": True, **over})
    path = bundle_paths()["sd"]
    pipe = load_pipeline(path)
    t0 = time.time()
    delta = rayablate.ablate(pipe, cfg.concept, config=cfg, progress=False)
    res = {"concept": args.concept, "overrides": over, "train_s": round(time.time() - t0)}
    edited = load_pipeline(path)
    delta.apply(edited)
    rep = rayablate.evaluate(pipe, edited, cfg.concept, num_images=32, config=cfg)
    res.update(target=rep["target"]["concept_rate_after"], paraphrase=rep.get("paraphrases", {}).get("concept_rate_after"),
               kept={k: round(v["concept_rate_after"] / max(v["concept_rate_before"], 1e-9), 3) for k, v in rep.items()
                     if k == "anchor" or k.startswith("neighbours.")})
    print("[robust_inprocess] after ablation:", json.dumps(res), flush=True)
    strong = dict(num_vectors=4, steps=600, batch_size=32, lr=1e-2, t_min=400, t_max=1000)
    inversions = [InversionSettings(**({**strong, "t_min": 0} if i == "random" else strong), init=i)
                  for i in args.inits.split(",") if i]
    if inversions:
        plan = AttackPlan(inversions=inversions, prompt=None, num_images=32, seed=cfg.eval_seed)
        # base_pipe=edited: no base-model sanity runs here (benchmarks/robustness.py has them)
        group, _ = run_attacks(edited, edited, cfg.concept, ToyWorld(), plan, None, "cpu", lambda m: None)
        res["attacked"] = {a["settings"]["init"]: a["concept_rate"] for a in group["attacks"]}
    res["wall_s"] = round(time.time() - t0)
    print(json.dumps(res), flush=True)
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
