"""The batch's summary: one row per concept and variant, the acceptance check, summary.json / summary.md
and the console table."""
from __future__ import annotations

from pathlib import Path

from ..files import write_json, write_text
from ..report import fmt, markdown_table, pct, text_table
from .spec import VARIANTS, Batch


def _rate_key(m: dict) -> str:
    tgt = m.get("target", {})
    return "concept_rate" if tgt.get("concept_rate_before") is not None else "clip_accuracy"


def summarize_metrics(m: dict, key: str) -> dict:
    """Row of one concept under one variant: target before/after, anchor and neighbours kept, leakage.

    With a judge (key "concept_rate") a group is kept by its concept rate; without one, CLIP
    accuracy measures only the target's removal, so a group is kept by its CLIP score (as the Tune
    objective does): a neighbour CLIP never ranked as the target would otherwise count as lost."""
    keep_key = key if key == "concept_rate" else "clip_score"

    def get(group, when, k=key):
        v = m.get(group, {}).get(f"{k}_{when}")
        return None if v is None else float(v)

    def kept(group):
        b, a = get(group, "before", keep_key), get(group, "after", keep_key)
        return None if b is None or a is None or b <= 0 else a / b

    nbs = {g.split(".", 1)[1]: {"before": get(g, "before"), "after": get(g, "after"), "kept": kept(g)}
           for g in m if g.startswith("neighbours.")}
    ks = [v["kept"] for v in nbs.values() if v["kept"] is not None]
    return {"target_before": get("target", "before"), "target_after": get("target", "after"),
            "anchor_before": get("anchor", "before"), "anchor_after": get("anchor", "after"),
            "anchor_kept": kept("anchor"), "neighbours": nbs, "neighbours_kept_min": min(ks) if ks else None,
            "paraphrase_before": get("paraphrases", "before"), "paraphrase_after": get("paraphrases", "after")}


def acceptance(rows: list[dict], variant: str, max_target: float = 0.10, min_kept: float = 0.85) -> dict:
    ok = [r for r in rows if r["status"] == "succeeded"]
    vals = [r["variants"].get(variant) for r in ok]
    if not vals or any(v is None for v in vals):
        return {"checked": False, "passed": None, "why": "not every succeeded concept has this variant"}
    bad = []
    for r, v in zip(ok, vals):
        if v["target_after"] is None or v["target_after"] > max_target:
            bad.append(f"{r['name']}: target {v['target_after']}")
        for nb, x in v["neighbours"].items():
            if x["kept"] is None or x["kept"] < min_kept:
                bad.append(f"{r['name']}: neighbour {nb} kept {x['kept']}")
    return {"checked": True, "passed": not bad, "failures": bad, "max_target_rate": max_target,
            "min_neighbour_kept": min_kept, "concepts": len(ok), "failed_concepts_left_out": len(rows) - len(ok)}


# Where each single-model variant's delta lies, relative to the batch's output folder.
COMBINED_DELTAS = {"joint": "joint/matcher_delta.safetensors", "merged": "merged/merged_delta.safetensors"}


def batch_model(s: dict) -> dict | None:
    """The batch's one model with every concept removed: the joint or the merged model (never the
    naive sum, a baseline), the one whose check passes, else the one with fewer misses. On a tie the
    joint model (it is trained on every concept's rows, the merge only solves for each edit's
    captions), unless a concept is robust: the merge adds robust deltas as they were trained, while
    one robust run over every concept's rows holds less under attack (docs/measurements.md "Robust batches": under
    the target-started inversion the toy batch's joint model came back to 22 % / 22 % with one inner
    attacker per concept (38 % / 50 % with one shared), the merged model to 6 % / 22 %, the separate
    robust deltas to 6 % / 9 %)."""
    checked = {v: a for v, a in s["acceptance"].items() if v in COMBINED_DELTAS and a["checked"]}
    if not checked:
        return None
    first = "merged" if any(c.get("robust") for c in s.get("concepts", [])) else "joint"
    v = min(checked, key=lambda v: (not checked[v]["passed"], len(checked[v]["failures"]), v != first))
    return {"variant": v, "delta": str(Path(s["output_dir"]) / COMBINED_DELTAS[v]), "passed": checked[v]["passed"],
            "misses": len(checked[v]["failures"]), "robust_first": first == "merged"}


def model_line(m: dict) -> str:
    why = " (robust concepts: the merge keeps their deltas as trained)" if m.get("robust_first") \
        and m["variant"] == "merged" else ""
    return (f"one model with every concept removed: **{m['variant']}** ({m['delta']}), check "
            + ("PASS" if m["passed"] else f"MISS ({m['misses']} misses)") + why)


def write_summary(batch: Batch, out: Path, statuses: dict[str, dict], variants: dict[str, dict[str, dict]],
                  extra: dict) -> dict:
    rows = []
    key = None
    for c in batch.concepts:
        st = statuses.get(c.name, {"status": "not run"})
        row = {"name": c.name, "target": c.cfg.concept.target, "anchor": c.cfg.concept.anchor,
               "kind": c.cfg.concept.kind, "neighbours": list(c.cfg.concept.neighbours),
               "dropped_neighbours": c.dropped_neighbours, "robust": c.cfg.robust,
               "status": st.get("status"), "error": st.get("error"),
               "skipped": st.get("skipped", False), "wall_s": st.get("wall_s"), "variants": {}}
        for v, per in variants.items():
            m = per.get(c.name)
            if m:
                key = key or _rate_key(m)
                row["variants"][v] = summarize_metrics(m, key)
        rows.append(row)
    summary = {"batch": batch.source, "output_dir": str(out), "metric": key or "concept_rate",
               "variants": [v for v in VARIANTS if v in variants],
               "concepts": rows, **extra,
               "acceptance": {v: acceptance(rows, v, batch.settings.check_max_target, batch.settings.check_min_kept)
                              for v in VARIANTS if v in variants}}
    summary["model"] = batch_model(summary)
    write_json(out / "summary.json", summary)
    write_text(out / "summary.md", summary_markdown(summary))
    return summary


VARIANTS_NOTE = ("Variants: **separate** = each concept's own model; **merged** = one model, least-squares merge of "
                 "the separate deltas' cross-attention k/v weights; **sum** = naive sum of the deltas (baseline); "
                 "**joint** = one training run over all concepts' rows with one shared matcher.")


def _f(v) -> str:
    return fmt(v, 2)


def summary_markdown(s: dict) -> str:
    metric = {"concept_rate": "concept rate (attribute probe)", "clip_accuracy": "CLIP accuracy"}[s["metric"]]
    lines = ["# Batch ablation summary", "", f"batch file: `{s['batch']}`; metric: {metric}.", "", VARIANTS_NOTE, "",
             _variants_table(s), "", "## Neighbours (what must survive), per concept", ""]
    lines += _neighbour_lines(s)
    failed = [r for r in s["concepts"] if r["status"] != "succeeded"]
    if failed:
        lines += ["", "## Failed concepts", ""]
        lines += [f"- **{r['name']}**: {r['status']}: {(r['error'] or '').splitlines()[0] if r['error'] else ''}"
                  for r in failed]
    a = next(iter(s["acceptance"].values()), {})
    bar = (f"target rate ≤ {a['max_target_rate']:.2f}, every neighbour keeps ≥ {pct(a['min_neighbour_kept'])} "
           "of its before-rate" if a.get("checked") else "not checked")
    lines += ["", f"## Acceptance ({bar}; `batch.check_max_target`, `batch.check_min_kept`)", ""]
    lines += _acceptance_lines(s)
    if s.get("model"):
        lines += ["", "## The batch's model", "", model_line(s["model"])]
    if s.get("merge"):
        lines += _merge_lines(s["merge"])
    if s.get("joint"):
        j = s["joint"]
        lines += ["", "## Joint run", "", f"status {j.get('status')}, {j.get('steps', '–')} steps"
                  + (f", data {j['data']}" if j.get("data") else "")
                  + (f"; error: {j['error'].splitlines()[0]}" if j.get("error") else "")]
    if s.get("timing"):
        lines += ["", "## Wall time", "", ", ".join(f"{k} {v:.0f}s" for k, v in s["timing"].items())]
    return "\n".join(lines) + "\n"


def _variants_table(s: dict) -> str:
    vs = s["variants"]
    headers = ["concept", "status", "target before", *(f"target after ({v})" for v in vs),
               *(f"neighbours kept, min ({v})" for v in vs), *(f"anchor kept ({v})" for v in vs),
               "paraphrase before", *(f"paraphrase leakage ({v})" for v in vs)]
    rows = []
    for r in s["concepts"]:
        V = r["variants"]
        anyv = next(iter(V.values()), {})
        rows.append([f"{r['name']} ({r['target']} → {r['anchor']}, {r['kind']})", r["status"] or "–",
                     _f(anyv.get("target_before")), *(_f(V.get(v, {}).get("target_after")) for v in vs),
                     *(pct(V.get(v, {}).get("neighbours_kept_min")) for v in vs),
                     *(pct(V.get(v, {}).get("anchor_kept")) for v in vs), _f(anyv.get("paraphrase_before")),
                     *(_f(V.get(v, {}).get("paraphrase_after")) for v in vs)])
    return markdown_table(headers, rows)


def _neighbour_lines(s: dict) -> list[str]:
    lines = []
    for r in s["concepts"]:
        line = f"- **{r['name']}**: {', '.join(r['neighbours']) or '(none)'}"
        if r["dropped_neighbours"]:
            line += (f"; left out: {', '.join(r['dropped_neighbours'])} (another concept of the batch ablates "
                     "it, so it cannot survive the merged and joint models)")
        lines.append(line)
        for v in s["variants"]:
            nb = r["variants"].get(v, {}).get("neighbours", {})
            if nb:
                lines.append(f"  - {v}: " + ", ".join(
                    f"{k} {_f(x['before'])} → {_f(x['after'])} ({pct(x['kept'])} kept)" for k, x in nb.items()))
    return lines


def _acceptance_lines(s: dict) -> list[str]:
    lines = []
    for v, a in s["acceptance"].items():
        if not a["checked"]:
            lines.append(f"- {v}: not checked ({a['why']})")
        else:
            lines.append(f"- {v}: {'PASS' if a['passed'] else 'MISS'} over {a['concepts']} concept(s)"
                         + (f" ({a['failed_concepts_left_out']} failed concept(s) left out)"
                            if a["failed_concepts_left_out"] else "")
                         + ("" if a["passed"] else " — " + "; ".join(a["failures"])))
    return lines


def _merge_lines(m: dict) -> list[str]:
    lines = ["", "## Merge", "",
             f"{len(m.get('least_squares', []))} cross-attention k/v weights solved by least squares "
             f"(λ = {m.get('lambda')}, ridge {m.get('ridge')} towards the {m.get('prior')} prior); "
             f"{len(m.get('summed', []))} other tensors summed."]
    if m.get("relative_residual"):
        lines.append("Relative residual of each concept's own edit on its captions "
                     "(‖(W*−W_i)C_i‖² / ‖(W_i−W0)C_i‖²): "
                     + ", ".join(f"{k} {_f(v)}" for k, v in m["relative_residual"].items()))
    return lines


SHORT = {"separate": "sep", "merged": "merged", "sum": "sum", "joint": "joint"}


def console_table(s: dict) -> str:
    vs = s["variants"]
    # status reads left-aligned: padded here, as text_table right-aligns every column after the first
    headers = ["concept", f"{'status':<10}", "before", *(SHORT[v] for v in vs), "|",
               *(f"kept {SHORT[v][:3]}" for v in vs), "|", *(f"leak {SHORT[v][:3]}" for v in vs)]
    widths = [12, 10, 6, *[7] * len(vs), 2, *[9] * len(vs), 2, *[9] * len(vs)]
    rows = []
    for r in s["concepts"]:
        V = r["variants"]
        before = next(iter(V.values()), {}).get("target_before")
        rows.append([r["name"][:12], f"{(r['status'] or '–')[:10]:<10}", _f(before),
                     *(_f(V.get(v, {}).get("target_after")) for v in vs), "|",
                     *(pct(V.get(v, {}).get("neighbours_kept_min")) for v in vs), "|",
                     *(_f(V.get(v, {}).get("paraphrase_after")) for v in vs)])
    lines = [f"target rate after / neighbours kept (min) / paraphrase leakage  ({s['metric']})",
             text_table(headers, rows, widths)]
    for v, a in s["acceptance"].items():
        if a["checked"]:
            lines.append(f"acceptance ({v}): {'PASS' if a['passed'] else 'MISS'}"
                         + ("" if a["passed"] else f" ({len(a['failures'])} misses)"))
    return "\n".join(lines)
