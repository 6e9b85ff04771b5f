"""The bad-input catalogue (README, "Bad-input catalogue"): every case ends with one `error: ...`
line naming the problem, exit code 2 and no output, through the real CLI (`rayablate.cli.main`),
in process. Plus the security rules: safetensors only, no code from configs or checkpoints.

Elsewhere in the catalogue: tests/test_jobs.py runs six cases through `python jobs/train.py` (a
missing model path, lr 0, an unknown parameter group, target == anchor, an empty prompt file, an
undecodable parquet image), tests/test_train.py stops a run on a non-finite loss and checks
that it exits 2 through the CLI.
"""
from __future__ import annotations

import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rayablate.cli import main
from rayablate.images import encode_png
from rayablate.toyworld import bundle_paths

ROOT = Path(__file__).resolve().parents[1]
SD = bundle_paths()["sd"]  # the bundled toy pipeline: 32x32 images, a 24-token tokenizer


class Payload:
    """A pickle that, if unpickled, creates a marker file: proof that no code ran when it stays absent."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# --- inputs ------------------------------------------------------------------------------------

def yaml_file(text: str):
    def make(tmp: Path):
        p = tmp / "c.yaml"
        p.write_text(text.replace("{tmp}", str(tmp)))
        return ["--config", str(p)]
    return make


def raw_file(name: str, data: bytes, flag: str = "--config"):
    def make(tmp: Path):
        (tmp / name).write_bytes(data)
        return [flag, str(tmp / name)]
    return make


def flags(*args: str):
    return lambda tmp: list(args)


def prompt_file(data: bytes | None):
    def make(tmp: Path):
        if data is not None:
            (tmp / "prompts.txt").write_bytes(data)
        (tmp / "c.yaml").write_text(f"concept:\n  target: Van Gogh\n  anchor: painting\n"
                                    f"  prompt_file: {tmp / 'prompts.txt'}\n")
        return ["--config", str(tmp / "c.yaml")]
    return make


def model_dir(edit):
    """A copy of the bundled toy pipeline, changed by `edit(path)`."""
    def make(tmp: Path):
        m = tmp / "model"
        shutil.copytree(SD, m)
        edit(m)
        return ["--model", str(m)]
    return make


def pickled_unet(m: Path):
    (m / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with open(m / "unet" / "diffusion_pytorch_model.bin", "wb") as f:
        pickle.dump(Payload(m.parent / "pwned"), f)


def png(size: int = 32, seed: int = 0) -> bytes:
    return encode_png(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def user_parquet(**columns):
    def make(tmp: Path):
        pq.write_table(pa.table(columns), tmp / "user.parquet")
        return ["--user-data", str(tmp / "user.parquet")]
    return make


def user_folder(caption: bytes | None):
    def make(tmp: Path):
        d = tmp / "pairs"
        d.mkdir()
        (d / "a.png").write_bytes(png())
        if caption is not None:
            (d / "a.txt").write_bytes(caption)
        return ["--user-data", str(d)]
    return make


def delta_file(make_delta):
    """`evaluate --delta FILE` on the bundled pipeline."""
    def make(tmp: Path):
        p = tmp / "delta.safetensors"
        make_delta(p, tmp)
        return ["--delta", str(p)]
    return make


def safetensors_delta(tensors: dict, fmt: str | None = "rayablate-delta/1"):
    def write(p: Path, tmp: Path):
        from safetensors.torch import save_file

        save_file(tensors, str(p), metadata={"format": fmt} if fmt else None)
    return write


def pickle_delta(p: Path, tmp: Path):
    torch.save({"unet.x": torch.zeros(2), "hook": Payload(tmp / "pwned")}, p)


KV = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"  # 128x64 in the toy UNet

# (id, command, inputs, message): the README's catalogue lists the same cases.
def reference_folder(size: int):
    """A folder with one reference image of the concept, `size` pixels square."""
    def make(tmp: Path):
        (tmp / "refs").mkdir()
        (tmp / "refs" / "a.png").write_bytes(png(size))
        return ["--references", str(tmp / "refs")]
    return make


CATALOGUE = [
    # configuration file
    ("yaml-malformed", "train", yaml_file("concept: [striped\n"), r"config: malformed YAML in .*c\.yaml"),
    ("yaml-not-a-mapping", "train", yaml_file("- striped\n- plain\n"), r"must hold a mapping at the top level"),
    ("yaml-python-tag", "train", yaml_file("steps: !!python/object/apply:os.system ['touch {tmp}/pwned']\n"),
     r"YAML tag that would construct objects.*never evaluate code"),
    ("config-missing", "train", flags("--config", "/definitely/not/here.yaml"), r"config: file does not exist"),
    ("config-not-utf8", "train", raw_file("c.yaml", b"steps: 3\n# \xff\xfe\n"), r"config: .* is not UTF-8 text"),
    ("config-is-a-folder", "train", lambda tmp: ["--config", str(tmp)], r"config: .* is not a file"),
    ("unknown-key", "train", yaml_file("stepz: 3\n"), r"stepz: unknown key; allowed: .*steps"),
    ("unknown-nested-key", "train", yaml_file("concept:\n  targt: zorb\n"), r"concept\.targt: unknown key"),
    ("when-robust-unknown-key", "train", yaml_file("when_robust:\n  stepz: 3\n"),
     r"when_robust\.stepz: unknown key .*allowed: .*steps"),
    ("wrong-type-int", "train", yaml_file("steps: ten\n"), r"steps: expected an integer, got 'ten'"),
    ("wrong-type-float-for-int", "train", yaml_file("batch_size: 2.5\n"), r"batch_size: expected an integer"),
    ("wrong-type-list", "train", yaml_file("concept:\n  neighbours: dotted\n"), r"concept\.neighbours: expected a list"),
    ("wrong-type-bool", "train", yaml_file("use_gpu: 'yes'\n"), r"use_gpu: expected true or false"),
    ("wrong-type-section", "train", yaml_file("concept: striped\n"), r"concept: expected a mapping"),
    ("missing-target", "train", yaml_file("concept:\n  target: ''\n"), r"concept\.target: must not be empty"),
    ("missing-prompts", "train", yaml_file("concept:\n  target: Van Gogh\n  anchor: painting\n"),
     r"concept\.prompts: no prompts for 'Van Gogh'"),
    # concept and prompts
    ("target-equals-anchor", "train", flags("--target", "PLAIN"), r"concept\.anchor: must differ from concept\.target"),
    ("empty-prompt", "train", yaml_file("concept:\n  prompts: ['a striped circle', '  ']\n"),
     r"concept\.prompts\[1\]: is empty"),
    ("prompt-over-1000-chars", "train", yaml_file("concept:\n  prompts: ['" + "striped " * 130 + "']\n"),
     r"concept\.prompts\[0\]: is 1040 characters long; at most 1000"),
    ("prompt-over-token-limit", "train", yaml_file("concept:\n  prompts: ['" + "a striped red circle " * 8 + "']\n"),
     r"concept\.prompts\[0\]: is \d+ tokens long; the model's tokenizer takes at most 24 .*cut off"),
    ("template-over-token-limit", "train",
     yaml_file("concept:\n  templates: ['" + "a red circle " * 10 + "{}']\n"), r"concept\.templates\[0\]: is \d+ tokens"),
    ("template-without-slot", "train", yaml_file("concept:\n  templates: ['a striped circle']\n"),
     r"concept\.templates\[0\]: must contain '\{\}'"),
    ("prompt-file-missing", "train", prompt_file(None), r"concept\.prompt_file: prompt file does not exist"),
    ("prompt-file-not-utf8", "train", prompt_file(b"a painting by \xff\xfe\n"), r"prompt file .* is not UTF-8"),
    ("concept-name-dotdot", "train", yaml_file("concept:\n  name: ../../escape\n"),
     r"concept\.name: '\.\./\.\./escape' is not a safe name.*no '/' or '\.\.'"),
    ("concept-name-slash", "train", yaml_file("concept:\n  name: a/b\n"), r"concept\.name: 'a/b' is not a safe name"),
    # anchor kinds
    ("anchor-kind-unknown", "train", flags("--anchor-kind", "photo"), r"concept\.anchor_kind: unknown anchor kind 'photo'"),
    ("blank-anchor-model-match", "train", yaml_file("concept:\n  anchor_kind: blank\nmatch: model\n"),
     r"match: anchor_kind blank is an image with no anchor caption: the model-based match needs eps_0"),
    ("empty-anchor-with-word", "train", yaml_file("concept:\n  anchor_kind: empty\n  anchor: plain\n"),
     r"concept\.anchor: anchor_kind empty has no anchor word"),
    ("noise-anchor-contrastive", "train", yaml_file("concept:\n  anchor_kind: noise\nw_con: 0.1\n"),
     r"w_con: anchor_kind noise is an image with no anchor caption"),
    # target kinds
    ("unsafe-no-members", "train", flags("--kind", "unsafe", "--target", "faces"),
     r"concept\.members: kind unsafe needs the category's member words"),
    ("members-not-unsafe", "train", flags("--members", "zorb,kubo"), r"concept\.members: only kind unsafe has members"),
    ("prompt-one-word", "train", flags("--kind", "prompt"), r"concept\.target: kind prompt removes a composition"),
    ("memorized-no-reference", "train", flags("--kind", "memorized", "--target", "the zorb poster"),
     r"concept\.reference_image: kind memorized needs the memorized image"),
    ("memorized-reference-not-an-image", "train", flags("--kind", "memorized", "--target", "the zorb poster",
                                                        "--reference-image", "README.md", "--anchor-prompts", "a zorb"),
     r"concept\.reference_image: README\.md is not a readable image"),
    # values
    ("steps-zero", "train", flags("--steps", "0"), r"steps: must be >= 1, got 0"),
    ("workers-zero", "train", flags("--num-workers", "0"), r"num_workers: must be >= 1"),
    ("lr-nan", "train", flags("--lr-matcher", "nan"), r"lr_matcher: must be a finite number > 0, got nan"),
    ("lr-inf", "train", flags("--lr-disc", "inf"), r"lr_disc: must be a finite number > 0, got inf"),
    ("zero-stage-4", "train", flags("--zero-stage", "4"), r"zero_stage: DeepSpeed ZeRO stage must be 0, 1, 2 or 3"),
    ("fp16-on-cpu", "train", flags("--precision", "fp16"), r"precision: fp16 is not supported on CPU"),
    ("sample-precision-fp16", "train", flags("--sample-precision", "fp16"),
     r"sample_precision: unknown sample precision 'fp16'; allowed: auto, fp32, bf16"),
    ("clip-threshold-2", "train", flags("--clip-threshold", "2"), r"clip_threshold: must lie in \[-1, 1\]"),
    # model
    ("model-not-a-pipeline", "train", lambda tmp: (tmp / "m").mkdir() or ["--model", str(tmp / "m")],
     r"not a diffusers pipeline \(no model_index\.json\)"),
    ("model-is-a-file", "train", raw_file("model.ckpt", b"\0" * 16, "--model"), r"not a diffusers pipeline \(a file"),
    ("model-index-garbage", "train", model_dir(lambda m: (m / "model_index.json").write_text("{not json")),
     r"unreadable model_index\.json"),
    ("model-without-unet-config", "train", model_dir(lambda m: (m / "unet" / "config.json").unlink()),
     r"unet/config\.json is missing"),
    ("model-pickled-weights", "train", model_dir(pickled_unet),
     r"holds only pickled weights \(diffusion_pytorch_model\.bin\); rayablate loads safetensors only"),
    # delta (evaluate)
    ("delta-missing", "evaluate", flags("--delta", "/definitely/not/here.safetensors"), r"delta file does not exist"),
    ("delta-pickle", "evaluate", delta_file(pickle_delta), r"not a safetensors file \(pickled checkpoints are refused"),
    ("delta-not-rayablate", "evaluate", delta_file(safetensors_delta({KV: torch.zeros(128, 64)}, fmt=None)),
     r"is not a rayablate delta"),
    ("delta-other-architecture-shape", "evaluate", delta_file(safetensors_delta({KV: torch.zeros(320, 768)})),
     r"delta for another architecture: tensor .*attn2\.to_k\.weight' has shape \(320, 768\), the model's has \(128, 64\)"),
    ("delta-other-architecture-name", "evaluate",
     delta_file(safetensors_delta({"unet.down_blocks.9.attn2.to_k.weight": torch.zeros(4, 4)})),
     r"delta for another architecture: tensor 'unet\.down_blocks\.9\.attn2\.to_k\.weight' does not exist"),
    ("delta-other-component", "evaluate", delta_file(safetensors_delta({"text_encoder_2.w": torch.zeros(2)})),
     r"delta for another architecture: it changes component 'text_encoder_2'"),
    # user data
    ("user-data-missing", "train", flags("--user-data", "/definitely/not/here.parquet"), r"user data does not exist"),
    ("parquet-missing-column", "train", user_parquet(image=[png()]), r"user\.parquet lacks column\(s\) caption"),
    ("parquet-not-parquet", "train", raw_file("user.parquet", b"PAR1 not really", "--user-data"),
     r"is not a readable parquet file"),
    ("parquet-mixed-sizes", "train", user_parquet(image=[png(32), png(16, 1)], caption=["a red circle", "a square"]),
     r"user\.parquet row 1: image is 16x16, the model's resolution is 32x32"),
    ("parquet-empty-caption", "train", user_parquet(image=[png()], caption=[" "]), r"row 0: caption is empty"),
    ("parquet-image-not-bytes", "train", user_parquet(image=["a string"], caption=["a red circle"]),
     r"row 0: image is not bytes"),
    ("folder-image-without-caption", "train", user_folder(None), r"a\.png has no caption file a\.txt"),
    ("folder-caption-not-utf8", "train", user_folder(b"a red \xff circle"), r"a\.txt is not UTF-8 text"),
    # attack and robust mode
    ("attack-num-vectors-zero", "attack", flags("--num-vectors", "0"), r"attack\.num_vectors: must be >= 1, not 0"),
    ("attack-unknown-kind", "attack", flags("--attacks", "inversion,jailbreak"), r"--attacks: unknown attack"),
    ("attack-seeds-not-integers", "attack", flags("--attack-seeds", "0,one"),
     r"--attack-seeds: must be integers >= 0, comma-separated, not '0,one'"),
    ("attack-references-empty", "attack", lambda tmp: (tmp / "refs").mkdir() or ["--references", str(tmp / "refs")],
     r"--references: .*refs holds no images"),
    ("attack-references-wrong-size", "attack", reference_folder(16),
     r"--references: .*a\.png is 16x16; the pipeline draws 32x32"),
    ("robust-text-encoder-group", "train", flags("--robust", "--param-group", "embedding"),
     r"param_group: robust: true trains a UNet group"),
    ("robust-vectors-zero", "train", yaml_file("robust: true\nrobust_vectors: 0\n"), r"robust_vectors: must be >= 1"),
    ("robust-unknown-init", "train", yaml_file("robust: true\nrobust_inits: [anchor, sideways]\n"),
     r"robust_inits: must be a non-empty list of anchor, target, random"),
    ("robust-concepts-per-refresh-negative", "train", yaml_file("robust: true\nrobust_concepts_per_refresh: -1\n"),
     r"robust_concepts_per_refresh: must be >= 0 \(0: every concept of the step\)"),
    # the closed-form edit
    ("method-unknown", "train", flags("--method", "uce"), r"method: unknown method 'uce'; allowed: train, closed-form"),
    ("closed-form-robust", "train", flags("--method", "closed-form", "--robust"), r"method: robust: true trains"),
    ("closed-form-init-lora", "train", flags("--matcher-init", "closed-form", "--param-group", "lora"),
     r"init: closed-form starts from an edit of the cross-attention keys/values"),
    # output folder
    ("output-is-a-file", "train", None, r"output path exists and is not a folder"),
    ("output-under-a-file", "train", None, r"would lie under .*, which is a file"),
    ("output-not-writable", "train", None, r"output folder is not writable"),
]


@pytest.fixture
def no_ray(monkeypatch):
    """Bad input must be refused before Ray starts: starting it here fails the test at once."""
    import rayablate.job

    def refuse(*a, **k):
        raise AssertionError("a bad input got past validation: Ray was about to start")

    monkeypatch.setattr(rayablate.job, "init_ray", refuse)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def output_path(case: str, tmp: Path) -> Path:
    if case == "output-is-a-file":
        (tmp / "out").write_text("keep me\n")
        return tmp / "out"
    if case == "output-under-a-file":
        (tmp / "file").write_text("keep me\n")
        return tmp / "file" / "out"
    if case == "output-not-writable":
        if os.geteuid() == 0:  # root writes through permission bits; /proc takes no new files from anyone
            return Path("/proc/rayablate-output-test")
        (tmp / "ro").mkdir()
        (tmp / "ro").chmod(0o555)
        return tmp / "ro" / "out"
    return tmp / "out"


@pytest.mark.parametrize("case,command,make,message", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_input_exits_2_names_the_problem_and_writes_nothing(case, command, make, message, tmp_path, capsys,
                                                                no_ray):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    args = make(inputs) if make else []
    out = output_path(case, tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    rc = main([command, *args, "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and err.startswith("error: "), err
    assert re.search(message, err, re.S), err
    # no output: nothing new anywhere under tmp_path (the output folder included), and no code ran
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert not (inputs / "pwned").exists() and not (tmp_path / "pwned").exists()
    if case == "output-is-a-file":
        assert out.read_text() == "keep me\n"
    elif not out.exists():
        pass
    else:
        pytest.fail(f"{out} was created")


def test_catalogue_is_large_enough_and_listed_in_the_readme():
    ids = [c[0] for c in CATALOGUE]
    assert len(ids) == len(set(ids)) and len(ids) >= 25
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Bad-input catalogue", 1)[1].split("\n## ", 1)[0]
    missing = [i for i in ids if f"`{i}`" not in section]
    assert not missing, f"README's catalogue lacks {missing}"


@pytest.mark.parametrize("argv,message", [
    (["--stepz", "3"], "unrecognized arguments: --stepz"),
    (["--steps", "ten"], "argument --steps/--max_train_steps: invalid int value: 'ten'"),
], ids=["unknown-flag", "flag-wrong-type"])
def test_bad_flags_exit_2(argv, message, tmp_path, capsys, no_ray):
    with pytest.raises(SystemExit) as e:
        main(["train", *argv, "--output-dir", str(tmp_path / "out")])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_concept_names_derived_from_targets_stay_inside_the_output_folder():
    from rayablate.config import ConceptSpec, concept_name

    for target, name in [("../../etc/passwd", "etc-passwd"), ("/abs/path", "abs-path"), ("..", "concept"),
                         ("Van Gogh", "van-gogh")]:
        got = concept_name(ConceptSpec(target=target))
        assert got == name and "/" not in got and ".." not in got, (target, got)


@pytest.mark.slow  # a subprocess that imports torch and diffusers: ~10 s alone, more on a busy machine
def test_evaluate_job_refuses_a_pickled_delta_with_exit_2(tmp_path):
    """The real script, as a user runs it: the exit status is the script's, and the pickle never loads."""
    torch.save({"unet.x": torch.zeros(2), "hook": Payload(tmp_path / "pwned")}, tmp_path / "delta.pt")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run([sys.executable, "jobs/evaluate.py", "--delta", str(tmp_path / "delta.pt"), "--output-dir",
                        str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "pickled checkpoints are refused" in r.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "pwned").exists()


# --- security -----------------------------------------------------------------------------------

SOURCES = [p for d in ("rayablate", "jobs", "benchmarks") for p in (ROOT / d).rglob("*.py")]


def test_sources_load_weights_safely():
    """Every torch.load passes weights_only=True; nothing passes trust_remote_code, uses yaml.load
    without SafeLoader, or unpickles."""
    assert SOURCES
    problems = []
    for path in SOURCES:
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in m.group(1):
                problems.append(f"{path}: {m.group(0)}")
        for bad in (r"trust_remote_code", r"yaml\.load\(", r"yaml\.unsafe_load", r"pickle\.loads?\(",
                    r"yaml\.(Unsafe|Full)?Loader\b", r"(?<![.\w])eval\(", r"(?<![.\w])exec\("):
            for m in re.finditer(bad, text):
                problems.append(f"{path}: {m.group(0)}")
    assert not problems, problems


def test_pipeline_with_pickled_weights_is_refused_without_unpickling(tmp_path):
    from rayablate.pipeline import PipelineLoadError, load_pipeline

    m = tmp_path / "model"
    shutil.copytree(SD, m)
    pickled_unet(m)
    with pytest.raises(PipelineLoadError, match="could not load diffusers pipeline"):
        load_pipeline(m)  # diffusers with use_safetensors=True: the .bin is never opened
    assert not (tmp_path / "pwned").exists()


def test_deepspeed_checkpoint_files_load_weights_only(tmp_path):
    """Resuming reads DeepSpeed's files through `weights_only_load`: a tampered one runs no code."""
    from rayablate.train import weights_only_load

    bad = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(2)}, "hook": Payload(tmp_path / "pwned")}, bad)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        weights_only_load(bad)
    assert not (tmp_path / "pwned").exists()
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    good = tmp_path / "optim_states.pt"  # what ZeRO-2 writes: tensors plus DeepSpeed's records
    torch.save({"optimizer_state_dict": {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients,
                                         "state": {0: {"exp_avg": torch.zeros(3)}}}, "ds_version": "x"}, good)
    sd = weights_only_load(good)
    assert sd["optimizer_state_dict"]["zero_stage"] == ZeroStageEnum.gradients
    assert torch.equal(sd["optimizer_state_dict"]["state"][0]["exp_avg"], torch.zeros(3))


def test_pretrain_checkpoint_format_loads_weights_only(tmp_path):
    """The toy pretraining's resume file (sd_ckpt.pt): state dicts, the optimizer's state, a
    generator state tensor and the step; it loads with weights_only=True."""
    from rayablate.toyworld.pretrain import _save_sd_ckpt

    lin, lin2 = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-3)
    lin(torch.ones(1, 2)).sum().backward()
    opt.step()
    g = torch.Generator().manual_seed(3)
    _save_sd_ckpt(tmp_path / "sd_ckpt.pt", lin, lin2, lin, lin2, opt, g, 7)
    state = torch.load(tmp_path / "sd_ckpt.pt", weights_only=True)
    assert state["step"] == 7 and torch.equal(state["g"], g.get_state())
    opt2 = torch.optim.AdamW(lin.parameters(), lr=1e-3)
    opt2.load_state_dict(state["opt"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert not list(tmp_path.glob("*.tmp"))
