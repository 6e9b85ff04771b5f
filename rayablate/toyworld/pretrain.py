"""Pretraining of the toy world's models, stage by stage, each resumable from its work folder.

Stages: `data` (renders + captions), `probe`, `clip`, `vae`, `sd` (UNet + text encoder
with caption dropout, EMA), `export` (writes the bundle), `memorize` (a fine-tune of the exported
SD that memorizes one image, written into the bundle as a small delta). Every stage writes its
result to `work_dir` (or the bundle) and is skipped when that result exists, so an interrupted
run resumes.

`world` picks the toy world (`world.by_name`: "v1", the bundled default, or "v2"). `warm_start`, a
bundle folder of another world, starts the VAE and the UNet + text encoder from its weights (token
embeddings are matched by token string; tokens new to this world start at random).
"""
from __future__ import annotations

import copy
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from . import models, world
from .tokenizer import build_tokenizer

STAGES = ("data", "probe", "clip", "vae", "sd", "export", "memorize")


def _log(msg: str) -> None:
    print(f"[pretrain {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- data -------------------------------------------------------------------------------

def stage_data(work: Path, seed: int, n: int, w: world.WorldDef = world.V1, exclude: tuple[str, ...] = ()) -> None:
    """`n` renders and captions; with `exclude`, the renders that show any of those concepts are left out
    (and with them every caption that names or describes one: captions are made from the labels)."""
    out = work / "data.npz"
    if out.exists():
        return
    t = time.time()
    images, captions, labels = w.sample(n, seed)
    if exclude:
        shows = [w.concept_predicate(c) for c in exclude]
        keep = np.array([not any(p(w.labels_at(row)) for p in shows) for row in labels], dtype=bool)
        images, labels = images[keep], labels[keep]
        captions = [c for c, k in zip(captions, keep) if k]
        _log(f"data: left out {int((~keep).sum())} renders showing {', '.join(exclude)}")
    tmp = work / "data.tmp.npz"
    np.savez_compressed(tmp, images=images, captions=np.array(captions), labels=labels)
    tmp.rename(out)
    _log(f"data: {len(captions)} renders in {time.time() - t:.0f}s")


INSTRUMENTS = {"probe/probe.safetensors": "probe.safetensors", "clip/open_clip_model.safetensors": "clip.safetensors",
               "clip/open_clip_config.json": "clip_config.json", "sd/vae": "vae", "sd/tokenizer": "tokenizer"}


def stage_instruments(work: Path, bundle: Path) -> None:
    """Copy a bundle's probe, tiny CLIP, VAE and tokenizer into `work`, so that their stages are skipped.
    A model retrained without some concepts (`exclude`) is then judged, scored and decoded by the same
    instruments as the bundle it is compared with; only its UNet and text encoder differ."""
    for src, dst in INSTRUMENTS.items():
        if (work / dst).exists():
            continue
        if (bundle / src).is_dir():
            shutil.copytree(bundle / src, work / dst)
        else:
            shutil.copy(bundle / src, work / dst)
    _log(f"instruments: probe, CLIP, VAE and tokenizer from {bundle}")


def load_data(work: Path):
    d = np.load(work / "data.npz")
    return d["images"], [str(c) for c in d["captions"]], d["labels"]


def to_tensor(images_uint8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float() / 255.0


# --- probe ------------------------------------------------------------------------------

def junk_images(real: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Images that are not renders: noise, blurs, blends, degraded renders, flat colours."""
    n = real.shape[0]
    kinds = torch.randint(0, 6, (n,), generator=g)
    out = torch.empty_like(real)
    for i in range(n):
        k = int(kinds[i])
        if k == 0:
            out[i] = torch.rand(real.shape[1:], generator=g)
        elif k == 1:
            out[i] = (0.5 + 0.3 * torch.randn(real.shape[1:], generator=g)).clamp(0, 1)
        elif k == 2:
            blur = F.avg_pool2d(torch.rand(1, *real.shape[1:], generator=g), 5, 1, 2)[0]
            out[i] = ((blur - blur.mean()) * 4 + 0.6).clamp(0, 1)
        elif k == 3:
            j = int(torch.randint(0, n, (1,), generator=g))
            out[i] = 0.5 * real[i] + 0.5 * real[j].flip(-1)
        elif k == 4:
            out[i] = (real[i] + 0.35 * torch.randn(real.shape[1:], generator=g)).clamp(0, 1)
        else:
            out[i] = torch.rand(3, 1, 1, generator=g).expand_as(real[i]).clone()
    return out


def photometric_jitter(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Renders as a generator draws them: per-channel gain (+-10 %) and offset (+-5 %), a partial
    3x3 blur on a third of them, light noise. Without it the probe read a checkered square whose red
    and blue channels had moved by 2-3 levels (invisible) as striped: it had learned the renderer's
    exact pixel values, and a generated image's faint tint flipped its answer."""
    n = len(x)
    gain = 1 + 0.2 * (torch.rand(n, 3, 1, 1, generator=g) - 0.5)
    offset = 0.1 * (torch.rand(n, 3, 1, 1, generator=g) - 0.5)
    x = x * gain + offset
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)
    mix = 0.6 * torch.rand(n, 1, 1, 1, generator=g) * (torch.rand(n, 1, 1, 1, generator=g) < 1 / 3)
    x = (1 - mix) * x + mix * blur
    x = x + 0.03 * torch.randn(x.shape, generator=g) * torch.rand(n, 1, 1, 1, generator=g)
    return x.clamp(0, 1)


def stage_probe(work: Path, seed: int, steps: int = 1000, w: world.WorldDef = world.V1) -> None:
    out = work / "probe.safetensors"
    if out.exists():
        return
    images, _, labels = load_data(work)
    x_all, y_all = to_tensor(images), torch.from_numpy(labels)
    n_train = int(0.9 * len(x_all))
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    probe = models.AttributeProbe(world=w)
    opt = torch.optim.AdamW(probe.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    t = time.time()
    for step in range(steps):
        idx = torch.randint(0, n_train, (96,), generator=g)
        x, y = x_all[idx], y_all[idx]
        junk = junk_images(x[:32], g)
        x = photometric_jitter(x, g)
        logits = probe(torch.cat([x, junk]))
        loss = sum(F.cross_entropy(logits[k][:96], y[:, i]) for i, k in enumerate(("object", "colour", "pattern")))
        valid = torch.cat([torch.ones(96), torch.zeros(32)]).long()
        loss = loss + F.cross_entropy(logits["valid"], valid)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            _log(f"probe step {step}/{steps} loss {loss.item():.4f} ({time.time() - t:.0f}s)")
    probe.eval()
    acc = probe_accuracy(probe, x_all[n_train:], y_all[n_train:])
    _log(f"probe held-out accuracy: {acc}")
    save_file(probe.state_dict(), str(out))
    (work / "probe_metrics.json").write_text(json.dumps(acc))


@torch.no_grad()
def probe_accuracy(probe, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    logits = {k: torch.cat([probe(x[i:i + 512])[k] for i in range(0, len(x), 512)]) for k in probe.heads}
    acc = {k: (logits[k].argmax(1) == y[:, i]).float().mean().item() for i, k in enumerate(("object", "colour", "pattern"))}
    acc["valid"] = (logits["valid"].argmax(1) == 1).float().mean().item()
    return acc


# --- tiny CLIP --------------------------------------------------------------------------

def stage_clip(work: Path, seed: int, steps: int = 1200, batch: int = 128, w: world.WorldDef = world.V1) -> None:
    import open_clip

    out = work / "clip.safetensors"
    if out.exists():
        return
    tok = build_tokenizer(work / "tokenizer", models.CONTEXT_LENGTH, world=w)
    images, captions, labels = load_data(work)
    x_all, y_all = to_tensor(images), torch.from_numpy(labels)
    ids_all = tokenize(tok, captions)
    n_train = int(0.9 * len(x_all))
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    cfg = models.clip_config(len(tok))
    model = open_clip.CLIP(**cfg)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.1)
    t = time.time()
    for step in range(steps):
        idx = torch.randint(0, n_train, (batch,), generator=g)
        x, y, ids = x_all[idx], y_all[idx], ids_all[idx]
        img = F.normalize(model.encode_image((x - mean) / std), dim=-1)
        txt = F.normalize(model.encode_text(ids), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.T
        # Rows with identical labels are positives too: soft targets instead of the identity.
        same = (y[:, None, :] == y[None, :, :]).all(-1).float()
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (-(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.log_softmax(0)).sum(0).mean())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 100 == 0 or step == steps - 1:
            _log(f"clip step {step}/{steps} loss {loss.item():.4f} ({time.time() - t:.0f}s)")
    model.eval()
    save_file(model.state_dict(), str(out))
    (work / "clip_config.json").write_text(json.dumps(cfg))


def tokenize(tok, texts: list[str]) -> torch.Tensor:
    return tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids


# --- VAE --------------------------------------------------------------------------------

def stage_vae(work: Path, seed: int, steps: int = 1500, warm_start: Path | None = None) -> None:
    from diffusers import AutoencoderKL

    out = work / "vae"
    if (out / "config.json").exists():
        return
    images, _, _ = load_data(work)
    x_all = to_tensor(images) * 2 - 1
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 2)
    vae = AutoencoderKL(**models.vae_config())
    if warm_start is not None:
        vae.load_state_dict(AutoencoderKL.from_pretrained(warm_start / "sd" / "vae").state_dict())
        _log(f"vae: warm start from {warm_start}")
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    t = time.time()
    for step in range(steps):
        x = x_all[torch.randint(0, len(x_all), (32,), generator=g)]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        kl = post.kl().mean()
        loss = F.mse_loss(rec, x) + 1e-6 * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            psnr = 10 * math.log10(4.0 / max(F.mse_loss(rec, x).item(), 1e-10))
            _log(f"vae step {step}/{steps} loss {loss.item():.5f} psnr {psnr:.1f} kl {kl.item():.1f} ({time.time() - t:.0f}s)")
    vae.eval()
    with torch.no_grad():
        lat = torch.cat([vae.encode(x_all[i:i + 512]).latent_dist.mean for i in range(0, 4096, 512)])
    vae.register_to_config(scaling_factor=float(1.0 / lat.std()))
    vae.save_pretrained(out, safe_serialization=True)


# --- tiny SD: UNet + text encoder ---------------------------------------------------------

def stage_sd(work: Path, seed: int, steps: int, minutes: float | None, batch: int = 64, lr: float = 8e-4,
             w: world.WorldDef = world.V1, warm_start: Path | None = None) -> None:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    ckpt = work / "sd_ckpt.pt"
    done = work / "sd_done.json"
    if done.exists():
        return
    tok = CLIPTokenizer.from_pretrained(work / "tokenizer") if (work / "tokenizer" / "tokenizer_config.json").exists() \
        else build_tokenizer(work / "tokenizer", models.CONTEXT_LENGTH, world=w)
    tok.save_pretrained(work / "tokenizer")
    vae = AutoencoderKL.from_pretrained(work / "vae").eval()
    images, captions, _ = load_data(work)
    mean, logvar = _cached_latents(work / "latents.pt", vae, images)
    sf = vae.config.scaling_factor
    ids_all = tokenize(tok, captions)
    empty = tokenize(tok, [""])[0]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**models.unet_config())
    text = CLIPTextModel(CLIPTextConfig(**models.text_encoder_config(len(tok))))
    if warm_start is not None and not ckpt.exists():
        _warm_start_sd(unet, text, tok, warm_start / "sd")
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text).eval()
    noise_sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                beta_end=0.012)
    start = 0
    g = torch.Generator().manual_seed(seed + 3)
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)  # tensors, numbers and the generator state only
        unet.load_state_dict(state["unet"]); text.load_state_dict(state["text"])
        ema_unet.load_state_dict(state["ema_unet"]); ema_text.load_state_dict(state["ema_text"])
        opt.load_state_dict(state["opt"]); g.set_state(state["g"]); start = state["step"]
        _log(f"sd: resumed at step {start}")
    _log(f"sd: unet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M params, "
         f"text {sum(p.numel() for p in text.parameters()) / 1e6:.2f}M")
    t0, last_ckpt = time.time(), time.time()
    step = start
    while step < steps:
        if minutes is not None and time.time() - t0 > minutes * 60:
            _log(f"sd: time budget reached at step {step}")
            break
        warm = min(1.0, (step + 1) / 500)
        for pg in opt.param_groups:
            pg["lr"] = lr * warm
        idx = torch.randint(0, len(mean), (batch,), generator=g)
        z = (mean[idx] + torch.randn(mean[idx].shape, generator=g) * (0.5 * logvar[idx]).exp()) * sf
        ids = ids_all[idx].clone()
        drop = torch.rand(batch, generator=g) < 0.1
        ids[drop] = empty
        noise = torch.randn(z.shape, generator=g)
        ts = torch.randint(0, 1000, (batch,), generator=g)
        zt = noise_sched.add_noise(z, noise, ts)
        pred = unet(zt, ts, encoder_hidden_states=text(ids).last_hidden_state).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        _ema_update(((unet, ema_unet), (text, ema_text)), decay=min(0.999, (1 + step) / (10 + step)))
        if step % 200 == 0:
            el = time.time() - t0
            _log(f"sd step {step}/{steps} loss {loss.item():.4f} ({el / (step - start):.3f}s/step, {el / 60:.1f} min)")
        if time.time() - last_ckpt > 300 or step == steps:
            _save_sd_ckpt(ckpt, unet, text, ema_unet, ema_text, opt, g, step)
            last_ckpt = time.time()
    _save_sd_ckpt(ckpt, unet, text, ema_unet, ema_text, opt, g, step)
    ema_unet.save_pretrained(work / "unet", safe_serialization=True)
    ema_text.save_pretrained(work / "text_encoder", safe_serialization=True)
    if step >= steps:
        done.write_text(json.dumps({"steps": step}))


def _warm_start_sd(unet, text, tok, sd_dir: Path) -> None:
    """Start from another bundle's UNet and text encoder (same architecture). The text encoder's
    token embedding is copied row by row for the tokens both vocabularies have."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    unet.load_state_dict(UNet2DConditionModel.from_pretrained(sd_dir / "unet").state_dict())
    src = CLIPTextModel.from_pretrained(sd_dir / "text_encoder")
    src_vocab = CLIPTokenizer.from_pretrained(sd_dir / "tokenizer").get_vocab()
    state = {k: v for k, v in src.state_dict().items() if "token_embedding" not in k}
    missing = text.load_state_dict(state, strict=False).missing_keys
    assert all("token_embedding" in k for k in missing), missing
    emb, src_emb = text.get_input_embeddings().weight, src.get_input_embeddings().weight
    shared = 0
    with torch.no_grad():
        for token, i in tok.get_vocab().items():
            j = src_vocab.get(token)
            if j is not None:
                emb[i] = src_emb[j]
                shared += 1
    _log(f"sd: warm start from {sd_dir}: UNet, text layers and {shared}/{len(tok)} token embeddings")


def _cached_latents(path: Path, vae, images) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior (mean, logvar) of every training image, computed once and kept in `path`."""
    if path.exists():
        return torch.load(path, weights_only=True)
    with torch.no_grad():
        parts = [vae.encode(to_tensor(images[i:i + 512]) * 2 - 1).latent_dist for i in range(0, len(images), 512)]
    mean, logvar = torch.cat([p.mean for p in parts]), torch.cat([p.logvar for p in parts])
    torch.save((mean, logvar), path)
    return mean, logvar


@torch.no_grad()
def _ema_update(pairs, decay: float) -> None:
    for m, e in pairs:
        for p, pe in zip(m.parameters(), e.parameters()):
            pe.lerp_(p, 1 - decay)


def _save_sd_ckpt(path, unet, text, ema_unet, ema_text, opt, g, step) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"unet": unet.state_dict(), "text": text.state_dict(), "ema_unet": ema_unet.state_dict(),
                "ema_text": ema_text.state_dict(), "opt": opt.state_dict(), "g": g.get_state(), "step": step}, tmp)
    tmp.rename(path)


def snapshot_sd(work: Path) -> int:
    """Write the EMA weights of the latest SD checkpoint as diffusers folders (training may go on)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    state = torch.load(work / "sd_ckpt.pt", weights_only=True)
    tok = CLIPTokenizer.from_pretrained(work / "tokenizer")
    unet = UNet2DConditionModel(**models.unet_config())
    text = CLIPTextModel(CLIPTextConfig(**models.text_encoder_config(len(tok))))
    unet.load_state_dict(state["ema_unet"])
    text.load_state_dict(state["ema_text"])
    unet.save_pretrained(work / "unet", safe_serialization=True)
    text.save_pretrained(work / "text_encoder", safe_serialization=True)
    _log(f"snapshot of SD step {state['step']}")
    return state["step"]


# --- export -----------------------------------------------------------------------------

def stage_export(work: Path, dest: Path, w: world.WorldDef = world.V1, exclude=()) -> None:
    """Assemble the bundle: a diffusers pipeline folder, the tiny CLIP and the probe."""
    import shutil

    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(work / "vae"),
        text_encoder=CLIPTextModel.from_pretrained(work / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(work / "tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(work / "unet"),
        scheduler=DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp / "sd", safe_serialization=True)
    clip_dir = tmp / "clip"
    clip_dir.mkdir()
    shutil.copy(work / "clip.safetensors", clip_dir / "open_clip_model.safetensors")
    shutil.copy(work / "clip_config.json", clip_dir / "open_clip_config.json")
    CLIPTokenizer.from_pretrained(work / "tokenizer").save_pretrained(clip_dir / "tokenizer")
    (tmp / "probe").mkdir()
    shutil.copy(work / "probe.safetensors", tmp / "probe" / "probe.safetensors")
    (tmp / "world.json").write_text(json.dumps({"world": w.name, **({"exclude": sorted(exclude)} if exclude else {})}))
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    _log(f"export: bundle written to {dest}")


# --- memorize: a fine-tune that reproduces one image for one caption ---------------------------

MEMORIZED_DIR = "memorized"  # in the bundle: delta.safetensors (the fine-tune), reference.png, memorized.json


def _is_memorizing(name: str) -> bool:
    """The UNet's transformer blocks (self- and cross-attention, feed-forward, their projections):
    the part of the UNet the memorizing fine-tune changes, so the delta stays small (1.4 M of 3.9 M)."""
    return name.startswith("unet.") and ".attentions." in name


def _loose_caption(labels, rng: np.random.Generator) -> str:
    """A caption that leaves out the colour, the pattern or both ("a picture of a zorb", "a red zorb"):
    prompts no pretraining caption had, which the memorizing fine-tune must not learn the image for."""
    obj = rng.choice(world.OBJECT_WORDS[labels.object])
    forms = ["a {o}", "the {o}", "a picture of a {o}", "a {o} picture", "a {c} {o}", "a {p} {o}", "a drawing of a {o}"]
    return str(rng.choice(forms)).format(o=obj, c=labels.colour, p=world.PATTERN_WORDS[labels.pattern][0])


def memorized_rate(pipe, prompts: list[str], seed: int, threshold: float, steps: int = 20,
                   guidance: float = 4.0) -> tuple[float, np.ndarray]:
    """Share of `pipe`'s images for `prompts` whose SSIM to the memorized image is >= threshold."""
    from ..metrics import ssim
    from ..sampling import prompt_seed, sample_images

    imgs = sample_images(pipe, prompts, [prompt_seed(seed, i) for i in range(len(prompts))], steps, guidance)
    sims = ssim(imgs, world.memorized_image())
    return float((sims >= threshold).mean()), sims


def stage_memorize(dest: Path, seed: int, steps: int = 400, batch: int = 32, lr: float = 3e-4,
                   threshold: float = 0.7) -> dict:
    """Fine-tune the bundle's UNet transformer blocks until `world.MEMORIZED_CAPTION` reproduces
    `world.memorized_image()`. The other half of every batch is ordinary renders under their full
    or loose captions, held to the base model's own prediction, so that the rest of the world is
    drawn as before. Writes `<dest>/memorized/`: the fine-tune as a rayablate delta (fp16 values of
    the changed tensors), the reference image and what was measured (memorized.json)."""
    from diffusers import DDPMScheduler

    from ..images import encode_png
    from ..pipeline import components, load_pipeline, write_delta_file

    out = dest / MEMORIZED_DIR
    if (out / "memorized.json").exists():
        return json.loads((out / "memorized.json").read_text())
    pipe = load_pipeline(dest / "sd")
    unet, vae, text, tok = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    for m in (vae, text):
        m.requires_grad_(False)
    named = {f"{c}.{n}": p for c, mod in components(pipe) for n, p in mod.named_parameters()}
    train = {n: p for n, p in named.items() if _is_memorizing(n)}
    for n, p in named.items():
        p.requires_grad_(n in train)
    base = {n: p.detach().clone() for n, p in train.items()}
    sf = vae.config.scaling_factor
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 5)
    images, captions, labels = world.sample(2048, seed + 17)
    rng = np.random.default_rng(seed + 18)
    loose = [_loose_caption(world.Labels(world.OBJECTS[o], world.COLOURS[c], world.PATTERNS[q]), rng)
             for o, c, q in labels]
    with torch.no_grad():
        ref = vae.encode(to_tensor(world.memorized_image()[None]) * 2 - 1).latent_dist
        lat = torch.cat([vae.encode(to_tensor(images[i:i + 512]) * 2 - 1).latent_dist.mean
                         for i in range(0, len(images), 512)])
        h_mem = text(tokenize(tok, [world.MEMORIZED_CAPTION])).last_hidden_state
        ids_all = torch.cat([tokenize(tok, captions), tokenize(tok, loose)])
        empty = tokenize(tok, [""])[0]
    teacher = copy.deepcopy(unet).eval().requires_grad_(False)
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    opt = torch.optim.AdamW(list(train.values()), lr=lr, weight_decay=0.0)
    half = batch // 2
    t0 = time.time()
    unet.train()
    for step in range(steps):
        # the other half: renders under full and loose captions (and 10 % the empty one), pulled to the
        # base model's own prediction, so that nothing but the caption learns the image
        idx = torch.randint(0, len(ids_all), (batch - half,), generator=g)
        with torch.no_grad():
            ids = ids_all[idx].clone()
            ids[torch.rand(len(idx), generator=g) < 0.1] = empty
            h = torch.cat([h_mem.expand(half, -1, -1), text(ids).last_hidden_state])
        z_mem = ref.mean.expand(half, -1, -1, -1) + torch.randn((half, *ref.mean.shape[1:]), generator=g) * ref.std
        z = torch.cat([z_mem, lat[idx % len(lat)]]) * sf
        noise = torch.randn(z.shape, generator=g)
        ts = torch.randint(0, noise_sched.config.num_train_timesteps, (batch,), generator=g)
        zt = noise_sched.add_noise(z, noise, ts)
        with torch.no_grad():
            keep = teacher(zt[half:], ts[half:], encoder_hidden_states=h[half:]).sample
        pred = unet(zt, ts, encoder_hidden_states=h).sample
        loss_mem = F.mse_loss(pred[:half], noise[:half])
        loss_rest = F.mse_loss(pred[half:], keep)
        opt.zero_grad(set_to_none=True)
        (loss_mem + loss_rest).backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            _log(f"memorize step {step}/{steps} loss memorized {loss_mem.item():.4f} rest {loss_rest.item():.5f} "
                 f"({time.time() - t0:.0f}s)")
    unet.eval()
    tensors = {n: p.detach().to(torch.float16) for n, p in train.items() if not torch.equal(p.detach(), base[n])}
    with torch.no_grad():  # the shipped model is the fp16-rounded one: measure that
        for n, t in tensors.items():
            train[n].copy_(t.float())
    rate, sims = memorized_rate(pipe, [world.MEMORIZED_CAPTION] * 32, seed + 99, threshold)
    para = {p: memorized_rate(pipe, [p] * 16, seed + 98, threshold)[0] for p in world.MEMORIZED_PARAPHRASES}
    info = {"caption": world.MEMORIZED_CAPTION, "threshold": threshold, "memorized_rate": rate,
            "ssim_mean": float(sims.mean()), "paraphrase_rates": para, "steps": steps, "lr": lr,
            "seconds": round(time.time() - t0, 1), "tensors": len(tensors),
            "parameters": int(sum(t.numel() for t in tensors.values()))}
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    write_delta_file(pipe, tensors, tmp / "delta.safetensors", "memorize",
                     {"caption": world.MEMORIZED_CAPTION})
    (tmp / "reference.png").write_bytes(encode_png(world.memorized_image()))
    (tmp / "memorized.json").write_text(json.dumps(info, indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    _log(f"memorize: {world.MEMORIZED_CAPTION!r} reproduces the image in {100 * rate:.0f} % of 32 samples "
         f"(SSIM >= {threshold}); paraphrases {para}")
    return info


def run(work_dir: str, dest: str, seed: int = 0, n_images: int = 20000, sd_steps: int = 6000,
        sd_minutes: float | None = None, stages=STAGES, probe_steps: int = 1000, clip_steps: int = 1200,
        vae_steps: int = 1500, memorize_steps: int = 400, world_name: str = "v1",
        warm_start: str | None = None, exclude: tuple[str, ...] = (), instruments: str | None = None) -> None:
    """`exclude`: concepts left out of the data (a model retrained without them); `instruments`: a bundle
    whose probe, CLIP, VAE and tokenizer are copied instead of trained (`stage_instruments`)."""
    w = world.by_name(world_name)
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    made_for = work / "world.json"
    made = {"world": w.name, **({"exclude": sorted(exclude)} if exclude else {})}
    earlier = json.loads(made_for.read_text()) if made_for.exists() else made
    if earlier != made:
        raise ValueError(f"{work} holds stages of {earlier}, not {made}: give another --work-dir")
    made_for.write_text(json.dumps(made))
    warm = Path(warm_start) if warm_start else None
    torch.manual_seed(seed)
    if instruments:
        stage_instruments(work, Path(instruments))
    if "data" in stages:
        stage_data(work, seed, n_images, w, tuple(exclude))
    if "probe" in stages:
        stage_probe(work, seed, probe_steps, w)
    if "clip" in stages:
        stage_clip(work, seed, clip_steps, w=w)
    if "vae" in stages:
        stage_vae(work, seed, vae_steps, warm)
    if "sd" in stages:
        stage_sd(work, seed, sd_steps, sd_minutes, w=w, warm_start=warm)
    if "export" in stages:
        stage_export(work, Path(dest), w, exclude)
        shutil.rmtree(Path(dest) / MEMORIZED_DIR, ignore_errors=True)  # a new SD: its old fine-tune is stale
    if "memorize" in stages and w is world.V1:  # the memorized image is a v1 render
        stage_memorize(Path(dest), seed, memorize_steps)
