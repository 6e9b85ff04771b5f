"""Exports of a matcher delta that other tools load: a diffusers LoRA folder (`lora`), the same LoRA in
the kohya / A1111 key format that ComfyUI and A1111 read (`kohya`), and a full diffusers pipeline folder
with the delta applied (`pipeline`). No Ray.

A delta file holds full tensor values (LoRA merged into its base weight, docs/design.md "Deltas"), so a
LoRA export factors `W_delta - W_base` by SVD, with the base weights from the base pipeline:
- from the `lora` group the difference has rank `lora_rank`, and the factors at that rank are exact up
  to float error (without a rank, each layer's numerical rank is used);
- from the full-rank groups (`xattn-kv`, `xattn`) it is a truncated SVD at `rank` (DEFAULT_RANK), whose
  relative Frobenius error over all changed tensors is reported. Bias changes (`xattn`'s
  `to_out.0.bias`) have no LoRA form: they count in the error in full and are listed as not exported.
Factors are stored with alpha = rank (scale 1): `W = W_base + lora_B @ lora_A`.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

EXPORT_KINDS = ("lora", "kohya", "pipeline")
LORA_GROUPS = ("lora", "xattn-kv", "xattn")  # groups whose delta is a set of UNet linear weights
DEFAULT_RANK = 16
# Singular values below this share of a layer's largest are float noise of the merged lora weights
# (measured on the tiny pipeline: ~6e-7 of the largest, against real ones from 0.09 of it).
NUMERICAL_RANK_RTOL = 1e-4
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


class ExportError(ValueError):
    """An export that cannot be made from this delta (a kind that does not exist, a group LoRA cannot hold)."""


def parse_kinds(text: str) -> list[str]:
    """`lora,pipeline,kohya` -> ["lora", "pipeline", "kohya"]; an unknown or empty kind raises ExportError."""
    kinds = [k.strip() for k in str(text).split(",")]
    bad = [k for k in kinds if k not in EXPORT_KINDS]
    if bad or not kinds:
        raise ExportError(f"unknown export kind(s) {', '.join(map(repr, bad))}; allowed: {', '.join(EXPORT_KINDS)}"
                          " (comma-separated)")
    return list(dict.fromkeys(kinds))


def check_exportable(kinds: list[str], group: str) -> None:
    """LoRA exports exist only for groups of UNet linear weights; refuse the others before anything runs."""
    lora_kinds = [k for k in kinds if k in ("lora", "kohya")]
    if lora_kinds and group not in LORA_GROUPS:
        raise ExportError(f"export {'/'.join(lora_kinds)} needs a delta of parameter group "
                          f"{' | '.join(LORA_GROUPS)}, not {group!r} (its tensors are not linear layers a LoRA "
                          f"adapts); export 'pipeline' instead")


def _delta_parts(delta) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a `rayablate.Delta` or a delta file's path."""
    if hasattr(delta, "tensors") and hasattr(delta, "metadata"):
        return delta.tensors, dict(delta.metadata)
    from .pipeline import read_delta

    return read_delta(delta)


def _base_params(pipe) -> dict[str, torch.Tensor]:
    from .pipeline import components

    return {f"{c}.{n}": p for c, m in components(pipe) for n, p in m.named_parameters()}


# --- factors ----------------------------------------------------------------------------------

def svd_factors(diff: torch.Tensor, rank: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A, lora_B), fp32, with `lora_B @ lora_A` the best rank-`rank` approximation of `diff`
    (Eckart-Young). rank None: the numerical rank. Computed in float64, so only the fp32 cast rounds."""
    u, s, vh = torch.linalg.svd(diff.double(), full_matrices=False)
    if rank is None:
        rank = max(1, int((s > NUMERICAL_RANK_RTOL * s[0]).sum())) if s.numel() and s[0] > 0 else 1
    rank = min(rank, s.numel())
    root = s[:rank].sqrt()
    return (root[:, None] * vh[:rank]).float().contiguous(), (u[:, :rank] * root).float().contiguous()


def lora_factors(delta, base_pipe, rank: int | None = None) -> tuple[dict[str, tuple], dict]:
    """({UNet module name: (lora_A, lora_B)}, info) of a delta against `base_pipe`'s weights.

    info: rank (the largest used), relative_error (Frobenius, over every changed tensor, after the
    fp32 cast), not_exported (changed tensors LoRA cannot hold, e.g. biases)."""
    tensors, meta = _delta_parts(delta)
    group = meta.get("group", meta.get("param_group", ""))
    check_exportable(["lora"], group)
    if rank is None and meta.get("lora_rank"):
        rank = int(meta["lora_rank"])
    if rank is not None and rank < 1:
        raise ExportError(f"export rank must be >= 1, not {rank}")
    if rank is None and group != "lora":
        rank = DEFAULT_RANK
    base = _base_params(base_pipe)
    factors, skipped, err2, total2 = {}, [], 0.0, 0.0
    for name in sorted(tensors):
        diff = tensors[name].double() - base[name].detach().double().cpu()
        total2 += float(diff.pow(2).sum())
        if not (name.startswith("unet.") and name.endswith(".weight") and diff.ndim == 2):
            skipped.append(name)
            err2 += float(diff.pow(2).sum())
            continue
        a, b = svd_factors(diff, rank)
        err2 += float((diff - b.double() @ a.double()).pow(2).sum())
        factors[name[len("unet."):-len(".weight")]] = (a, b)
    used = max((a.shape[0] for a, _ in factors.values()), default=0)
    return factors, {"rank": used, "relative_error": (err2 / total2) ** 0.5 if total2 > 0 else 0.0,
                     "not_exported": skipped}


def peft_state_dict(base_pipe, factors: dict[str, tuple]) -> tuple[dict[str, torch.Tensor], dict]:
    """peft's state dict of the UNet LoRA (keys as `get_peft_model_state_dict` names them) and the
    adapter's LoraConfig as a dict: the adapter is added, by diffusers' `add_adapter`, to a weightless
    (meta-device) copy of the UNet's architecture, and its factors are set to ours."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict

    ranks = {m: a.shape[0] for m, (a, _) in factors.items()}
    r = max(ranks.values())
    pattern = {m: k for m, k in ranks.items() if k != r}
    cfg = LoraConfig(r=r, lora_alpha=r, rank_pattern=pattern, alpha_pattern=dict(pattern),
                     target_modules=sorted(factors), init_lora_weights=False)
    with torch.device("meta"):
        unet = type(base_pipe.unet).from_config(base_pipe.unet.config)
    unet.add_adapter(cfg)
    for name, module in unet.named_modules():
        if isinstance(module, LoraLayer) and name in factors:
            a, b = factors[name]
            module.lora_A["default"].weight = torch.nn.Parameter(a, requires_grad=False)
            module.lora_B["default"].weight = torch.nn.Parameter(b, requires_grad=False)
    state = get_peft_model_state_dict(unet)
    left = [k for k, v in state.items() if v.is_meta]
    if left:
        raise ExportError(f"LoRA export: no factors for {left[0]} (the delta does not fit this pipeline)")
    return state, unet.peft_config["default"].to_dict()


# --- writers ----------------------------------------------------------------------------------

def _replace_dir(tmp: Path, path: Path) -> None:
    """Move a finished temporary folder over `path` (rename: a reader never sees half an export)."""
    if path.exists():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    tmp.replace(path)


def export_lora(delta, base_pipe, path: str | os.PathLike, rank: int | None = None) -> dict:
    """A diffusers LoRA folder (`pytorch_lora_weights.safetensors`) that `pipe.load_lora_weights(path)`
    loads, written by the pipeline class's own `save_lora_weights`. Returns the report's dict."""
    factors, info = lora_factors(delta, base_pipe, rank)
    state, config = peft_state_dict(base_pipe, factors)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    type(base_pipe).save_lora_weights(tmp, unet_lora_layers=state, weight_name=LORA_WEIGHT_NAME,
                                      safe_serialization=True, unet_lora_adapter_metadata=config)
    _replace_dir(tmp, path)
    return {"kind": "lora", "path": str(path), **info}


def export_kohya(delta, base_pipe, path: str | os.PathLike, rank: int | None = None) -> dict:
    """One safetensors file in the kohya / A1111 format (`lora_unet_<module>.lora_down.weight`,
    `.lora_up.weight`, `.alpha` = rank), converted from peft's keys by diffusers' `convert_state_dict_to_kohya`.
    ComfyUI and A1111 load it from their `loras` folders; `kohya_to_peft` reads it back."""
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    from .files import atomic

    factors, info = lora_factors(delta, base_pipe, rank)
    state, _ = peft_state_dict(base_pipe, factors)
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in state.items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic(path) as tmp:
        save_file({k: v.contiguous() for k, v in kohya.items()}, str(tmp),
                  metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(info["rank"]),
                            "ss_network_alpha": str(info["rank"])})
    return {"kind": "kohya", "path": str(path), **info}


def kohya_to_peft(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A kohya-format LoRA file back in peft's keys with the `unet.` prefix (`unet.<module>.lora_A.weight`,
    `.lora_B.weight`), each alpha folded into lora_B (scale alpha / rank), through diffusers' own
    kohya -> diffusers -> peft converters (those `load_lora_weights` uses)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    state, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
    state = convert_unet_state_dict_to_peft(state)  # what load_lora_weights does with it
    # the alphas are named after their lora_down key: the same converter names their module
    alphas = convert_unet_state_dict_to_peft({k.removesuffix(".alpha"): v for k, v in (alphas or {}).items()})
    out = {}
    for key, a in state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[:-len(".lora_A.weight")]
        b = state[f"{module}.lora_B.weight"]
        alpha = float(alphas.get(key, a.shape[0]))
        out[key], out[f"{module}.lora_B.weight"] = a, b * (alpha / a.shape[0])
    return out


def export_pipeline(delta, base_pipe, path: str | os.PathLike) -> dict:
    """A full diffusers folder with the delta applied (`from_pretrained` loads it). `base_pipe` is
    changed only while it is saved: the tensors the delta writes are restored after."""
    from .pipeline import apply_delta, save_pipeline

    tensors, meta = _delta_parts(delta)
    base = _base_params(base_pipe)
    kept = {n: base[n].detach().clone() for n in tensors if n in base}
    try:
        apply_delta(base_pipe, delta if hasattr(delta, "tensors") else str(delta))
        save_pipeline(base_pipe, path)
    finally:
        apply_delta(base_pipe, kept)
    return {"kind": "pipeline", "path": str(path), "rank": None, "relative_error": 0.0, "not_exported": []}


def export(kind: str, delta, base_pipe, path: str | os.PathLike, rank: int | None = None) -> dict:
    """Export `delta` (a `rayablate.Delta` or a delta file) of `base_pipe` as `kind` (EXPORT_KINDS) at `path`.

    Returns {"kind", "path", "rank", "relative_error", "not_exported"} for the report."""
    if kind == "lora":
        return export_lora(delta, base_pipe, path, rank)
    if kind == "kohya":
        return export_kohya(delta, base_pipe, path, rank)
    if kind == "pipeline":
        return export_pipeline(delta, base_pipe, path)
    raise ExportError(f"unknown export kind {kind!r}; allowed: {', '.join(EXPORT_KINDS)}")


EXPORT_NAMES = {"lora": "lora", "kohya": "kohya_lora.safetensors", "pipeline": "pipeline"}


def write_exports(kinds: list[str], delta_path: str | os.PathLike, model_path: str, out_dir: str | os.PathLike,
                  rank: int | None = None, log=print) -> list[dict]:
    """Each kind into `out_dir`/exports/ (lora/, kohya_lora.safetensors, pipeline/), against the base
    pipeline loaded from `model_path`. The jobs call this after training; returns the report's dicts."""
    from .pipeline import load_pipeline

    if not kinds:
        return []
    base_pipe = load_pipeline(model_path)
    root = Path(out_dir) / "exports"
    root.mkdir(parents=True, exist_ok=True)
    done = []
    for kind in kinds:
        info = export(kind, delta_path, base_pipe, root / EXPORT_NAMES[kind], rank)
        info["path"] = str(Path("exports") / EXPORT_NAMES[kind])
        log(f"export {kind}: {info['path']}" + (f" (rank {info['rank']}, relative error "
                                                  f"{info['relative_error']:.2e})" if info["rank"] else ""))
        done.append(info)
    return done
