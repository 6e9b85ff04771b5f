"""The objective a search maximizes, from the single-concept evaluation's groups.

    ablation     = 1 - target concept rate after      (toy world: the attribute probe;
                                                       models without a probe: CLIP accuracy)
    preservation = mean over the anchor and neighbour groups of min(1, rate_after / rate_before)
                   (without a probe: min(1, clip_score_after / clip_score_before))
    kid          = mean over the same groups of max(0, KID(before, after)) on CLIP image features
    objective    = ablation * preservation - kid_weight * kid

With an attack in the search (`TuneSettings.attack_steps`, on by default in robust mode), the
ablation part is 1 - max(target rate, attacked rate), where the attacked rate is the concept's rate
under a short concept inversion against the trial's model: a setting that removes the word but
lets an inverted token bring the concept back scores no better than one that keeps it.

Ablation and preservation multiply, so neither can be traded away for the other: removing the
concept by wrecking the model scores ~0, and keeping everything including the concept scores ~0.
"""
from __future__ import annotations


def objective_parts(metrics: dict, kid_weight: float = 1.0, attacked_rate: float | None = None) -> dict:
    """The objective and its parts (module docstring), from evaluation metrics (and the concept's
    rate under the trial's attack, when the search has one)."""
    t = metrics["target"]
    probe = "concept_rate_after" in t
    rate = (lambda m, w: m[f"concept_rate_{w}"]) if probe else (lambda m, w: m[f"clip_accuracy_{w}"])
    ablation = 1.0 - max(rate(t, "after"), 0.0 if attacked_rate is None else attacked_rate)
    keeps, kids, parts = [], [], {}
    for name, m in metrics.items():
        if not isinstance(m, dict) or not (name == "anchor" or name.startswith("neighbours.")):
            continue
        before, after = (m["concept_rate_before"], m["concept_rate_after"]) if probe else \
            (m["clip_score_before"], m["clip_score_after"])
        keep = 1.0 if before <= 0 else min(1.0, after / before)
        parts[f"keep/{name}"] = keep
        keeps.append(keep)
        if m.get("kid") is not None:
            kids.append(max(0.0, float(m["kid"])))
    preservation = sum(keeps) / len(keeps) if keeps else 1.0
    kid = sum(kids) / len(kids) if kids else 0.0
    out = {"objective": ablation * preservation - kid_weight * kid, "ablation": ablation,
           "preservation": preservation, "kid": kid, "target_rate_before": rate(t, "before"),
           "target_rate_after": rate(t, "after")}
    if attacked_rate is not None:
        out["attacked_rate"] = attacked_rate
    if "paraphrases" in metrics:
        out["paraphrase_leakage"] = rate(metrics["paraphrases"], "after")
    out.update(parts)
    return out
