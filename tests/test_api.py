"""The in-process Python API: no Ray, the README's snippet as written.

No Ray instance is started in this process. That the API and the Ray job give the same delta is
checked on the resumed job of tests/test_faults.py (one job run serves both checks).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def readme_snippet() -> str:
    """The first ```python block under the README's "## Python API" heading."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_readme_snippet_ablates_the_default_style_in_process_without_ray(tmp_path, monkeypatch):
    """The README's snippet, run as written (in a temporary folder): the toy default style in 100
    steps, judged by the probe, with Ray never initialised."""
    import ray

    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(readme_snippet(), "README.md", "exec"), scope)
    assert not ray.is_initialized()
    report, delta = scope["report"], scope["delta"]
    assert int(delta.metadata["step"]) <= 150
    assert report["target"]["concept_rate_before"] >= 0.9
    assert report["target"]["concept_rate_after"] <= 0.05, report["target"]
    for name, m in report.items():
        if name == "anchor" or name.startswith("neighbours."):
            assert m["concept_rate_after"] >= 0.90 * m["concept_rate_before"], (name, m)
    # the saved file, applied through the other entry point, writes the same tensors
    from rayablate import apply_delta, load_pipeline

    again = apply_delta(load_pipeline(scope["path"]), tmp_path / "striped.safetensors")
    assert sorted(again) == sorted(delta.tensors)
    assert "ablating" not in str(report) and "target" in str(report)


def test_api_leaves_the_callers_pipeline_unchanged_and_refuses_a_bad_field(tiny_pipe):
    """A few steps on the tiny random pipeline: the caller's weights stay as they were, the delta
    changes only the matcher group, a bad setting raises ConfigError naming the field."""
    import ray

    import rayablate
    from rayablate.pipeline import group_parameter_names

    before = {n: p.detach().clone() for n, p in tiny_pipe.unet.named_parameters()}
    concept = rayablate.Concept(target="striped", anchor="plain", neighbours=["dotted"])
    seen = []
    delta = rayablate.ablate(tiny_pipe, concept, steps=2, batch_size=4, num_anchor_images=4,
                             num_preservation_images=4, anchor_steps=2, progress=False,
                             callback=lambda step, m: seen.append((step, m["loss"])))
    assert [s for s, _ in seen] == [1, 2] and all(torch.isfinite(torch.tensor(v)) for _, v in seen)
    assert all(torch.equal(before[n], p) for n, p in tiny_pipe.unet.named_parameters())
    assert delta.tensors and set(delta.tensors) <= set(group_parameter_names(tiny_pipe, "xattn-kv"))
    assert not ray.is_initialized()
    with pytest.raises(rayablate.ConfigError, match=r"^lr_matcher: "):
        rayablate.ablate(tiny_pipe, concept, steps=1, lr_matcher=-1.0, progress=False)
