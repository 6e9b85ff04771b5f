"""Console table and report.md, with a judge (the toy world's probe) and without one (a real model).

No Ray, no models: hand-written metrics dicts of the shape `metrics.measure_groups` returns.
"""
from __future__ import annotations

from rayablate.prompts import EvalGroup
from rayablate.report import CLIP_NOTES, console_summary, has_judge, report_markdown

TOY_NOTE = "share of images the attribute probe reads as showing the group's concept (toy world)"


def _metrics(judge: bool, model: str) -> tuple[dict, list[EvalGroup]]:
    def group(concept, rate, acc, score, kid=None):
        m = {"concept": concept, "n": 4, "clip_accuracy_before": acc[0], "clip_accuracy_after": acc[1],
             "clip_score_before": score[0], "clip_score_after": score[1]}
        if judge:
            m.update(concept_rate_before=rate[0], concept_rate_after=rate[1])
        if kid is not None:
            m["kid"] = kid
        return m

    groups = {"target": group("striped", (1.0, 0.0), (1.0, 0.25), (31.5, 24.25)),
              "anchor": group("plain", (1.0, 1.0), (0.0, 0.0), (30.0, 29.5), kid=0.0125),
              "neighbours.dotted": group("dotted", (0.75, 0.5), (0.5, 0.25), (29.0, 28.75), kid=-0.002)}
    cfg = {"concept": {"target": "striped", "anchor": "plain"}, "model": model, "param_group": "xattn-kv",
           "steps": 100, "eval_seed": 1000}
    metrics = {**groups, "wall_seconds": 12.4, "config": cfg, "data": {"rows": 96}}
    return metrics, [EvalGroup(k, v["concept"], ["p"] * 4) for k, v in groups.items()]


def test_console_with_a_judge_is_the_toy_table():
    metrics, _ = _metrics(judge=True, model="")
    assert has_judge(metrics)
    assert console_summary(metrics) == "\n".join([
        "group                    rate before   after  clip acc   after     KID",
        "target                         1.000   0.000     1.000   0.250       –",
        "anchor                         1.000   1.000     0.000   0.000   0.013",
        "neighbours.dotted              0.750   0.500     0.500   0.250  -0.002",
        "wall time: 12s"])


def test_console_without_a_judge_shows_clip_accuracy_clip_score_and_kid():
    metrics, _ = _metrics(judge=False, model="/models/sd15")
    assert not has_judge(metrics)
    lines = console_summary(metrics).splitlines()
    assert lines[0].split() == ["group", "clip", "acc", "after", "clip", "score", "after", "KID"]
    assert lines[1].split() == ["target", "1.000", "0.250", "31.500", "24.250", "–"]
    assert lines[2].split() == ["anchor", "0.000", "0.000", "30.000", "29.500", "0.013"]
    assert lines[3].split() == ["neighbours.dotted", "0.500", "0.250", "29.000", "28.750", "-0.002"]
    assert lines[4:7] == CLIP_NOTES
    assert lines[7] == "wall time: 12s"
    assert "rate" not in lines[0]


def test_clip_notes_explain_each_metric():
    acc, score, kid = CLIP_NOTES
    assert acc.startswith("CLIP accuracy: share of images CLIP ranks closer to the target's name than to the anchor's")
    assert score.startswith("CLIP score: mean over images of 100 × max(0, cosine(image, its own prompt))")
    assert kid.startswith("KID: kernel inception distance between before- and after-images on CLIP image features")


def test_report_with_a_judge_explains_the_judges_concept_rate():
    metrics, groups = _metrics(judge=True, model="")
    md = report_markdown(metrics, groups, TOY_NOTE)
    assert "| group | concept | concept rate before | after | CLIP acc before | after | CLIP score before | after " \
           "| KID |" in md
    assert "| target | striped | 1.000 | 0.000 | 1.000 | 0.250 | 31.500 | 24.250 | – |" in md
    assert f"Concept rate: {TOY_NOTE}. CLIP accuracy: share of images CLIP ranks closer to the target than to " \
           "the anchor." in md
    assert "No judge" not in md
    assert "model: `bundled toy`" in md


def test_report_without_a_judge_has_clip_columns_and_no_toy_world_text():
    metrics, groups = _metrics(judge=False, model="/models/sd15")
    md = report_markdown(metrics, groups, None)
    assert "| group | concept | CLIP acc before | after | CLIP score before | after | KID |" in md
    assert "| target | striped | 1.000 | 0.250 | 31.500 | 24.250 | – |" in md
    assert "| anchor | plain | 0.000 | 0.000 | 30.000 | 29.500 | 0.013 |" in md
    assert "| neighbours.dotted | dotted | 0.500 | 0.250 | 29.000 | 28.750 | -0.002 |" in md
    for note in CLIP_NOTES:
        assert f"- {note}" in md
    assert "model: `/models/sd15`" in md
    assert "toy" not in md.lower()
    assert "concept rate" not in md.lower()


def test_report_without_groups_still_reports_restarts():
    metrics, _ = _metrics(judge=False, model="/models/sd15")
    md = report_markdown({"config": metrics["config"], "restarts": 2}, [])
    assert "Worker restarts during training: 2 (a worker failed 2 time(s)" in md
