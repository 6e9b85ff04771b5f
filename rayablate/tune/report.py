"""What a search writes for people: trials.csv, objective_vs_params.png, tune_report.md and the
console table."""
from __future__ import annotations

import csv
import math
from pathlib import Path

from ..files import atomic
from ..report import fmt, markdown_table, text_table
from .space import Param

METRIC_COLUMNS = ("objective", "ablation", "preservation", "kid", "target_rate_after", "attacked_rate",
                  "attack_leak", "paraphrase_leakage", "loss")


def fmt_params(params: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def write_trials_csv(path: Path, trials: list[dict], space: dict[str, Param]) -> None:
    keep_cols = sorted({k for t in trials for k in t["keeps"]})
    cols = (["trial_id", "status", "is_default", "steps", "stopped_early"] + list(space) + list(METRIC_COLUMNS) +
            keep_cols + ["error"])
    with atomic(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for t in trials:
            row = {**t, **t["params"], **t["keeps"]}
            w.writerow(["" if row.get(c) is None else row.get(c) for c in cols])


def plot_objective(trials: list[dict], space: dict[str, Param], path: Path) -> None:
    """One panel per searched parameter: objective of each trial; the default and the best marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, p in space.items() if p.dist != "fixed"] or list(space)
    ok = [t for t in trials if t["status"] == "ok"]
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    best = max(ok, key=lambda t: t["objective"]) if ok else None
    for ax, n in zip(axes.flat, names):
        _panel(ax, n, ok, best, space[n].dist == "loguniform")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    fig.legend(uniq.values(), uniq.keys(), loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    with atomic(path, ".png") as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


def _panel(ax, n: str, ok: list[dict], best: dict | None, log_x: bool) -> None:
    import matplotlib.ticker

    xs = [t["params"][n] for t in ok]
    ys = [t["objective"] for t in ok]
    early = [t["stopped_early"] for t in ok]
    ax.scatter([x for x, e in zip(xs, early) if not e], [y for y, e in zip(ys, early) if not e], c="tab:blue",
               label="full run")
    ax.scatter([x for x, e in zip(xs, early) if e], [y for y, e in zip(ys, early) if e], c="tab:gray",
               marker="x", label="stopped early")
    for t in ok:
        if t["is_default"]:
            ax.scatter([t["params"][n]], [t["objective"]], s=120, facecolors="none", edgecolors="green",
                       label="default")
    if best is not None:
        ax.scatter([best["params"][n]], [best["objective"]], s=160, marker="*", c="tab:red", label="best")
    if log_x:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlapped
    ax.set_xlabel(n)
    ax.set_ylabel("objective")


FINAL_HEADERS = ["config", "objective", "ablation", "preservation", "KID", "target rate after", "attacked rate",
                 "paraphrase leakage"]


def report_markdown(summary: dict, trials: list[dict], space: dict[str, Param]) -> str:
    attack = summary.get("attack")
    lines = [f"# Tune: {summary['concept']}", "",
             "objective = ablation × preservation − kid_weight × KID (see `rayablate/tune/objective.py`); "
             f"kid_weight = {summary['kid_weight']}; rungs {summary['rungs']} steps; "
             f"{summary['num_trials']} trials, {summary['failed_trials']} failed.", ""]
    if attack:
        floor = attack.get("floor_rate")
        formula = ("1 − max(target rate, attacked rate)" if floor is None else
                   "1 − max(target rate, leak), leak = max(0, attacked rate − floor) / (1 − floor)")
        lines += [f"Every trial was attacked ({attack['label']}, {attack['num_images']} images); ablation = "
                  f"{formula}. On the base model the attack brings the concept back in {attack['base_rate']:.0%} "
                  f"of images{'' if attack['attack_ok'] else ' (the attack FAILED there)'}.", ""]
        if floor is not None:
            lines += [f"The floor: the same attack on `{attack['retrained_model']}`, a model trained without the "
                      f"concept, brings it back in {floor:.0%} of images; only a trial's attacked rate above that "
                      "counts" + (" (here none does: the kept concepts compose it)." if floor >= 1.0 else "."), ""]
    if summary.get("final"):
        rows = []
        for label, r in summary["final"].items():
            if "error" in r:
                rows.append([label, f"failed: {r['error']}"] + [""] * 6)
            else:
                label = f"{label} (= default)" if r.get("same_as_default") else label
                rows.append([label, r["objective"], r["ablation"], r["preservation"], fmt(r["kid"], 4),
                             r["target_rate_after"], r.get("attacked_rate"), r.get("paraphrase_leakage")])
        lines += [f"## Default vs best, on held-out evaluation seed {summary['heldout_seed']}", "",
                  markdown_table(FINAL_HEADERS, rows), ""]
    rows = []
    for t in trials:
        tag = " (default)" if t["is_default"] else ""
        status = t["status"] if t["status"] == "ok" else f"failed: {t['error'][:80]}"
        rows.append([f"{t['trial_id']}{tag}", status, t["steps"], *(fmt(t["params"][n], 4) for n in space),
                     t["objective"], t["ablation"], t["preservation"], fmt(t["kid"], 4), t.get("attacked_rate")])
    lines += ["## Trials (search seed)", "",
              markdown_table(["trial", "status", "steps", *space, "objective", "ablation", "preservation", "KID",
                              "attacked rate"], rows),
              "", "![objective vs parameters](objective_vs_params.png)", ""]
    return "\n".join(lines)


def console_table(summary: dict) -> str:
    lines = []
    if summary.get("final"):
        rows = [[label, f"failed: {r['error']}"] if "error" in r else
                [label, r["objective"], r["ablation"], r["preservation"], fmt(r["kid"], 4), r.get("attacked_rate"),
                 r.get("paraphrase_leakage")]
                for label, r in summary["final"].items()]
        table = text_table(["config", "objective", "ablation", "preserv.", "KID", "attacked", "leakage"], rows,
                           widths=[8, 9, 9, 9, 8, 8, 8]).splitlines()
        lines += [f"held-out seed {summary['heldout_seed']}:  {table[0]}"] + [f"{'':>22}{row}" for row in table[1:]]
    lines.append(f"wall time: {summary.get('wall_seconds', 0):.0f}s")
    return "\n".join(lines)
