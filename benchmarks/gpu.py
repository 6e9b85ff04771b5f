"""GPU benchmark: one prepared script that measures, on one GPU, what a concept ablation costs.

    python benchmarks/gpu.py [--model DIR] [--clip ARCH/PRETRAINED|DIR] [--steps 5] [--out FILE]
    python benchmarks/gpu.py --smoke          # CPU, tiny sizes: keeps the script working (tests/test_gpu_bench.py)

No GPU numbers measured yet: no GPU machine was available when this script was written. Do not
read GPU numbers from a --smoke run; its CPU figures say nothing about a GPU.

Without --model it builds an SD-1.5-architecture pipeline from its config with random weights
(UNet2DConditionModel with block_out_channels (320, 640, 1280, 1280), cross_attention_dim 768,
sample_size 64 i.e. 512 px: ~860 M parameters; the CLIP ViT-L/14 text encoder config; the full CLIP
BPE tokenizer, 49,408 tokens and 77 positions, built from open_clip's BPE file). Random weights
cost the same FLOPs as trained ones. With --model it loads a local diffusers folder.

It measures, and prints as one table:
- anchor-image generation, images/s (DDIM 50 steps, guidance 6: the paper's sampling);
- training s/step and peak GPU memory (torch.cuda.max_memory_allocated) for ZeRO 0, 2 and 3 in
  bf16, for the xattn-kv and full parameter groups: `method.Ablation` + `train.EngineOptimizers`
  in this one process (DeepSpeed, world size 1), batch 4 (the paper's per-GPU batch);
- evaluation images/s: generation plus CLIP accuracy, CLIP score and KID (CLIP features);
- the projected wall time of the paper's recipe per concept (1,000 anchor images from 200
  prompts, 100 steps at batch 4 per GPU, 200 evaluation images per group before and after, for
  the default job's groups), next to the paper's ~5 minutes per concept on 2 GPUs for 100 steps.
  The projection assumes data-parallel steps on N GPUs take the one-GPU step time (it leaves out
  gradient all-reduce) and that generation splits evenly over the GPUs.

Exit status 1 when any measurement failed (its row says why); the table is printed either way.
"""
from __future__ import annotations

import argparse
import gc
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

GROUPS = ("xattn-kv", "full")
PAPER_SECONDS, PAPER_GPUS = 300.0, 2  # the paper's code: ~5 min per concept, 100 steps, 2 GPUs
TARGET, ANCHOR = "van gogh", "painting"
PROMPTS = [f"a {s} of a {o}" for s in ("painting", "sketch") for o in ("house", "river", "tree", "dog")]


def settings(smoke: bool) -> dict:
    """Sizes of one run: the paper's on a GPU; tiny ones on CPU for --smoke."""
    if smoke:
        return dict(device="cpu", precision="fp32", zero_stages=(0, 2, 3), batch=2, gen_batch=2, gen_images=4,
                    gen_steps=2, eval_images=3, guidance=6.0, warmup=1, steps=1)
    return dict(device="cuda", precision="bf16", zero_stages=(0, 2, 3), batch=4, gen_batch=8, gen_images=16,
                gen_steps=50, eval_images=16, guidance=6.0, warmup=2, steps=5)

# --- the pipeline ------------------------------------------------------------------------------

def sd15_configs(tiny: bool) -> dict:
    """Component configs of SD-1.5's architecture (`tiny`: the same layout, a few channels)."""
    unet = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    vae = dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=512, layers_per_block=2,
               block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4)
    text = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
    if tiny:
        unet.update(sample_size=8, layers_per_block=1, block_out_channels=(32, 32, 64, 64), cross_attention_dim=32,
                    attention_head_dim=4, norm_num_groups=8)
        vae.update(sample_size=64, layers_per_block=1, block_out_channels=(8, 8, 16, 16), norm_num_groups=4)
        text.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    projection_dim=32)
    return {"unet": unet, "vae": vae, "text_encoder": text}


def build_sd15(tiny: bool, seed: int = 0):
    """A StableDiffusionPipeline of SD-1.5's architecture with random weights (module docstring)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from rayablate.toyworld.tokenizer import build_full_tokenizer

    torch.manual_seed(seed)
    cfg = sd15_configs(tiny)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**cfg["vae"]), text_encoder=CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])),
        tokenizer=build_full_tokenizer(tempfile.mkdtemp(prefix="rayablate-bench-tok-")),
        unet=UNet2DConditionModel(**cfg["unet"]),
        scheduler=DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def clip_scorer(name: str, smoke: bool, device: str):
    """The evaluation's CLIP: `name` through rayablate.clip, else open_clip's ViT-B-32 architecture
    (the paper's) with random weights; a tiny one for --smoke."""
    import open_clip

    from rayablate.clip import ClipScorer

    if name:
        return ClipScorer.load(name, device)
    if smoke:
        cfg = dict(embed_dim=32, vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=1, head_width=16),
                   text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))
        model = open_clip.CLIP(**cfg)
        size = 32
    else:
        model, size = open_clip.create_model("ViT-B-32", pretrained=None), 224
    return ClipScorer(model, open_clip.get_tokenizer("ViT-B-32"), size, open_clip.OPENAI_DATASET_MEAN,
                      open_clip.OPENAI_DATASET_STD, device)


# --- measurements ------------------------------------------------------------------------------

def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def _allocated_gib(device: str) -> float | None:
    import torch

    return torch.cuda.memory_allocated() / 2**30 if device == "cuda" else None


def generate(pipe, s: dict, n: int, seed: int = 0):
    """uint8 images of `n` prompts in batches of gen_batch, and images/s after one warm-up batch."""
    import numpy as np

    from rayablate.sampling import sample_images

    prompts = [PROMPTS[i % len(PROMPTS)] + f", in the style of {TARGET}" for i in range(n)]

    def run(ps, off):
        return sample_images(pipe, ps, [seed + off + i for i in range(len(ps))], s["gen_steps"], s["guidance"],
                             s["device"])

    sample_images(pipe, prompts[:s["gen_batch"]], range(s["gen_batch"]), 2, s["guidance"], s["device"])  # warm-up
    _sync(s["device"])
    t = time.perf_counter()
    images = np.concatenate([run(prompts[i:i + s["gen_batch"]], i) for i in range(0, n, s["gen_batch"])])
    _sync(s["device"])
    return images, n / (time.perf_counter() - t)


def evaluation_rate(pipe, scorer, s: dict) -> tuple[float, float | None]:
    """(images/s, peak GPU GiB) of an evaluation group: generation plus CLIP accuracy, CLIP score and KID."""
    from rayablate.metrics import kid_clip
    from rayablate.prompts import concept_texts

    _reset_peak(s["device"])
    t = time.perf_counter()
    images, _ = generate(pipe, s, s["eval_images"], seed=1000)
    scorer.clip_accuracy(images, concept_texts(TARGET), concept_texts(ANCHOR))
    scorer.clip_score(images, [PROMPTS[i % len(PROMPTS)] for i in range(len(images))])  # one prompt per image
    kid_clip(scorer, images, images[::-1].copy())
    _sync(s["device"])
    return s["eval_images"] / (time.perf_counter() - t), _peak_gib(s["device"])


def init_single_process(device: str) -> None:
    """DeepSpeed's process group in this one process (world size 1)."""
    import deepspeed

    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1").items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    if device != "cuda":
        from rayablate.train import skip_shm_collective

        skip_shm_collective()  # else its process group JIT-builds DeepSpeed's shm op: 30-50 s in a new venv
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")


def train_rows(images, batch: int) -> dict:
    """One batch of numpy columns: ablation rows and one preservation row (its anchor = its own caption)."""
    from rayablate.images import encode_png
    from rayablate.method import columns_of

    rows = []
    for i in range(batch):
        prompt = PROMPTS[i % len(PROMPTS)]
        abl = i % 4 != 3
        target = f"{prompt}, in the style of {TARGET}" if abl else prompt
        rows.append({"image": encode_png(images[i % len(images)]), "target_caption": target,
                     "anchor_caption": prompt if abl else target, "mask": int(abl), "seed": i})
    return columns_of(rows)


def train_speed(pipe, images, s: dict, group: str, zero: int) -> tuple[float, float | None, float | None]:
    """(median s/step, peak GPU GiB, GiB allocated before it started) of `method.Ablation` +
    `train.EngineOptimizers` at one ZeRO stage."""
    from rayablate.config import AblationConfig
    from rayablate.method import Ablation, train_step
    from rayablate.train import EngineOptimizers

    cfg = AblationConfig(param_group=group, zero_stage=zero, precision=s["precision"], batch_size=s["batch"],
                         use_gpu=s["device"] == "cuda", num_workers=1, lr_matcher=2e-6)
    _reset_peak(s["device"])
    held = _allocated_gib(s["device"])  # what an earlier row left behind would show here
    ablation = Ablation(pipe, cfg, s["device"], copy_modules=True)  # `pipe` stays as built for the next row
    optim = EngineOptimizers(ablation)
    raw = train_rows(images, s["batch"])
    times = []
    for step in range(s["warmup"] + s["steps"]):
        _sync(s["device"])
        t = time.perf_counter()
        train_step(ablation, optim, raw, step)
        _sync(s["device"])
        times.append(time.perf_counter() - t)
    peak = _peak_gib(s["device"])
    for engine in (optim.matcher, optim.disc):
        if engine is not None and hasattr(engine, "destroy"):
            engine.destroy()  # ZeRO-3 hooks stay on the module otherwise
    del ablation, optim
    _reset_peak(s["device"])
    return statistics.median(times[s["warmup"]:]), peak, held


def default_group_count() -> int:
    """Evaluation groups of the default job (target, anchor, each neighbour, paraphrases)."""
    from rayablate.config import AblationConfig
    from rayablate.worlds import world_for

    cfg = AblationConfig()
    return len(world_for(cfg.model).eval_groups(cfg.concept, 1, cfg.eval_seed))


# --- the table ---------------------------------------------------------------------------------

def _attempt(rows: list, label: str, unit: str, fn, note: str = ""):
    """Run one measurement into `rows`: (value, peak GiB[, GiB held before]) from `fn`, or a failed
    row saying why."""
    try:
        value, peak, *held = fn()
    except Exception as e:  # noqa: BLE001 - one failed configuration (e.g. out of memory) must not hide the others
        rows.append([label, None, unit, None, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"])
        return None
    if held and held[0] is not None:
        note += f"; {held[0]:.2f} GiB allocated before"
    rows.append([label, value, unit, peak, note])
    return value


def recipe_rows(rate: dict, s_step: dict, groups: int, gpus: int, smoke: bool) -> list[list]:
    """Projected per-concept wall time of the paper's recipe on `gpus` GPUs, per parameter group."""
    rows = []
    for group in GROUPS:
        label = f"recipe {group}, {gpus} GPUs"
        zero = next((z for z in (2, 0, 3) if s_step.get((group, z))), None)
        if zero is None or not rate.get("anchor") or not rate.get("eval"):
            rows.append([label, None, "s", None, "failed: a measurement it needs failed"])
            continue
        anchors = 1000 / rate["anchor"] / gpus
        train = 100 * s_step[(group, zero)]
        evaluation = 2 * 200 * groups / rate["eval"] / gpus
        total = anchors + train + evaluation
        note = (f"ZeRO-{zero}: anchors {anchors:.0f} + train {train:.0f} + eval {evaluation:.0f} s; "
                f"{total / PAPER_SECONDS:.2f}x the paper's ~{PAPER_SECONDS:.0f} s")
        rows.append([label, total, "s", None, note + (" (CPU smoke, tiny model: not a GPU figure)" if smoke else "")])
    rows.append([f"paper's code, {PAPER_GPUS} GPUs", PAPER_SECONDS, "s", None, "100 steps, batch 4 per GPU"])
    return rows


HEADERS = ["measurement", "value", "unit", "peak GPU GiB", "setting"]


def format_table(rows: list[list]) -> str:
    """A console table; the last (free-text) column left-aligned after the others."""
    from rayablate.report import text_table

    head = text_table(HEADERS[:4], [r[:4] for r in rows]).splitlines()
    return "\n".join(f"{h}  {n}" for h, n in zip(head, [HEADERS[4]] + [r[4] for r in rows]))


def run(args) -> tuple[list[list], str]:
    import torch

    from rayablate.method import DTYPES
    from rayablate.pipeline import load_pipeline, text_encoders

    s = settings(args.smoke)
    if args.steps:
        s["steps"] = args.steps
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or use --smoke for the CPU check")
    torch.manual_seed(0)
    pipe = load_pipeline(args.model, device=s["device"]) if args.model else build_sd15(args.smoke).to(s["device"])
    n_unet = sum(p.numel() for p in pipe.unet.parameters())
    init_single_process(s["device"])
    rows: list[list] = []
    rate: dict = {}
    # the dtype rayablate's Sampler loads pipelines in (load_pipeline's default: fp32)
    dtype = next(k for k, v in DTYPES.items() if v == pipe.unet.dtype)
    gen = f"{dtype}, {s['gen_steps']} DDIM steps, guidance {s['guidance']}, batch {s['gen_batch']}"
    images = None

    def anchors():
        nonlocal images
        _reset_peak(s["device"])
        images, r = generate(pipe, s, s["gen_images"])
        return r, _peak_gib(s["device"])

    rate["anchor"] = _attempt(rows, "anchor generation", "images/s", anchors, gen)
    if images is None:  # training still runs, on noise images of the pipeline's size
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        images = torch.randint(0, 256, (s["batch"], size, size, 3), dtype=torch.uint8).numpy()
    s_step = {}
    parts = [pipe.unet] + [m for _, m in text_encoders(pipe)]  # off the GPU while training: its own peak
    for m in parts:
        m.to("cpu")
    for group in GROUPS:
        for zero in s["zero_stages"]:
            s_step[(group, zero)] = _attempt(
                rows, f"train {group} ZeRO-{zero}", "s/step", lambda: train_speed(pipe, images, s, group, zero),
                f"{s['precision']}, batch {s['batch']}, median of {s['steps']} after {s['warmup']} warm-up")
    for m in parts:
        m.to(s["device"])
    scorer = clip_scorer(args.clip, args.smoke, s["device"])
    rate["eval"] = _attempt(rows, "evaluation", "images/s",
                            lambda: evaluation_rate(pipe, scorer, s),
                            f"{gen}; + CLIP accuracy, CLIP score, KID")
    rows += recipe_rows(rate, s_step, default_group_count(), args.gpus, args.smoke)
    device = torch.cuda.get_device_name() if s["device"] == "cuda" else "CPU (smoke: tiny configs)"
    title = (f"{args.model or 'SD-1.5 architecture, random weights'} (UNet {n_unet / 1e6:.0f} M parameters, "
             f"{pipe.unet.config.sample_size * pipe.vae_scale_factor} px) on {device}")
    return rows, title


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="a local diffusers folder (default: SD-1.5 architecture, random)")
    ap.add_argument("--clip", default="", help="open_clip ARCH/PRETRAINED or a folder (default: ViT-B-32, random)")
    ap.add_argument("--steps", type=int, default=0, help="timed training steps per row (default 5; smoke 1)")
    ap.add_argument("--gpus", type=int, default=PAPER_GPUS, help="GPUs of the projected recipe")
    ap.add_argument("--out", default="", help="also write the table as markdown to this file")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny configs: checks the script, measures nothing")
    args = ap.parse_args(argv)
    # DeepSpeed's and torch.distributed's deprecation notices would bury the table
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*Kernel Inception Distance.*")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    t0 = time.time()
    rows, title = run(args)
    print(title)
    print(format_table(rows))
    print(f"benchmark wall time: {time.time() - t0:.0f}s", flush=True)
    if args.out:
        from rayablate.report import markdown_table

        Path(args.out).write_text(f"{title}\n\n{markdown_table(HEADERS, rows)}\n")
    return 1 if any(str(r[4]).startswith("failed") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
