"""Diffusers pipelines: load and save, the matcher's parameter groups, matcher deltas (safetensors)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

PARAM_GROUPS = ("xattn-kv", "xattn", "embedding", "full", "lora")
DELTA_FORMAT = "rayablate-delta/1"


class PipelineLoadError(ValueError):
    """The model path or id does not name a loadable diffusers pipeline."""


class DeltaError(ValueError):
    """A delta does not fit the pipeline it is applied to, or is not a rayablate delta."""


# --- load / save ------------------------------------------------------------------------------

def looks_like_path(name: str) -> bool:
    """Hub ids look like "owner/name"; anything else (or anything that exists on disk) is a path."""
    if Path(name).expanduser().exists() or name.startswith((".", "/", "~")):
        return True
    return name.count("/") != 1


def load_pipeline(name_or_path: str | os.PathLike, torch_dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Load a Stable Diffusion (1.x/2.x) or SDXL pipeline from a local diffusers folder or a hub id.

    Only safetensors weights are accepted. Hub ids resolve only when the hub is reachable
    (tests run with HF_HUB_OFFLINE=1 and local folders).
    """
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    quiet_libraries()
    name = str(name_or_path)
    cls = StableDiffusionPipeline
    if looks_like_path(name):
        path = Path(name).expanduser()
        if not path.exists():
            raise PipelineLoadError(f"model path does not exist: {path}")
        index = path / "model_index.json"
        if not path.is_dir() or not index.exists():
            raise PipelineLoadError(f"not a diffusers pipeline (no model_index.json): {path}")
        try:
            class_name = json.loads(index.read_text()).get("_class_name", "")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PipelineLoadError(f"not a diffusers pipeline (unreadable model_index.json): {path}: {e}") from e
        if "XL" in class_name:
            cls = StableDiffusionXLPipeline
        elif class_name and class_name not in ("StableDiffusionPipeline",):
            cls = DiffusionPipeline
        name = str(path)
    kwargs = dict(dtype=torch_dtype, use_safetensors=True)
    if cls is StableDiffusionPipeline:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        pipe = cls.from_pretrained(name, **kwargs)
    except (OSError, ValueError, EnvironmentError) as e:
        raise PipelineLoadError(f"could not load diffusers pipeline {name!r}: {e}") from e
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def quiet_libraries() -> None:
    """Silence per-component loading bars; our jobs print their own progress."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def save_pipeline(pipe, path: str | os.PathLike) -> Path:
    """Save a pipeline in diffusers format (safetensors), atomically: a temporary folder, then rename."""
    import shutil

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp, safe_serialization=True)
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return path


def text_encoders(pipe) -> list[tuple[str, nn.Module]]:
    """The pipeline's text encoders with their component names (two for SDXL)."""
    return [(n, getattr(pipe, n)) for n in ("text_encoder", "text_encoder_2") if getattr(pipe, n, None) is not None]


# --- parameter groups -------------------------------------------------------------------------

def _is_xattn_kv(name: str) -> bool:
    return ".attn2.to_k." in name or ".attn2.to_v." in name


def _is_xattn(name: str) -> bool:
    return ".attn2." in name


def group_parameter_names(pipe, group: str) -> list[str]:
    """Qualified names (`unet.<...>`, `text_encoder.<...>`) of the base parameters a group changes."""
    if group not in PARAM_GROUPS:
        raise ValueError(f"unknown parameter group {group!r}; allowed: {', '.join(PARAM_GROUPS)}")
    unet_names = _base_names(pipe.unet)
    if group == "xattn-kv" or group == "lora":
        return [f"unet.{n}" for n in unet_names if _is_xattn_kv(n)]
    if group == "xattn":
        return [f"unet.{n}" for n in unet_names if _is_xattn(n)]
    if group == "full":
        return [f"unet.{n}" for n in unet_names]
    names = []
    for comp, enc in text_encoders(pipe):
        names += [f"{comp}.{n}" for n in _base_names(enc) if n.endswith("token_embedding.weight")]
    return names


def _base_names(module: nn.Module) -> list[str]:
    """Parameter names as the base architecture has them (peft's LoRA factors left out)."""
    return [n.replace(".base_layer.", ".") for n, _ in module.named_parameters() if "lora_" not in n]


def lora_target_modules(pipe) -> list[str]:
    """Module names of the cross-attention key/value projections that LoRA adapts."""
    return sorted({n.rsplit(".", 1)[0] for n in _base_names(pipe.unet) if _is_xattn_kv(n)})


def set_matcher(pipe, group: str, lora_rank: int = 4, lora_alpha: float | None = None) -> list[str]:
    """Freeze everything, then make the group's parameters trainable. Returns the trainable names.

    For `lora`, peft adapters are added to the UNet's cross-attention k/v projections and only
    their low-rank factors train.
    """
    if group not in PARAM_GROUPS:
        raise ValueError(f"unknown parameter group {group!r}; allowed: {', '.join(PARAM_GROUPS)}")
    for _, module in components(pipe):
        module.requires_grad_(False)
    if group == "lora":
        from peft import LoraConfig

        cfg = LoraConfig(r=lora_rank, lora_alpha=lora_alpha or lora_rank, init_lora_weights="gaussian",
                         target_modules=lora_target_modules(pipe))
        pipe.unet.add_adapter(cfg)
        for n, p in pipe.unet.named_parameters():
            p.requires_grad_("lora_" in n)
        return [f"unet.{n}" for n, p in pipe.unet.named_parameters() if p.requires_grad]
    wanted = set(group_parameter_names(pipe, group))
    for comp, module in components(pipe):
        for n, p in module.named_parameters():
            if f"{comp}.{n}" in wanted:
                p.requires_grad_(True)
    return trainable_names(pipe)


def components(pipe) -> list[tuple[str, nn.Module]]:
    return [("unet", pipe.unet)] + text_encoders(pipe)


def trainable_names(pipe) -> list[str]:
    return [f"{c}.{n}" for c, m in components(pipe) for n, p in m.named_parameters() if p.requires_grad]


def trainable_parameters(pipe) -> list[nn.Parameter]:
    return [p for _, m in components(pipe) for p in m.parameters() if p.requires_grad]


# --- deltas -----------------------------------------------------------------------------------

def architecture_fingerprint(pipe) -> str:
    """A hash of every parameter's name and shape: two pipelines with the same one take each other's deltas."""
    h = hashlib.sha256()
    for comp, module in components(pipe):
        for n, p in _base_state(module).items():
            h.update(f"{comp}.{n}:{tuple(p.shape)};".encode())
    return h.hexdigest()[:16]


def _base_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """State of a module as the base architecture names it (LoRA adapters merged, their keys dropped)."""
    state = {}
    peft_layers = {n: m for n, m in module.named_modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A")}
    for name, p in module.named_parameters():
        if "lora_" in name:
            continue
        if ".base_layer." in name:
            mod_name = name.split(".base_layer.")[0]
            base_name = name.replace(".base_layer.", ".")
            if name.endswith("weight"):
                layer = peft_layers[mod_name]
                delta = sum(layer.get_delta_weight(a) for a in layer.active_adapters) if layer.active_adapters else 0
                state[base_name] = p.detach() + delta
            else:
                state[base_name] = p.detach()
            continue
        state[name] = p.detach()
    return state


def matcher_state(pipe, group: str) -> dict[str, torch.Tensor]:
    """The group's current tensors, by their qualified base names (LoRA merged into its base weight)."""
    wanted = set(group_parameter_names(pipe, group))
    out = {}
    for comp, module in components(pipe):
        for n, t in _base_state(module).items():
            if f"{comp}.{n}" in wanted:
                out[f"{comp}.{n}"] = t.detach().to("cpu", torch.float32).contiguous().clone()
    return out


def export_delta(pipe, group: str, path: str | os.PathLike, base_state: dict[str, torch.Tensor] | None = None,
                 extra_metadata: dict[str, str] | None = None) -> Path:
    """Write the matcher's changed tensors (full values, not differences) to a safetensors file.

    `base_state` (from `matcher_state` before training) restricts the file to tensors that
    actually changed; without it every tensor of the group is written.
    """
    state = matcher_state(pipe, group)
    if base_state is not None:
        state = {k: v for k, v in state.items() if not torch.equal(v, base_state[k].to(v.dtype))}
    return write_delta_file(pipe, state, path, group, extra_metadata)


def write_delta_file(pipe, tensors: dict[str, torch.Tensor], path: str | os.PathLike, group: str,
                     extra_metadata: dict[str, str] | None = None) -> Path:
    """Write `tensors` (full values) as a delta file of `pipe`'s architecture, atomically."""
    return save_delta_tensors(tensors, path, delta_metadata(group, architecture_fingerprint(pipe), extra_metadata))


def delta_metadata(group: str, architecture: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """A delta file's metadata: its format, parameter group and architecture fingerprint (+ extra)."""
    return {"format": DELTA_FORMAT, "group": group, "architecture": architecture, **(extra or {})}


def save_delta_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> Path:
    """Write delta tensors and their metadata as a safetensors file, atomically."""
    from safetensors.torch import save_file

    from .files import atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=dict(metadata))
    return path


def delta_digest(path: str | os.PathLike) -> str:
    """sha256 of a delta file's tensors (names, dtypes, shapes, values) and metadata: equal for equal
    deltas. (The file's bytes are not: safetensors writes the metadata in a per-process order.)"""
    tensors, meta = read_delta(path)
    h = hashlib.sha256(json.dumps(sorted(meta.items())).encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def read_delta(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a delta file. Only safetensors is read; pickles are refused."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise DeltaError(f"delta file does not exist: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for non-safetensors bytes
        raise DeltaError(f"{path} is not a safetensors file (pickled checkpoints are refused, since loading "
                         f"them can run code): {e}") from e
    if meta.get("format") != DELTA_FORMAT:
        raise DeltaError(f"{path} is not a rayablate delta (metadata format={meta.get('format')!r})")
    return tensors, meta


def check_delta_fits(delta: str | os.PathLike, model_path: str | os.PathLike) -> None:
    """Refuse a delta whose tensors do not exist, with these shapes, in a local diffusers folder.

    Reads only the delta and the safetensors headers of the model's components (no weights), so a
    delta for another architecture is refused before any worker starts. Hub ids are not checked
    here (`apply_delta` checks when the pipeline loads).
    """
    from safetensors import safe_open

    tensors, meta = read_delta(delta)
    root = Path(model_path).expanduser()
    if not looks_like_path(str(model_path)) or not root.is_dir():
        return
    shapes: dict[str, dict[str, tuple]] = {}
    for comp in sorted({name.split(".", 1)[0] for name in tensors}):
        files = sorted((root / comp).glob("*.safetensors")) if (root / comp).is_dir() else []
        if not files:
            raise DeltaError(f"delta for another architecture: it changes component {comp!r}, which {root} does "
                             f"not have (delta architecture {meta.get('architecture')})")
        shapes[comp] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                shapes[comp].update({k: tuple(h.get_slice(k).get_shape()) for k in h.keys()})
    for name, t in tensors.items():
        comp, rest = name.split(".", 1)
        if rest not in shapes[comp]:
            raise DeltaError(f"delta for another architecture: tensor {name!r} does not exist in {root} "
                             f"(delta architecture {meta.get('architecture')})")
        if shapes[comp][rest] != tuple(t.shape):
            raise DeltaError(f"delta for another architecture: tensor {name!r} has shape {tuple(t.shape)}, the "
                             f"model's has {shapes[comp][rest]} ({root})")


def apply_delta(pipe, delta, scale: float | None = None) -> list[str]:
    """Write a delta's tensors into `pipe` in place. Refuses deltas of another architecture.

    `delta`: a delta file's path, a `rayablate.Delta`, or a dict of tensors. With `scale`, the
    pipeline's tensors move by `scale * (delta - current)` instead (for merges). Returns the names written.
    """
    if hasattr(delta, "tensors") and hasattr(delta, "metadata"):
        tensors, meta = delta.tensors, delta.metadata
    elif isinstance(delta, dict):
        tensors, meta = delta, {}
    else:
        tensors, meta = read_delta(delta)
    arch = meta.get("architecture")
    mine = architecture_fingerprint(pipe)
    params = {f"{c}.{n}": p for c, m in components(pipe) for n, p in m.named_parameters()}
    for name, t in tensors.items():
        if name not in params:
            raise DeltaError(f"delta for another architecture: tensor {name!r} does not exist in this pipeline "
                             f"(delta architecture {arch}, pipeline {mine})")
        if tuple(params[name].shape) != tuple(t.shape):
            raise DeltaError(f"delta for another architecture: tensor {name!r} has shape {tuple(t.shape)}, the "
                             f"pipeline's has {tuple(params[name].shape)} (delta architecture {arch}, pipeline {mine})")
    if arch is not None and arch != mine:
        raise DeltaError(f"delta for another architecture: fingerprint {arch} != pipeline {mine}")
    with torch.no_grad():
        for name, t in tensors.items():
            p = params[name]
            new = t.to(p.device, p.dtype)
            p.copy_(new if scale is None else p + scale * (new - p))
    return sorted(tensors)


def param_count(names: Iterable[str], pipe) -> int:
    params = {f"{c}.{n}": p for c, m in components(pipe) for n, p in m.named_parameters()}
    return sum(params[n].numel() for n in names)
