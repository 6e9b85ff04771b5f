"""Configuration: one typed dataclass tree, loaded from YAML, overridden by flags, validated once.

Every problem raises `ConfigError` naming the field (dotted path) and what is allowed; jobs turn
it into exit code 2. YAML is read with `yaml.safe_load`: configs never evaluate code.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from pathlib import Path
from typing import Any

import yaml

# What the target is (docs/design.md#target-kinds): a style or an instance is one concept word; "prompt"
# a composition ("striped zorb"), whose parts must survive on their own; "unsafe" a category given by
# several member words (`concept.members`), with the empty prompt as its default anchor.
KINDS = ("style", "instance", "prompt", "unsafe", "memorized")
PARAM_GROUPS = ("xattn-kv", "xattn", "embedding", "full", "lora")
PRECISIONS = ("fp32", "bf16", "fp16")
SAMPLE_PRECISIONS = ("auto", "fp32", "bf16")  # what images are drawn in: rayablate/sampling.py
MATCH_MODES = ("model", "noise")
ROBUST_INITS = ("anchor", "target", "random")
METHODS = ("train", "closed-form")
# What the ablated target is taught to look like (docs/design.md#anchor-kinds): "text", the anchor
# concept's captions; "empty", the empty prompt (the model's unconditional prediction, as ESD does);
# "blank", a blank canvas; "noise", random-noise images. blank and noise are images with no caption.
ANCHOR_KINDS = ("text", "empty", "blank", "noise")
IMAGE_ANCHORS = ("blank", "noise")
# What an image anchor (blank, noise) changes when the config does not set it: with no anchor caption
# there is no teacher prediction to match (match: noise instead), and the terms that compare with
# eps_0(anchor caption) or train the anchor caption on the anchor image are off: the anchor
# regularizer would teach the empty prompt to draw blank canvases, the contrastive margin and the
# discriminator have no anchor prediction to compare with.
# The noise-based match was measured at 100 steps, so image anchors keep them (the 60-step default is
# measured for the model-based match, benchmarks/convergence.py).
IMAGE_ANCHOR_DEFAULTS = {"match": "noise", "w_reg": 0.0, "w_con": 0.0, "w_adv": 0.0, "steps": 100}
INITS = ("base", "closed-form")
MAX_PROMPT_CHARS = 1000


class ConfigError(ValueError):
    """A bad configuration value. `field` is the dotted path of the offending field."""

    def __init__(self, field: str, message: str):
        self.field, self.message = field, message
        super().__init__(f"{field}: {message}")

    def __reduce__(self):  # raised in a Ray worker, it must unpickle in the driver with both arguments
        return type(self), (self.field, self.message)


@dataclasses.dataclass
class ConceptSpec:
    """What to remove (`target`), what to draw instead (`anchor`), and what must survive."""

    target: str = "striped"
    anchor: str = "plain"  # the anchor concept's word (anchor_kind text); empty for the other kinds
    kind: str = "style"
    anchor_kind: str = "text"  # text | empty | blank | noise (ANCHOR_KINDS)
    name: str = ""  # a file-system-safe id; derived from target when empty
    # Captions that contain the target. Empty: built from `templates` or the toy world.
    prompts: list[str] = dataclasses.field(default_factory=list)
    prompt_file: str = ""  # one prompt per line, UTF-8
    # Templates with "{}" where the concept word goes, e.g. "a painting of a house, in the style of {}".
    templates: list[str] = dataclasses.field(default_factory=list)
    synonyms: list[str] = dataclasses.field(default_factory=list)  # other names of the target, used in training
    paraphrases: list[str] = dataclasses.field(default_factory=list)  # held out: used only to measure leakage
    # kind unsafe: the category's member words or phrases ("zorb", "kubo"); `target` then names the category
    members: list[str] = dataclasses.field(default_factory=list)
    # kind memorized: `target` is the caption that reproduces a training image, `reference_image` that
    # image (PNG/JPEG, the model's resolution), `anchor_prompts` paraphrases of the caption that the
    # ablation draws instead (`anchor` defaults to the first). An image replicates the reference when
    # its SSIM to it is >= replica_threshold: such anchor images are dropped, and the share of such
    # generations is the memorization rate.
    reference_image: str = ""
    anchor_prompts: list[str] = dataclasses.field(default_factory=list)
    replica_threshold: float = 0.7
    # Concepts that must survive. The defaults are the toy world's default style ablation.
    neighbours: list[str] = dataclasses.field(default_factory=lambda: ["dotted", "checkered"])
    # Also keep the k concepts nearest the target in the model's text conditioning (rayablate/neighbours.py):
    # chosen from `candidates`, or a toy world's named concepts, and added to `neighbours` before the run.
    auto_neighbours: int = 0
    candidates: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class AblationConfig:
    concept: ConceptSpec = dataclasses.field(default_factory=ConceptSpec)
    model: str = ""  # diffusers folder or hub id; empty = the bundled toy pipeline
    clip: str = ""  # open_clip "ARCH/PRETRAINED" or a folder; empty = the bundled toy CLIP
    # "train": the matcher is trained (the method); "closed-form": a one-shot least-squares edit of
    # the cross-attention keys/values (rayablate/closed_form.py), no training
    method: str = "train"
    closed_form_lambda: float = 10.0  # weight of the preservation captions in the closed-form edit
    closed_form_ridge: float = 1e-3  # pull towards the base weights, relative to the data's scale
    init: str = "base"  # where the trained matcher starts: base (the model's weights) | closed-form (the edit)
    # matcher
    param_group: str = "xattn-kv"
    lora_rank: int = 4
    # loss
    match: str = "model"
    w_match: float = 1.0
    w_reg: float = 1.0
    w_pres: float = 1.0
    w_con: float = 0.1
    w_adv: float = 0.02
    # unconditional preservation: eps_theta(z_t, "") = eps_0(z_t, "") on every row. Classifier-free
    # guidance multiplies any drift of that branch (robust mode turns it on, see ROBUST_DEFAULTS)
    w_uncond: float = 0.0
    # negative guidance (ESD's eta) of the model-based match: ablation rows match
    # eps_0(c) - eta * (eps_0(c*) - eps_0(c)), pushed away from the target, not only to the anchor.
    # With the empty anchor, eps_0("") alone still draws the target as often as the unconditional model does
    negative_guidance: float = 0.0
    margin: float = 0.01
    # cos(caption, concept prompt-ensemble) above which a row is an ablation row; 0.25 separates the
    # toy CLIP's target captions (>= 0.34) from the others (<= 0.20); real CLIPs sit higher (~0.7-0.8).
    clip_threshold: float = 0.25
    # robust ablation (rayablate/robust.py): an inner attacker's soft tokens become ablation rows
    robust: bool = False
    robust_vectors: int = 4  # soft tokens of the inner attacker
    # the inner attacker's starts: one set of soft tokens per entry (anchor word, target word, random),
    # refreshed in turn, each warm-started from its own last refresh
    robust_inits: list[str] = dataclasses.field(default_factory=lambda: ["anchor", "target", "random"])
    # one attacker per concept (its own set per start, keyed by each row's `concept` column): the
    # batch's joint run turns it on, as its rows hold many concepts
    robust_per_concept: bool = False
    robust_concepts_per_refresh: int = 1  # per concept: the step's least refreshed concepts each refresh trains (0: all)
    robust_every: int = 1  # refresh the attack every this many steps
    # inner Adam steps per refresh (warm-started from the last refresh), at robust_lr: 4 at 2e-2 hold the
    # inversions as 8 at 1e-2 did, in 0.7x the training time (docs/measurements.md, session 44)
    robust_inner_steps: int = 4
    robust_batch_size: int = 8  # rows per inner step (drawn from the step's ablation rows)
    robust_lr: float = 2e-2
    # inner timesteps in [robust_t_min, num_train_timesteps): the high-noise steps where an image's
    # identity is decided (an inversion on [400, 1000) brought a robust zorb back in 16 %, on [0, 1000) in 0 %:
    # an inner attacker on [0, 1000) spent its steps where attacks are weak)
    robust_t_min: int = 400
    w_robust: float = 3.0  # weight of the adversarial term (at 1: zorb 19 % attacked, at 3: 6 %)
    # "match": the attacked prediction must equal eps_0(anchor); "margin": be nearer it than eps_0(target) by robust_margin
    robust_loss: str = "margin"
    robust_margin: float = 0.01
    # robust mode multiplies w_pres and w_uncond by this (adversarial rows push on shared features). At 3
    # the robust style kept dotted and checkered at 0.96 on 96 images a group; at 5, 0.98 and 1.00, with
    # every inversion still at 6 % (docs/measurements.md, "Under attack")
    robust_pres_scale: float = 5.0
    # optimisation
    lr_matcher: float = 1e-3
    lr_disc: float = 2e-4
    # 60: the fewest steps that meet the default job's bar on both default concepts (target <= 0.02,
    # paraphrase <= 0.05, anchor and neighbours at 32 of 32) on two evaluation seeds; 40 and 50 lost one
    # dotted image in 32 on one of them (benchmarks/convergence.py; docs/measurements.md, "How many steps")
    steps: int = 60
    batch_size: int = 8
    seed: int = 0
    # data
    num_anchor_images: int = 64
    # Preservation rows (c_i, c_i): captions of the neighbours (half of them) and of other things.
    num_preservation_images: int = 32
    anchor_steps: int = 20
    guidance_scale: float = 4.0
    # scale-out
    zero_stage: int = 2
    num_workers: int = 2
    use_gpu: bool = False
    precision: str = "fp32"
    report_every: int = 20
    checkpoint_every: int = 100
    storage_path: str = ""  # Ray Train storage (local folder or s3://, gs://); empty = <output_dir>/ray
    # What anchor, before- and after-images are drawn in: auto | fp32 | bf16 (auto: bf16 on a CPU with
    # native bf16, else fp32; rayablate/sampling.py). Training's own precision is `precision`.
    sample_precision: str = "auto"
    # evaluation
    eval_images: int = 32
    eval_steps: int = 20
    eval_seed: int = 1000


# --- loading and validation -------------------------------------------------------------------

def _check_type(path: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(path, f"expected a list of {inner.__name__}, got {type(value).__name__} {value!r}")
        return [_check_type(f"{path}[{i}]", v, inner) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(tp)


def _from_dict(cls, data: Any, path: str):
    if not isinstance(data, dict):
        raise ConfigError(path or "config", f"expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        fpath = f"{path}.{key}" if path else str(key)
        if key not in fields:
            raise ConfigError(fpath, f"unknown key; allowed: {', '.join(sorted(fields))}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _from_dict(tp, value, fpath)
        else:
            kwargs[key] = _check_type(fpath, value, tp)
    return cls(**kwargs)


# What `robust: true` changes when the config does not set it (see docs/design.md#attacks-and-robust-ablation):
# the group whose to_q reads the image features, more (and heavier) preservation rows, a longer run.
# 128 preservation rows (half of them the neighbours'): at 64, the robust style delta drew 7 % of
# dotted zorbs plain (dotted kept 0.93 on 96 images); at 128, 1.00. 128 anchor images with them, so
# ablation rows stay half of every batch: with 64, a target-started inversion got striped back in 16 %
# (the inner attacker draws its rows from the step's ablation rows); with 128, 6 %.
ROBUST_DEFAULTS = {"param_group": "xattn", "num_anchor_images": 128, "num_preservation_images": 128, "steps": 200,
                   "w_pres": 10.0, "w_uncond": 30.0}


# kind memorized (docs/design.md#target-kinds). A memorized image is not in a few cross-attention
# weights: the paper fine-tunes the whole UNet. The match is noise-based because the frozen model's
# own prediction for an anchor paraphrase is pulled towards the memorized image too (on the toy
# world 62 % of "a zorb poster"-style anchors replicate it): the filtered anchor images are the
# target, not the teacher. Measured on configs/memorized_zorb_poster.yaml, in process, 100 steps,
# 16 images a group: this set took the caption and held-out paraphrases 1.00 -> 0.00 with zorb,
# striped and purple kept; the model-based match at lr 3e-4 left the caption at 0.38, at lr 1e-3
# it took it to 0.00 but zorb fell 0.88 -> 0.56.
MEMORIZED_DEFAULTS = {"param_group": "full", "match": "noise", "lr_matcher": 3e-4, "w_pres": 10.0, "w_con": 0.0,
                      "w_adv": 0.0, "steps": 100}


def apply_when_robust(data: dict, robust: bool | None = None) -> dict:
    """`data` without its `when_robust` mapping, whose fields are written over the top-level ones when
    the run is robust: `robust` where given (the command line's flag, or the batch's joint run), else
    `data`'s own `robust` (a concept file's settings for its robust runs: e.g. the v2 configs' `steps:
    100` is what their default runs were measured at, and would hold a robust run below robust mode's
    200). Its keys are checked either way, so a typo does not wait for the first robust run."""
    data = dict(data)
    extra = data.pop("when_robust", None)
    if extra is None:
        return data
    if not isinstance(extra, dict):
        raise ConfigError("when_robust", f"expected a mapping of config fields, got {type(extra).__name__}")
    fields = {f.name for f in dataclasses.fields(AblationConfig)} - {"concept", "robust", "model"}
    for key in extra:
        if key not in fields:
            raise ConfigError(f"when_robust.{key}", "unknown key (the concept, the model and robust itself are set "
                                                   f"at the top level); allowed: {', '.join(sorted(fields))}")
    if (data.get("robust") if robust is None else robust) is True:
        data.update(extra)
    return data


def config_from_dict(data: dict) -> AblationConfig:
    """Build and validate a config from a plain dict (YAML's shape). With `robust: true`, the fields
    of its `when_robust` mapping are written over the top-level ones, then the fields of
    ROBUST_DEFAULTS that `data` still does not set take those values."""
    data = apply_when_robust(data or {})
    if data.get("robust") is True:
        for k, v in ROBUST_DEFAULTS.items():
            data.setdefault(k, v)
    concept = data.get("concept")
    if isinstance(concept, dict) and concept.get("kind") == "unsafe" and "anchor" not in concept:
        data["concept"] = concept = {"anchor_kind": "empty", **concept}  # a category's default anchor
    if isinstance(concept, dict) and concept.get("kind") == "memorized":
        for k, v in MEMORIZED_DEFAULTS.items():
            data.setdefault(k, v)
        if "anchor" not in concept:
            first = [a for a in concept.get("anchor_prompts") or [] if isinstance(a, str) and a.strip()]
            data["concept"] = concept = {"anchor": first[0] if first else "", **concept}
    if isinstance(concept, dict) and concept.get("anchor_kind", "text") in ANCHOR_KINDS[1:]:
        data["concept"] = concept = {"anchor": "", **concept}  # no anchor word unless one is given (refused)
        if concept["anchor_kind"] in IMAGE_ANCHORS:
            for k, v in IMAGE_ANCHOR_DEFAULTS.items():
                data.setdefault(k, v)
    cfg = _from_dict(AblationConfig, data, "")
    validate(cfg)
    return cfg


def read_text_file(path: str | Path, field: str, what: str = "file") -> str:
    """A UTF-8 text file's contents; a missing, unreadable or non-UTF-8 file raises ConfigError naming `field`."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(field, f"{what} does not exist: {p}")
    if not p.is_file():
        raise ConfigError(field, f"{p} is not a file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(field, f"{what} {p} is not UTF-8 text: {e}") from e
    except PermissionError as e:
        raise ConfigError(field, f"{p} is not readable: {e.strerror}") from e


def read_yaml_mapping(path: str | Path, field: str = "config", what: str = "file") -> dict:
    """A YAML file's top-level mapping (empty file: {}), read with `yaml.safe_load`. Every problem
    (missing, not a file, not UTF-8, unreadable, malformed, a tag that would build objects, not a
    mapping) raises ConfigError naming `field`. The one loader of the concept, batch and tune files."""
    p = Path(path)
    text = read_text_file(p, field, what)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.constructor.ConstructorError as e:
        # e.g. !!python/object/apply: safe_load builds no Python objects, so no code can run.
        raise ConfigError(field, f"malformed YAML in {p}: it uses a YAML tag that would construct objects; "
                                 f"configs are plain data (yaml.safe_load) and never evaluate code: {e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(field, f"malformed YAML in {p}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(field, f"{p} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def nest_overrides(overrides: dict[str, Any] | None, into: dict | None = None) -> dict:
    """Dotted-key overrides ({"concept.target": "x"}) written into a nested dict; None values are skipped."""
    data = into if into is not None else {}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> AblationConfig:
    """Load YAML (or the defaults when `path` is None), apply dotted-key `overrides`, validate. The
    file's `when_robust` fields apply when the file or `overrides` turn robust on, below the overrides."""
    data = read_yaml_mapping(path) if path is not None else {}
    data = apply_when_robust(data, (overrides or {}).get("robust"))
    return config_from_dict(nest_overrides(overrides, data))


def to_dict(cfg: AblationConfig) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: AblationConfig, path: str | Path) -> Path:
    from .files import write_text

    return write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def concept_name(spec: ConceptSpec) -> str:
    """The concept's file-system-safe id."""
    if spec.name:
        return spec.name
    return re.sub(r"[^A-Za-z0-9]+", "-", spec.target).strip("-").lower()[:64] or "concept"


def _validate_memorized(c: ConceptSpec) -> None:
    if not c.reference_image.strip():
        raise ConfigError("concept.reference_image", "kind memorized needs the memorized image (a PNG or JPEG file): "
                                                     "generations are measured against it, and anchor images "
                                                     "that replicate it are dropped")
    if c.anchor_kind != "text":
        raise ConfigError("concept.anchor_kind", f"kind memorized draws paraphrases of the caption instead "
                                                 f"(concept.anchor_prompts); got anchor_kind {c.anchor_kind}")
    if not c.anchor.strip() and not any(a.strip() for a in c.anchor_prompts):
        raise ConfigError("concept.anchor_prompts", "kind memorized needs paraphrases of the caption to draw instead, "
                                                    "e.g. anchor_prompts: ['a poster of a zorb', 'a zorb picture']")
    for i, a in enumerate(c.anchor_prompts):
        if not a.strip():
            raise ConfigError(f"concept.anchor_prompts[{i}]", "is empty")
        if a.strip().lower() == c.target.strip().lower():
            raise ConfigError(f"concept.anchor_prompts[{i}]", f"is the memorized caption itself ({c.target!r})")
    if not (0 < c.replica_threshold <= 1):
        raise ConfigError("concept.replica_threshold", f"an SSIM in (0, 1], got {c.replica_threshold}")


def validate(cfg: AblationConfig, *, cuda_available: bool | None = None) -> AblationConfig:
    """Check every field once; raise ConfigError naming the first bad one."""
    c = cfg.concept
    if not c.target.strip():
        raise ConfigError("concept.target", "must not be empty")
    if c.anchor_kind not in ANCHOR_KINDS:
        raise ConfigError("concept.anchor_kind", f"unknown anchor kind {c.anchor_kind!r}; allowed: "
                                                 f"{', '.join(ANCHOR_KINDS)}")
    if c.kind == "memorized":
        _validate_memorized(c)
    if c.anchor_kind == "text" and not c.anchor.strip():
        raise ConfigError("concept.anchor", "must not be empty (or set concept.anchor_kind: empty for the empty "
                                            "prompt, blank or noise for an anchor image)")
    if c.anchor_kind != "text" and c.anchor.strip():
        raise ConfigError("concept.anchor", f"anchor_kind {c.anchor_kind} has no anchor word, got {c.anchor!r}: "
                                            "leave concept.anchor out, or use anchor_kind: text")
    if c.anchor_kind == "text" and c.target.strip().lower() == c.anchor.strip().lower():
        raise ConfigError("concept.anchor", f"must differ from concept.target (both are {c.target!r})")
    if c.kind not in KINDS:
        raise ConfigError("concept.kind", f"unknown kind {c.kind!r}; allowed: {', '.join(KINDS)}")
    if c.kind == "unsafe" and not [m for m in c.members if m.strip()]:
        raise ConfigError("concept.members", "kind unsafe needs the category's member words, e.g. "
                                             "members: [zorb, kubo] (concept.target then names the category)")
    if c.members and c.kind != "unsafe":
        raise ConfigError("concept.members", f"only kind unsafe has members (kind is {c.kind}); "
                                             "for one concept word, set concept.target")
    for i, m in enumerate(c.members):
        if not m.strip():
            raise ConfigError(f"concept.members[{i}]", "is empty")
    if c.kind == "prompt" and len(c.target.split()) < 2:
        raise ConfigError("concept.target", f"kind prompt removes a composition of words, e.g. 'striped zorb'; "
                                            f"got one word {c.target!r} (use kind style or instance)")
    if c.name and (not _SAFE_NAME.match(c.name) or ".." in c.name):
        raise ConfigError("concept.name", f"{c.name!r} is not a safe name: use letters, digits, '-', '_', '.' "
                                          "(no '/' or '..'), at most 64 characters")
    for i, p in enumerate(c.prompts):
        if not p.strip():
            raise ConfigError(f"concept.prompts[{i}]", "is empty")
        if len(p) > MAX_PROMPT_CHARS:
            raise ConfigError(f"concept.prompts[{i}]", f"is {len(p)} characters long; at most {MAX_PROMPT_CHARS}")
    if c.auto_neighbours < 0 or c.auto_neighbours > 64:
        raise ConfigError("concept.auto_neighbours", f"expected an integer from 0 (off) to 64, got {c.auto_neighbours}")
    for i, w in enumerate(c.candidates):
        if not w.strip():
            raise ConfigError(f"concept.candidates[{i}]", "is empty")
    for i, t in enumerate(c.templates):
        if "{}" not in t:
            raise ConfigError(f"concept.templates[{i}]", f"must contain '{{}}' where the concept goes: {t!r}")
    if cfg.method not in METHODS:
        raise ConfigError("method", f"unknown method {cfg.method!r}; allowed: {', '.join(METHODS)}")
    if cfg.method == "closed-form":
        if cfg.robust:
            raise ConfigError("method", "robust: true trains against an inner attacker; the closed-form edit has "
                                        "no training to make robust (use method: train)")
        for name in ("closed_form_lambda", "closed_form_ridge"):
            v = getattr(cfg, name)
            if not (v >= 0) or not math.isfinite(v):
                raise ConfigError(name, f"must be a finite number >= 0, got {v}")
    if cfg.param_group not in PARAM_GROUPS:
        raise ConfigError("param_group", f"unknown parameter group {cfg.param_group!r}; allowed: {', '.join(PARAM_GROUPS)}")
    if cfg.init not in INITS:
        raise ConfigError("init", f"unknown init {cfg.init!r}; allowed: {', '.join(INITS)}")
    if cfg.init == "closed-form" and cfg.param_group not in ("xattn-kv", "xattn", "full"):
        raise ConfigError("init", f"closed-form starts from an edit of the cross-attention keys/values, which group "
                                  f"{cfg.param_group!r} does not train; use xattn-kv, xattn or full")
    if cfg.match not in MATCH_MODES:
        raise ConfigError("match", f"unknown match mode {cfg.match!r}; allowed: {', '.join(MATCH_MODES)}")
    _validate_image_anchor(cfg)
    if cfg.robust and cfg.concept.anchor_kind != "text":
        # the inner attacker puts its tokens where the caption differs from its anchor caption, and
        # starts one set from the anchor word: neither exists for an empty or image anchor
        raise ConfigError("robust", f"robust ablation needs a text anchor (anchor_kind text), got anchor_kind "
                                    f"{cfg.concept.anchor_kind}")
    for name in ("lr_matcher", "lr_disc"):
        v = getattr(cfg, name)
        if not (v > 0) or not math.isfinite(v):
            raise ConfigError(name, f"must be a finite number > 0, got {v}")
    if cfg.negative_guidance and cfg.match != "model":
        raise ConfigError("negative_guidance", f"shapes the model-based match's target; match is {cfg.match!r}: "
                                               "set match: model or negative_guidance: 0")
    for name in ("w_match", "w_reg", "w_pres", "w_con", "w_adv", "w_uncond", "margin", "negative_guidance"):
        v = getattr(cfg, name)
        if not (v >= 0) or not math.isfinite(v):
            raise ConfigError(name, f"must be a finite number >= 0, got {v}")
    if not -1.0 <= cfg.clip_threshold <= 1.0:
        raise ConfigError("clip_threshold", f"must lie in [-1, 1] (a cosine similarity), got {cfg.clip_threshold}")
    if cfg.zero_stage not in (0, 1, 2, 3):
        raise ConfigError("zero_stage", f"DeepSpeed ZeRO stage must be 0, 1, 2 or 3, got {cfg.zero_stage}")
    if cfg.precision not in PRECISIONS:
        raise ConfigError("precision", f"unknown precision {cfg.precision!r}; allowed: {', '.join(PRECISIONS)}")
    if cfg.precision == "fp16":
        if not cfg.use_gpu:
            raise ConfigError("precision", "fp16 is not supported on CPU (DeepSpeed refuses it); use fp32 or bf16")
        if cuda_available is None:
            import torch

            cuda_available = torch.cuda.is_available()
        if not cuda_available:
            raise ConfigError("precision", "fp16 needs a GPU and none is visible; use fp32 or bf16")
    if cfg.sample_precision not in SAMPLE_PRECISIONS:
        raise ConfigError("sample_precision", f"unknown sample precision {cfg.sample_precision!r}; allowed: "
                                              f"{', '.join(SAMPLE_PRECISIONS)}")
    for name in ("steps", "batch_size", "num_workers", "num_anchor_images", "anchor_steps", "eval_images",
                 "eval_steps", "report_every", "checkpoint_every", "lora_rank"):
        if getattr(cfg, name) < 1:
            raise ConfigError(name, f"must be >= 1, got {getattr(cfg, name)}")
    if cfg.num_preservation_images < 0:
        raise ConfigError("num_preservation_images", f"must be >= 0, got {cfg.num_preservation_images}")
    if cfg.guidance_scale < 1.0:
        raise ConfigError("guidance_scale", f"must be >= 1, got {cfg.guidance_scale}")
    _validate_robust(cfg)
    return cfg


def _validate_image_anchor(cfg: AblationConfig) -> None:
    """blank / noise anchors are images with no caption: what needs an anchor caption is refused."""
    kind = cfg.concept.anchor_kind
    if kind not in IMAGE_ANCHORS:
        return
    why = f"anchor_kind {kind} is an image with no anchor caption"
    if cfg.method == "closed-form" or cfg.init == "closed-form":
        raise ConfigError("method" if cfg.method == "closed-form" else "init",
                          f"{why}, and the closed-form edit maps captions to the anchor caption's keys/values; "
                          "use anchor_kind text or empty, or method: train with init: base")
    if cfg.match == "model":
        raise ConfigError("match", f"{why}: the model-based match needs eps_0(anchor caption) as its teacher; "
                                   "use match: noise (the default for image anchors)")
    for name, what in (("w_reg", "would train the empty caption to draw the anchor image"),
                       ("w_con", "compares with eps_0(anchor caption)"),
                       ("w_adv", "compares with the teacher's anchor prediction")):
        if getattr(cfg, name) > 0:
            raise ConfigError(name, f"{why}: this term {what}; set {name}: 0 (the default for image anchors)")


def _validate_robust(cfg: AblationConfig) -> None:
    for name in ("robust_vectors", "robust_every", "robust_inner_steps", "robust_batch_size"):
        if getattr(cfg, name) < 1:
            raise ConfigError(name, f"must be >= 1, got {getattr(cfg, name)}")
    if cfg.robust_concepts_per_refresh < 0:
        raise ConfigError("robust_concepts_per_refresh", f"must be >= 0 (0: every concept of the step), "
                                                        f"got {cfg.robust_concepts_per_refresh}")
    bad = [x for x in cfg.robust_inits if x not in ROBUST_INITS]
    if not cfg.robust_inits or bad:
        raise ConfigError("robust_inits", f"must be a non-empty list of {', '.join(ROBUST_INITS)}; got {cfg.robust_inits}")
    if not (cfg.robust_lr > 0) or not math.isfinite(cfg.robust_lr):
        raise ConfigError("robust_lr", f"must be a finite number > 0, got {cfg.robust_lr}")
    if cfg.robust_loss not in ("match", "margin"):
        raise ConfigError("robust_loss", f"unknown robust loss {cfg.robust_loss!r}; allowed: match, margin")
    for name in ("w_robust", "robust_pres_scale", "robust_margin"):
        v = getattr(cfg, name)
        if not (v >= 0) or not math.isfinite(v):
            raise ConfigError(name, f"must be a finite number >= 0, got {v}")
    if not 0 <= cfg.robust_t_min < 1000:
        raise ConfigError("robust_t_min", f"must lie in [0, 1000), got {cfg.robust_t_min}")
    if cfg.robust and cfg.param_group == "embedding":
        raise ConfigError("param_group", "robust: true trains a UNet group (xattn-kv, xattn, full or lora): an "
                                         "attacker controls the text conditioning, so editing the text encoder "
                                         "alone cannot hold (see docs/design.md#robust-ablation)")
