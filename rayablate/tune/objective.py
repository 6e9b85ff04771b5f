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

With a floor as well (`TuneSettings.retrained_model`: a model trained without the concept, attacked
the same way once), only what the attack brings back *above* that floor counts, scaled so the base
model's full leak stays 1:

    leak     = max(0, attacked - floor) / (1 - floor)      (0 when floor = 1)
    ablation = 1 - max(target rate, leak)

A concept the kept concepts compose (toy world v2's blix: the retrained model gives it back in every
image) then no longer rewards settings that push the attacked rate below what retraining gives, which
in every measured case cost the parts (docs/measurements.md, "The floor"); a concept that cannot be
composed (wavy: floor 31-62 %) still counts most of its leak.

Ablation and preservation multiply, so neither can be traded away for the other: removing the
concept by wrecking the model scores ~0, and keeping everything including the concept scores ~0.
"""
from __future__ import annotations


def attack_leak(attacked_rate: float | None, floor_rate: float | None = None) -> float:
    """What the attack brought back that counts against the ablation (module docstring)."""
    if attacked_rate is None:
        return 0.0
    if floor_rate is None:
        return attacked_rate
    return 0.0 if floor_rate >= 1.0 else max(0.0, attacked_rate - floor_rate) / (1.0 - floor_rate)


def objective_parts(metrics: dict, kid_weight: float = 1.0, attacked_rate: float | None = None,
                    floor_rate: float | None = None) -> dict:
    """The objective and its parts (module docstring), from evaluation metrics (and the concept's
    rate under the trial's attack, when the search has one, and under the same attack on a model
    retrained without the concept, when the search was given one)."""
    t = metrics["target"]
    probe = "concept_rate_after" in t
    rate = (lambda m, w: m[f"concept_rate_{w}"]) if probe else (lambda m, w: m[f"clip_accuracy_{w}"])
    leak = attack_leak(attacked_rate, floor_rate)
    ablation = 1.0 - max(rate(t, "after"), leak)
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
        if floor_rate is not None:
            out.update(floor_rate=floor_rate, attack_leak=leak)
    if "paraphrases" in metrics:
        out["paraphrase_leakage"] = rate(metrics["paraphrases"], "after")
    out.update(parts)
    return out
