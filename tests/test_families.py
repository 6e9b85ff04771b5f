"""Real model families through tiny fixtures built from configs (tests/conftest.py): SD-1.x with the
full CLIP tokenizer, SD-2.x with v_prediction, SDXL with two text encoders, open_clip ViT-B-32.

Fast tests (no Ray): tokenizer, loading and sampling, the objective and the delta round-trip on each
family, SDXL conditioning against what StableDiffusionXLPipeline itself computes, the 77-token
refusal. Slow tests run jobs/train.py and jobs/evaluate.py end to end, in-process (`cli.main`,
what the scripts call) against one module-scoped Ray: that saves a Python + Ray start per job.
"""
import json
import re
from pathlib import Path

import numpy as np
import pytest

from local_ray import start_local_ray
from rayablate.job import shutdown_ray
import torch

PROMPT = "a painting of a house in the style of Van Gogh"
FAMILIES = ["sd1_path", "sd2_path", "sdxl_path"]


def concept_config(tmp_path: Path, **extra) -> Path:
    """A real-model concept config: templates, a prompt file and held-out paraphrases, tiny budgets."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Van Gogh sunflowers in a vase\na wheat field with cypresses by Van Gogh\n")
    cfg = {
        "concept": {"target": "Van Gogh", "anchor": "painting", "kind": "style", "prompt_file": str(prompts),
                    "templates": ["a painting of a house in the style of {}", "a portrait of a man by {}"],
                    "paraphrases": ["Vincent van Gogh"], "neighbours": ["Monet"]},
        "steps": 2, "batch_size": 2, "num_workers": 1, "zero_stage": 0, "num_anchor_images": 4,
        "num_preservation_images": 2, "anchor_steps": 2, "eval_images": 2, "eval_steps": 2,
        "checkpoint_every": 2, "report_every": 1, "clip_threshold": -1.0,  # a random CLIP: every candidate row ablates
        **extra,
    }
    import yaml

    path = tmp_path / "concept.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# --- the fixtures themselves --------------------------------------------------------------------

def test_full_tokenizer_is_clips_and_the_text_encoder_takes_it(sd1_path):
    import open_clip
    from transformers import CLIPTextConfig, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(sd1_path / "tokenizer")
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert CLIPTextConfig.from_pretrained(sd1_path / "text_encoder").vocab_size == 49408
    texts = [PROMPT, "Vincent van Gogh's Starry Night (1889)!", "naïve café, 東京 🎨"]
    ours = tok(texts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    ref = open_clip.tokenize(texts)  # open_clip's own tokenizer over the same BPE file
    for r, o in zip(ref, ours):
        n = int((r != 0).sum())
        assert torch.equal(r[:n], o[:n])


@pytest.mark.parametrize("family,cls,prediction", [
    ("sd1_path", "StableDiffusionPipeline", "epsilon"),
    ("sd2_path", "StableDiffusionPipeline", "v_prediction"),
    ("sdxl_path", "StableDiffusionXLPipeline", "epsilon"),
])
def test_fixture_loads_and_samples(request, family, cls, prediction):
    from rayablate.pipeline import load_pipeline
    from rayablate.sampling import sample_images

    pipe = load_pipeline(request.getfixturevalue(family))
    assert type(pipe).__name__ == cls and pipe.scheduler.config.prediction_type == prediction
    img = sample_images(pipe, [PROMPT], [0], steps=2, guidance=4.0)
    assert img.shape == (1, 32, 32, 3) and img.dtype == np.uint8


def test_vit_b32_clip_folder_loads_through_the_clip_path(vit_b32_clip_path):
    import open_clip

    from rayablate.clip import ClipScorer

    cfg = json.loads((vit_b32_clip_path / "open_clip_config.json").read_text())
    real = open_clip.get_model_config("ViT-B-32")
    assert cfg["vision_cfg"]["image_size"] == 224 and cfg["vision_cfg"]["patch_size"] == 32
    assert cfg["text_cfg"]["context_length"] == 77 and cfg["text_cfg"]["vocab_size"] == real["text_cfg"]["vocab_size"]
    scorer = ClipScorer.load(vit_b32_clip_path)
    images = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    assert 0.0 <= scorer.clip_accuracy(images, ["Van Gogh"], ["painting"]) <= 1.0
    assert np.isfinite(scorer.clip_score(images, [PROMPT] * 2))


@pytest.mark.slow
def test_full_size_vit_b32_folder_is_open_clips_architecture(tmp_path):
    """The un-narrowed ViT-B-32 (151 M parameters): ClipScorer.load of the folder and open_clip's own
    named "ViT-B-32" loading the same weights give the same embeddings."""
    import open_clip

    from rayablate.clip import ClipScorer
    from rayablate.toyworld.tiny import save_vit_b32_clip

    import shutil

    path = save_vit_b32_clip(tmp_path / "clip", seed=0)
    try:
        assert json.loads((path / "open_clip_config.json").read_text()) == open_clip.get_model_config("ViT-B-32")
        ours = ClipScorer.load(path)
        model = open_clip.create_model("ViT-B-32", pretrained=str(path / "open_clip_model.safetensors")).eval()
        with torch.no_grad():
            ref = model.encode_text(open_clip.get_tokenizer("ViT-B-32")([PROMPT]))
        assert torch.allclose(ours.encode_text([PROMPT]), torch.nn.functional.normalize(ref, dim=-1), atol=1e-5)
    finally:
        shutil.rmtree(path, ignore_errors=True)  # 580 MB: not left in pytest's kept temp folders


# --- the objective and the delta on each family (no Ray) --------------------------------------------

def _batch(resolution: int = 32, n: int = 2) -> dict:
    from rayablate.images import encode_png

    rng = np.random.default_rng(0)
    return {"image": np.array([encode_png(rng.integers(0, 255, (resolution, resolution, 3), dtype=np.uint8))
                               for _ in range(n)], dtype=object),
            "target_caption": np.array([PROMPT, "Monet water lilies"], dtype=object)[:n],
            "anchor_caption": np.array(["a painting of a house in the style of painting", "Monet water lilies"],
                                       dtype=object)[:n],
            "mask": np.array([1, 0][:n], dtype=np.int64)}


@pytest.mark.parametrize("family,group", [("sd1_path", "xattn-kv"), ("sd1_path", "lora"), ("sd2_path", "xattn-kv"),
                                          ("sdxl_path", "xattn-kv"), ("sdxl_path", "embedding")])
def test_training_steps_and_the_delta_round_trip(request, tmp_path, family, group):
    """Two steps of the core on the family; the written delta, applied to a fresh pipeline, reproduces
    the trained tensors and the trained denoiser's output (LoRA merged into its base weights)."""
    from rayablate.conditioning import MatcherModule
    from rayablate.config import AblationConfig, ConceptSpec
    from rayablate.method import Ablation, PlainOptimizers, train_step
    from rayablate.pipeline import apply_delta, load_pipeline, matcher_state, read_delta, text_encoders

    path = request.getfixturevalue(family)
    cfg = AblationConfig(concept=ConceptSpec(target="Van Gogh", anchor="painting"), param_group=group,
                         steps=2, batch_size=2, lr_matcher=1e-2, w_adv=0.02)
    ab = Ablation(load_pipeline(path), cfg)
    opt = PlainOptimizers(ab)
    for step in range(2):
        entry = train_step(ab, opt, _batch(), step)
        assert all(np.isfinite(v) for v in entry.values()), entry
    ab.sync_shadow()
    ab.write_delta(tmp_path / "delta.safetensors", step=2)
    tensors, meta = read_delta(tmp_path / "delta.safetensors")
    assert tensors and meta["group"] == group
    fresh = load_pipeline(path)
    before = matcher_state(fresh, group)
    assert apply_delta(fresh, tmp_path / "delta.safetensors") == sorted(tensors)
    trained = matcher_state(ab.parts, group)  # the live student, LoRA merged
    after = matcher_state(fresh, group)
    for name, t in trained.items():
        assert torch.allclose(after[name], t, atol=1e-6), name
    assert any(not torch.equal(before[n], after[n]) for n in tensors)
    x = ab._noised(ab.batch_tensors(_batch())["images"], step=7)
    ids = ab.prompts.tokenize([PROMPT, PROMPT], "cpu")
    applied = MatcherModule(fresh.unet, dict(text_encoders(fresh)), ab.prompts).eval()
    with torch.no_grad():
        assert torch.allclose(applied(x[0], x[1], input_ids=ids), ab.student.eval()(x[0], x[1], input_ids=ids),
                              atol=1e-5)


# --- SDXL conditioning against the pipeline's own --------------------------------------------------

def _unet_call_of_the_pipeline(pipe, prompt: str, latents: torch.Tensor) -> dict:
    """What StableDiffusionXLPipeline passes its UNet on one denoising step (no guidance)."""
    seen = {}

    def hook(module, args, kwargs):
        seen.update(sample=args[0], t=args[1], **kwargs)
        raise StopIteration  # one call is enough

    handle = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        pipe(prompt, num_inference_steps=1, guidance_scale=1.0, latents=latents, output_type="latent")
    except StopIteration:
        pass
    finally:
        handle.remove()
    return seen


def test_sdxl_conditioning_matches_what_the_pipeline_computes(sdxl_path):
    """PromptEncoder + MatcherModule give the UNet exactly what StableDiffusionXLPipeline gives it
    (both penultimate hidden states, the second encoder's pooled projection, the size/crop time ids),
    and dropping the pooled embedding or the time ids changes the output: the check is not vacuous."""
    from rayablate.conditioning import MatcherModule, PromptEncoder
    from rayablate.pipeline import load_pipeline, text_encoders

    pipe = load_pipeline(sdxl_path)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = _unet_call_of_the_pipeline(pipe, PROMPT, latents)
    pe = PromptEncoder(pipe)
    with torch.no_grad():
        hidden, added = pe.encode([pipe.text_encoder, pipe.text_encoder_2], pe.tokenize([PROMPT], "cpu"))
    ref_added = seen["added_cond_kwargs"]
    assert torch.allclose(hidden, seen["encoder_hidden_states"], atol=1e-6)
    assert torch.allclose(added["text_embeds"], ref_added["text_embeds"], atol=1e-6)
    assert torch.equal(added["time_ids"].float(), ref_added["time_ids"].float())
    module = MatcherModule(pipe.unet, dict(text_encoders(pipe)), pe).eval()
    x, t = seen["sample"], seen["t"].reshape(1)
    with torch.no_grad():
        ref = pipe.unet(x, t, encoder_hidden_states=seen["encoder_hidden_states"], added_cond_kwargs=ref_added).sample
        ours = module(x, t, input_ids=pe.tokenize([PROMPT], "cpu"))
        no_pooled = module(x, t, hidden, {**added, "text_embeds": torch.zeros_like(added["text_embeds"])})
        no_time = module(x, t, hidden, {**added, "time_ids": torch.zeros_like(added["time_ids"])})
    assert torch.allclose(ours, ref, atol=1e-5)
    scale = ref.abs().mean()
    assert (no_pooled - ref).abs().mean() > 1e-3 * scale and (no_time - ref).abs().mean() > 1e-3 * scale


# --- the 77-token limit of the full tokenizer -----------------------------------------------------

def test_prompt_of_78_tokens_is_refused_naming_the_field_77_pass(sd1_path, tmp_path, capsys):
    from rayablate.cli import main
    from rayablate.config import ConceptSpec
    from rayablate.job import check_prompt_lengths

    ok = ConceptSpec(target="Van Gogh", anchor="painting", prompts=["Van Gogh " + "a " * 73])  # 2+73 words+2 = 77
    check_prompt_lengths(ok, str(sd1_path))
    cfg = concept_config(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(prompts.read_text() + "Van Gogh " + "a " * 74 + "\n")  # line 3: 78 tokens
    out = tmp_path / "out"
    code = main(["train", "--model", str(sd1_path), "--config", str(cfg), "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "concept.prompt_file" in err and "line 3" in err and "78 tokens" in err and "at most 77" in err
    assert not out.exists()


# --- the jobs end to end (Ray) ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_session():
    ray = start_local_ray(200)
    yield ray
    shutdown_ray()


def train(model: Path, clip: Path, cfg: Path, out: Path, *extra: str) -> int:
    from rayablate.cli import main

    return main(["train", "--model", str(model), "--clip", str(clip), "--config", str(cfg), "--output-dir",
                 str(out), *extra])


def check_real_model_outputs(out: Path, group: str) -> dict:
    from rayablate.pipeline import read_delta

    for f in ("metrics.json", "report.md", "grid.png", "loss_curve.png", "matcher_delta.safetensors", "config.yaml"):
        assert (out / f).exists(), f
    m = json.loads((out / "metrics.json").read_text())
    for g in ("target", "anchor", "paraphrases"):
        for k in ("clip_accuracy_before", "clip_accuracy_after", "clip_score_before", "clip_score_after"):
            assert isinstance(m[g][k], float), (g, k)
    tensors, meta = read_delta(out / "matcher_delta.safetensors")
    assert meta["group"] == group and meta["target"] == "Van Gogh" and tensors
    return m


def check_lora_exports(out: Path, m: dict) -> None:
    """Every export the job wrote (rayablate.job.add_exports): the lora group's factors export exactly."""
    assert sorted(e["kind"] for e in m["exports"]) == ["kohya", "lora", "pipeline"], m["exports"]
    assert (out / "exports" / "lora" / "pytorch_lora_weights.safetensors").exists()
    assert (out / "exports" / "pipeline" / "model_index.json").exists()
    lora = next(e for e in m["exports"] if e["kind"] == "lora")
    assert lora["relative_error"] < 1e-4, lora
    assert "## Exports" in (out / "report.md").read_text()


def check_delta_applies(model: Path, out: Path, group: str) -> None:
    """The saved delta, applied to a fresh pipeline, is exactly its matcher group's state."""
    from rayablate.pipeline import apply_delta, load_pipeline, matcher_state, read_delta

    pipe = load_pipeline(model)
    tensors, _ = read_delta(out / "matcher_delta.safetensors")
    apply_delta(pipe, out / "matcher_delta.safetensors")
    state = matcher_state(pipe, group)
    assert all(torch.equal(state[n], t) for n, t in tensors.items())


@pytest.mark.slow
def test_sd1_full_tokenizer_lora_train_exports_resume_and_evaluate(ray_session, sd1_path, vit_b32_clip_path, tmp_path,
                                                                  capfd):
    """jobs/train.py (the lora group, every export) on SD-1.x with the full tokenizer and the ViT-B-32
    CLIP; the same command with more steps resumes from the checkpoint; jobs/evaluate.py on the
    produced delta. (SD-1.x's family run: one job serves the tokenizer, lora, exports and resume.)"""
    from rayablate.cli import main

    cfg, out = concept_config(tmp_path, param_group="lora"), tmp_path / "run"
    assert train(sd1_path, vit_b32_clip_path, cfg, out, "--export", "lora,kohya,pipeline") == 0, \
        capfd.readouterr().err[-3000:]
    first = capfd.readouterr().out
    assert "resumed from step" not in first
    check_lora_exports(out, check_real_model_outputs(out, "lora"))
    check_delta_applies(sd1_path, out, "lora")
    assert train(sd1_path, vit_b32_clip_path, cfg, out, "--steps", "4") == 0, capfd.readouterr().err[-3000:]
    m = re.search(r"resumed from step (\d+)", capfd.readouterr().out)
    assert m and int(m.group(1)) == 2  # start_step > 0: it did not retrain from 0
    assert json.loads((out / "train_metrics.json").read_text())[-1]["step"] == 4
    ev = tmp_path / "eval"
    code = main(["evaluate", "--model", str(sd1_path), "--clip", str(vit_b32_clip_path), "--config", str(cfg),
                 "--delta", str(out / "matcher_delta.safetensors"), "--output-dir", str(ev)])
    assert code == 0, capfd.readouterr().err[-3000:]
    metrics = json.loads((ev / "metrics.json").read_text())
    assert isinstance(metrics["target"]["clip_score_after"], float) and (ev / "grid.png").exists()
    printed = capfd.readouterr().out  # the evaluate job's console: the table, the outputs, logs/ for the rest
    assert "clip acc" in printed and f"results in {ev}" in printed and (ev / "logs" / "job.log").exists()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd2_path", "sdxl_path"])  # SD-1.x: the test above
def test_train_job_on_each_family(request, ray_session, vit_b32_clip_path, tmp_path, capfd, family):
    model = request.getfixturevalue(family)
    out = tmp_path / "run"
    code = train(model, vit_b32_clip_path, concept_config(tmp_path, param_group="xattn-kv"), out)
    assert code == 0, capfd.readouterr().err[-3000:]
    check_real_model_outputs(out, "xattn-kv")
    check_delta_applies(model, out, "xattn-kv")
