"""Exports (rayablate.export): a diffusers LoRA folder, the kohya / A1111 file and a full pipeline
folder, checked by loading each the way its users do, on the tiny random pipeline. No Ray.

Images are the pipeline's float output (2 prompts, 2 DDIM steps, guidance 3) with fixed seeds; a
delta's own effect on them is the scale every tolerance below is set against.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import rayablate
from rayablate.pipeline import load_pipeline

PROMPTS = ["a striped circle", "a plain square"]


def images(pipe) -> np.ndarray:
    gens = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
    return pipe(PROMPTS, num_inference_steps=2, guidance_scale=3.0, generator=gens, output_type="np").images


def small_delta(pipe, group: str):
    """Two steps with tiny budgets (as tests/test_api.py's second test)."""
    concept = rayablate.Concept(target="striped", anchor="plain", neighbours=["dotted"])
    return rayablate.ablate(pipe, concept, steps=2, batch_size=4, num_anchor_images=4, num_preservation_images=4,
                            anchor_steps=2, progress=False, param_group=group)


@pytest.fixture(scope="module")
def base(tiny_sd_path):
    return load_pipeline(tiny_sd_path)


@pytest.fixture(scope="module")
def deltas(base):
    return {g: small_delta(base, g) for g in ("lora", "xattn-kv")}


@pytest.fixture(scope="module")
def reference(tiny_sd_path, base, deltas):
    """{"base": images of the base pipeline, group: images with the group's delta applied}."""
    out = {"base": images(base)}
    for g, d in deltas.items():
        out[g] = images(d.apply(load_pipeline(tiny_sd_path)))
    return out


def lora_images(tiny_sd_path, path) -> np.ndarray:
    pipe = load_pipeline(tiny_sd_path)
    pipe.load_lora_weights(str(path))
    return images(pipe)


def test_lora_group_exports_an_exact_diffusers_lora(tmp_path, tiny_sd_path, base, deltas, reference):
    info = deltas["lora"].export("lora", tmp_path / "lora", base)
    assert info["rank"] == 4 and not info["not_exported"]  # lora_rank's default, recovered from the delta
    # Float error only: the merged fp32 delta rounds W0 + B·A (measured 2.1e-6 of ||B·A||).
    assert info["relative_error"] < 1e-4, info
    got = lora_images(tiny_sd_path, tmp_path / "lora")
    effect = np.abs(reference["lora"] - reference["base"]).max()
    assert effect > 1e-3, effect  # measured 4.7e-3: an export that loaded nothing would fail below
    # measured max |difference| 1.4e-6 (fp32 noise of the unmerged W0·x + B·(A·x))
    assert np.abs(got - reference["lora"]).max() < 1e-5


def test_full_rank_group_exports_a_truncated_svd_with_its_error(tmp_path, tiny_sd_path, base, deltas, reference):
    delta = deltas["xattn-kv"]
    effect = np.abs(reference["xattn-kv"] - reference["base"]).max()  # measured 4.2e-2
    full = delta.export("lora", tmp_path / "full", base, rank=64)  # min(128, 64): every to_k / to_v at full rank
    assert full["rank"] == 64 and full["relative_error"] < 1e-6, full  # measured 3.6e-8
    full_diff = np.abs(lora_images(tiny_sd_path, tmp_path / "full") - reference["xattn-kv"]).max()
    assert full_diff < 1e-5, full_diff  # measured 1.3e-6: exact, as for the lora group

    low = delta.export("lora", tmp_path / "low", base, rank=4)
    # The reported error is the Eckart-Young bound: the singular values the truncation drops.
    params = dict(base.unet.named_parameters())
    dropped = total = 0.0
    for name, t in delta.tensors.items():
        s = torch.linalg.svdvals((t - params[name[len("unet."):]].detach()).double())
        dropped, total = dropped + float(s[4:].pow(2).sum()), total + float(s.pow(2).sum())
    assert low["rank"] == 4 and abs(low["relative_error"] - (dropped / total) ** 0.5) < 1e-6, low
    assert 0.1 < low["relative_error"] < 0.9  # measured 0.38 after two steps
    low_diff = np.abs(lora_images(tiny_sd_path, tmp_path / "low") - reference["xattn-kv"]).max()
    # measured 1.1e-3: larger than the full-rank export's, far smaller than the delta's own effect
    assert full_diff < low_diff < 0.1 * effect, (low_diff, effect)
    default = delta.export("lora", tmp_path / "default", base)
    assert default["rank"] == 16 and 0 < default["relative_error"] < low["relative_error"]  # measured 0.21


def test_kohya_keys_follow_the_convention_and_convert_back(tmp_path, tiny_sd_path, base, deltas, reference):
    from rayablate.export import kohya_to_peft

    delta = deltas["lora"]
    delta.export("lora", tmp_path / "lora", base)
    info = delta.export("kohya", tmp_path / "k.safetensors", base)
    sd = load_file(str(tmp_path / "k.safetensors"))
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    assert sd[f"{name}.lora_down.weight"].shape == (4, 64)  # (rank, in_features)
    assert sd[f"{name}.lora_up.weight"].shape == (128, 4)  # (out_features, rank)
    assert float(sd[f"{name}.alpha"]) == 4.0  # alpha = rank: scale 1
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v.lora_up.weight" in sd
    pattern = re.compile(r"^lora_unet_(down|mid|up)_blocks?_[0-9a-z_]+_attn2_to_[kv]\.(lora_down\.weight|"
                         r"lora_up\.weight|alpha)$")
    assert all(pattern.match(k) for k in sd), [k for k in sd if not pattern.match(k)]
    assert len(sd) == 3 * len(delta.tensors) and info["rank"] == 4
    # back: the same factors as the diffusers export, bit for bit
    back = kohya_to_peft(tmp_path / "k.safetensors")
    peft = load_file(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"))
    assert sorted(back) == sorted(peft)
    assert all(torch.equal(back[k], peft[k]) for k in peft)
    # and, multiplied out, the delta's weights again (fp32 rounding of W0 + B·A: measured 1.5e-8)
    params = dict(base.unet.named_parameters())
    for qual, t in delta.tensors.items():
        module = qual[:-len(".weight")]
        w = params[qual[len("unet."):]].detach() + back[f"{module}.lora_B.weight"] @ back[f"{module}.lora_A.weight"]
        assert torch.allclose(w, t, rtol=0, atol=1e-6), (qual, (w - t).abs().max())
    # diffusers reads the kohya file too (its kohya loader, as ComfyUI / A1111 read it): same images
    assert np.abs(lora_images(tiny_sd_path, tmp_path / "k.safetensors") - reference["lora"]).max() < 1e-5


def test_pipeline_export_loads_with_from_pretrained(tmp_path, base, deltas, reference):
    from diffusers import StableDiffusionPipeline

    before = {n: p.detach().clone() for n, p in base.unet.named_parameters()}
    info = deltas["xattn-kv"].export("pipeline", tmp_path / "pipe", base)
    assert info["path"] == str(tmp_path / "pipe") and not (tmp_path / "pipe.tmp").exists()
    assert all(torch.equal(before[n], p) for n, p in base.unet.named_parameters())  # base_pipe restored
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "pipe", safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    # the same tensors, saved and loaded: bit-identical images (measured difference 0.0)
    assert np.array_equal(images(pipe), reference["xattn-kv"])


def test_job_lists_exports_in_metrics_and_report(tmp_path, tiny_sd_path, deltas):
    from rayablate.job import add_exports

    path = deltas["xattn-kv"].save(tmp_path / "matcher_delta.safetensors")
    (tmp_path / "report.md").write_text("# Ablation report\n")
    metrics = add_exports({"target": {}}, tmp_path, ["lora", "kohya", "pipeline"], str(path), str(tiny_sd_path), 8)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert [e["kind"] for e in saved["exports"]] == ["lora", "kohya", "pipeline"] == [e["kind"] for e in
                                                                                    metrics["exports"]]
    lora = saved["exports"][0]
    assert lora["path"] == "exports/lora" and lora["rank"] == 8 and 0 < lora["relative_error"] < 1
    assert (tmp_path / "exports" / "lora" / "pytorch_lora_weights.safetensors").exists()
    assert (tmp_path / "exports" / "kohya_lora.safetensors").exists()
    assert (tmp_path / "exports" / "pipeline" / "model_index.json").exists()
    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# Ablation report\n") and "## Exports" in report
    assert f"| lora | `exports/lora` | 8 | {lora['relative_error']:.2e} |" in report


@pytest.mark.parametrize("argv,msg", [
    (["train", "--export", "lora,onnx"], "argument --export: unknown export kind(s) 'onnx'"),
    (["evaluate", "--delta", "x.safetensors", "--export-rank", "0"], "argument --export-rank: must be >= 1"),
], ids=["unknown-kind", "rank-0"])
def test_bad_export_flag_exits_2_naming_the_flag(tmp_path, capsys, argv, msg):
    from rayablate.cli import main

    with pytest.raises(SystemExit) as e:
        main([*argv, "--output-dir", str(tmp_path / "out")])
    assert e.value.code == 2 and msg in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_lora_export_of_a_group_lora_cannot_hold_exits_2_before_anything_runs(tmp_path, capsys):
    from rayablate.cli import main

    code = main(["train", "--param-group", "embedding", "--export", "pipeline,kohya",
                 "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "error: --export: export kohya needs a delta of parameter group" in err, err
    assert not (tmp_path / "out").exists()
