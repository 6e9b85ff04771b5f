"""Pipelines: offline load/save, parameter groups, matcher deltas."""
import json

import pytest
import torch

from rayablate import pipeline as P

# The tiny UNet has cross-attention transformer blocks at these places (see toyworld/models.py).
BLOCKS = ["down_blocks.1.attentions.0", "mid_block.attentions.0", "up_blocks.0.attentions.0", "up_blocks.0.attentions.1"]


def attn2(suffixes):
    return sorted(f"unet.{b}.transformer_blocks.0.attn2.{s}" for b in BLOCKS for s in suffixes)


EXPECTED = {
    "xattn-kv": attn2(["to_k.weight", "to_v.weight"]),
    "xattn": attn2(["to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "to_out.0.bias"]),
    "embedding": ["text_encoder.embeddings.token_embedding.weight"],
}


def unet_out(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2, pipe.unet.config.in_channels, 8, 8, generator=g)
    ids = pipe.tokenizer(["a red striped circle", "a blue zorb"], padding="max_length",
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.unet(z, torch.tensor([10, 500]), encoder_hidden_states=pipe.text_encoder(ids)[0]).sample


def train_a_little(pipe, steps=3):
    params = P.trainable_parameters(pipe)
    opt = torch.optim.AdamW(params, lr=1e-2)
    torch.manual_seed(0)
    ids = pipe.tokenizer(["a red striped circle"] * 2, padding="max_length",
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    for _ in range(steps):
        z = torch.randn(2, pipe.unet.config.in_channels, 8, 8)
        out = pipe.unet(z, torch.tensor([10, 500]), encoder_hidden_states=pipe.text_encoder(ids)[0]).sample
        loss = out.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_pipeline_round_trips_through_from_pretrained(tiny_sd_path, tmp_path):
    pipe = P.load_pipeline(tiny_sd_path)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    out = P.save_pipeline(pipe, tmp_path / "copy")
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    assert not list(out.rglob("*.bin")), "weights must be saved as safetensors only"
    again = P.load_pipeline(out)
    assert torch.equal(unet_out(pipe), unet_out(again))


@pytest.mark.parametrize("group", ["xattn-kv", "xattn", "embedding"])
def test_param_group_makes_exactly_these_names_trainable(tiny_pipe, group):
    names = P.set_matcher(tiny_pipe, group)
    assert sorted(names) == EXPECTED[group]
    assert len(names) == len(EXPECTED[group])
    assert sorted(P.trainable_names(tiny_pipe)) == EXPECTED[group]


def test_full_group_is_the_whole_unet_and_nothing_else(tiny_pipe):
    names = P.set_matcher(tiny_pipe, "full")
    unet_names = sorted(f"unet.{n}" for n, _ in tiny_pipe.unet.named_parameters())
    assert sorted(names) == unet_names
    assert len(names) == len(unet_names) == 208
    assert not any(p.requires_grad for p in tiny_pipe.text_encoder.parameters())


def test_lora_group_trains_only_low_rank_factors_on_xattn_kv(tiny_pipe):
    names = P.set_matcher(tiny_pipe, "lora", lora_rank=2)
    expected = sorted(n.replace(".weight", f".{ab}.default.weight")
                      for n in EXPECTED["xattn-kv"] for ab in ("lora_A", "lora_B"))
    assert sorted(names) == expected and len(names) == 16
    shapes = {n: p.shape for n, p in tiny_pipe.unet.named_parameters() if p.requires_grad}
    assert all(2 in s for s in shapes.values())  # rank 2


def test_unknown_group_is_refused(tiny_pipe):
    with pytest.raises(ValueError, match="unknown parameter group 'attn'.*xattn-kv"):
        P.set_matcher(tiny_pipe, "attn")


@pytest.mark.parametrize("group", ["xattn-kv", "embedding", "full"])
def test_delta_reproduces_trained_outputs_bitwise(tiny_sd_path, tmp_path, group):
    trained = P.load_pipeline(tiny_sd_path)
    P.set_matcher(trained, group)
    base = P.matcher_state(trained, group)
    train_a_little(trained)
    path = P.export_delta(trained, group, tmp_path / "delta.safetensors", base_state=base)
    tensors, meta = P.read_delta(path)
    assert meta["group"] == group
    assert set(tensors) <= set(base) and tensors  # only the group's tensors, and some changed

    fresh = P.load_pipeline(tiny_sd_path)
    assert not torch.equal(unet_out(fresh), unet_out(trained))
    written = P.apply_delta(fresh, path)
    assert written == sorted(tensors)
    assert torch.equal(unet_out(fresh), unet_out(trained))


def test_lora_delta_is_merged_weights_and_matches_the_adapted_model(tiny_sd_path, tmp_path):
    trained = P.load_pipeline(tiny_sd_path)
    P.set_matcher(trained, "lora", lora_rank=2)
    base = P.matcher_state(trained, "xattn-kv")
    train_a_little(trained)
    path = P.export_delta(trained, "lora", tmp_path / "lora.safetensors", base_state=base)
    tensors, _ = P.read_delta(path)
    assert sorted(tensors) == EXPECTED["xattn-kv"]  # merged into the base names: appliable without peft
    fresh = P.load_pipeline(tiny_sd_path)
    P.apply_delta(fresh, path)
    # W + B@A merged once vs. the adapter's x@W + (x@A)@B at run time: equal up to float rounding
    assert torch.allclose(unet_out(fresh), unet_out(trained), atol=1e-5)


def test_delta_from_another_architecture_is_refused(tiny_sd_path, tmp_path):
    from diffusers import UNet2DConditionModel

    from rayablate.toyworld import models

    trained = P.load_pipeline(tiny_sd_path)
    P.set_matcher(trained, "xattn-kv")
    train_a_little(trained, steps=1)
    path = P.export_delta(trained, "xattn-kv", tmp_path / "d.safetensors")
    other = P.load_pipeline(tiny_sd_path)
    other.unet = UNet2DConditionModel(**dict(models.unet_config(), block_out_channels=(32, 64)))
    before = {n: p.clone() for n, p in other.unet.named_parameters()}
    with pytest.raises(P.DeltaError, match="another architecture"):
        P.apply_delta(other, path)
    assert all(torch.equal(p, before[n]) for n, p in other.unet.named_parameters()), "nothing half-applied"


def test_pickle_checkpoint_is_refused(tmp_path):
    path = tmp_path / "delta.safetensors"
    torch.save({"unet.x": torch.zeros(2)}, path)
    with pytest.raises(P.DeltaError, match="pickled checkpoints are refused"):
        P.read_delta(path)


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(P.PipelineLoadError, match="does not exist"):
        P.load_pipeline(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(P.PipelineLoadError, match="not a diffusers pipeline"):
        P.load_pipeline(tmp_path / "empty")
