"""benchmarks/gpu.py stays runnable: its --smoke mode (CPU, tiny configs) prints every row of its table,
and its full-size configs are SD-1.5's architecture (checked on the meta device: nothing allocated)."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.py"

ROWS = ["anchor generation", *(f"train {g} ZeRO-{z}" for g in ("xattn-kv", "full") for z in (0, 2, 3)),
        "evaluation", "recipe xattn-kv, 2 GPUs", "recipe full, 2 GPUs", "paper's code, 2 GPUs"]


def _bench_module():
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_full_size_configs_are_sd15_architecture():
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = _bench_module().sd15_configs(tiny=False)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg["unet"])
        text = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
    # SD-1.5's UNet has 859.52 M parameters and CLIP ViT-L/14's text encoder 123.06 M
    assert abs(sum(p.numel() for p in unet.parameters()) / 1e6 - 859.52) < 0.01
    assert abs(sum(p.numel() for p in text.parameters()) / 1e6 - 123.06) < 0.01
    assert unet.config.sample_size * 8 == 512 and text.config.max_position_embeddings == 77


@pytest.mark.slow
def test_smoke_run_prints_every_row(tmp_path):
    ext = tmp_path / "torch_extensions"  # DeepSpeed's shm op would JIT-build here (30-50 s in a new venv)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
           "TORCH_EXTENSIONS_DIR": str(ext)}
    out = tmp_path / "table.md"
    p = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    lines = p.stdout.splitlines()
    assert any(ln.startswith("SD-1.5 architecture, random weights") and "on CPU" in ln for ln in lines)
    header = next(i for i, ln in enumerate(lines) if ln.startswith("measurement"))
    table = lines[header + 1:header + 1 + len(ROWS)]
    for row, line in zip(ROWS, table):
        assert line.startswith(row), (row, line)
        # every row has a measured number (no failed row), and no GPU memory on CPU
        assert re.match(rf"{re.escape(row)}\s+\d+\.\d+\s+(images/s|s/step|s)\s+–\s", line), line
    assert "not a GPU figure" in p.stdout
    assert "| measurement | value | unit | peak GPU GiB | setting |" in out.read_text()
    assert list(ext.rglob("*.so")) == []  # the CPU smoke builds no C++ op (train.skip_shm_collective)
