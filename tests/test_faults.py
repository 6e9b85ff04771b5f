"""Faults survived and nothing lost: a training worker killed by its pid, the driver interrupted by
SIGINT and SIGTERM and rerun, determinism, a non-finite loss through the CLI.

One Ray instance (2 CPUs) serves the in-process tests; the driver tests run `jobs/train.py` as a
user does, each with its own local Ray under a short RAY_TMPDIR of its own.
"""
from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from rayablate.config import AblationConfig, to_dict
from rayablate.faults import Faults
from local_ray import start_local_ray
from test_jobs import check_outputs, ray_pids_under
from rayablate.train import DELTA_NAME

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _png(seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _rows(n: int = 16) -> list[dict]:
    """Ablation and preservation rows in pairs, so every shard and batch has both kinds."""
    rows = []
    for i in range(n):
        shape = ("circle", "square", "triangle", "star")[i % 4]
        abl = i % 4 < 2
        rows.append({"image": _png(i), "target_caption": f"a striped {shape}" if abl else f"a dotted {shape}",
                     "anchor_caption": f"a plain {shape}" if abl else f"a dotted {shape}", "mask": int(abl),
                     "seed": i})
    return rows


def _cfg(**kw) -> AblationConfig:
    """2 workers x 8 rows, batch 2: 4 steps an epoch; checkpoints at 3, 6, 9 (3 falls mid-epoch)."""
    base = dict(steps=9, batch_size=2, num_workers=2, zero_stage=2, report_every=3, checkpoint_every=3,
                lr_matcher=1e-3, lr_disc=2e-4, seed=0)
    base.update(kw)
    return AblationConfig(**base)


@pytest.fixture(scope="module")
def ray_session():
    ray = start_local_ray(300)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def train_ds(ray_session):
    return ray_session.data.from_items(_rows())


@pytest.fixture(scope="module")
def reference(ray_session, train_ds, tiny_sd_path, tmp_path_factory):
    """An uninterrupted 9-step run."""
    from rayablate.train import run_training

    return run_training(_cfg(), train_ds, str(tiny_sd_path), str(tmp_path_factory.mktemp("reference")),
                        run_name="faults")


def _tensors(path) -> dict[str, torch.Tensor]:
    from rayablate.pipeline import read_delta

    return read_delta(path)[0]


def _meta(path) -> dict[str, str]:
    from rayablate.pipeline import read_delta

    return read_delta(path)[1]


def test_same_config_and_seed_give_the_same_delta_bitwise(reference, train_ds, tiny_sd_path, tmp_path):
    from rayablate.train import run_training

    again = run_training(_cfg(), train_ds, str(tiny_sd_path), str(tmp_path), run_name="faults")
    a, b = _tensors(reference["delta_path"]), _tensors(again["delta_path"])
    assert a and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "same config and seed, different delta"
    # metadata too (the file's bytes may differ: safetensors writes metadata keys in hash-map order)
    assert _meta(reference["delta_path"]) == _meta(again["delta_path"])
    assert [m["loss"] for m in again["metrics"]] == [m["loss"] for m in reference["metrics"]]


def _registered_checkpoints(run_dir: Path) -> list[str]:
    try:
        snap = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return []
    return [r["checkpoint_dir_name"] for r in snap["checkpoint_results"]]


def _dead(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie
    except OSError:
        return True


def _wait(cond, timeout: float, what: str, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_killed_worker_restarts_from_its_checkpoint_and_matches_the_uninterrupted_run(
        reference, train_ds, tiny_sd_path, tmp_path):
    """Rank 1's process is SIGKILLed (by its pid, from the test) right after the step-3 checkpoint;
    FailureConfig(max_failures=1) restarts the worker group from that checkpoint and the run ends
    where the uninterrupted one ends."""
    from rayablate.report import report_markdown
    from rayablate.train import run_training

    pids, release = tmp_path / "pids", tmp_path / "release"
    pids.mkdir()
    out = tmp_path / "out"
    result: dict = {}

    def train():
        try:
            result["ok"] = run_training(_cfg(), train_ds, str(tiny_sd_path), str(out), run_name="killed",
                                        max_failures=1, faults=Faults(pid_dir=str(pids), hold_at_step=3,
                                                                      release_file=str(release)))
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            result["error"] = e

    t = threading.Thread(target=train, daemon=True)
    t.start()
    try:
        run_dir = out / "ray" / "killed"
        # every rank waits after the step-3 checkpoint: the kill lands mid-run, after Ray registered it
        _wait(lambda: (pids / "rank1.pid").exists() and "checkpoint_step0000003" in _registered_checkpoints(run_dir),
              300, "the step-3 checkpoint")
        victim = int((pids / "rank1.pid").read_text())
        assert victim != os.getpid()
        os.kill(victim, signal.SIGKILL)
        _wait(lambda: _dead(victim), 30, "the killed worker to die")
    finally:
        release.write_text("go\n")
    t.join(timeout=400)
    assert not t.is_alive(), "training did not finish after the kill"
    assert "error" not in result, repr(result.get("error"))
    res = result["ok"]
    assert res["worker_restarts"] >= 1
    assert res["start_step"] == 3 and res["final_step"] == 9  # restored from the checkpoint, not from step 0
    assert int((pids / "rank1.pid").read_text()) != victim  # rank 1 runs in a new process
    a, b = _tensors(reference["delta_path"]), _tensors(res["delta_path"])
    assert a.keys() == b.keys() and a
    # Tolerance 1e-6 absolute (weights ~0.1, one step moves them by up to lr = 1e-3): the restored
    # Adam state, per-(rank, step) seeds and the same data order make the restart exact on CPU
    # (observed difference: 0); the bound leaves room for float reduction order, not for a lost or
    # repeated step.
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff <= 1e-6, diff
    report = report_markdown({"config": to_dict(_cfg()), "restarts": res["worker_restarts"]}, [])
    assert f"Worker restarts during training: {res['worker_restarts']} (a worker failed" in report
    assert "restarted the worker group from the latest checkpoint" in report


def test_non_finite_loss_exits_2_through_the_cli_naming_the_step(ray_session, train_ds, tiny_sd_path, tmp_path,
                                                               capsys):
    from rayablate.cli import guarded
    from rayablate.train import run_training

    cfg = _cfg(num_workers=1, lr_matcher=1e30, steps=3, checkpoint_every=3)  # step 1's update poisons step 2
    rc = guarded(lambda: run_training(cfg, train_ds, str(tiny_sd_path), str(tmp_path), run_name="nan"))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert re.search(r"error: training diverged: non-finite loss at step [23]\b.*no delta was saved", err), err
    assert not (tmp_path / DELTA_NAME).exists()
    assert not list((tmp_path / "ray").rglob(DELTA_NAME)), "a checkpoint holds a poisoned delta"


# --- the driver: jobs/train.py interrupted and rerun --------------------------------------------

JOB_CONFIG = """\
steps: 12
checkpoint_every: 2
report_every: 2
batch_size: 4
num_workers: 1
num_anchor_images: 8
num_preservation_images: 8
anchor_steps: 4
eval_images: 4
eval_steps: 4
"""


def _partial_files(out: Path) -> list[str]:
    """Temporaries, and Ray Train checkpoint folders that the run's snapshot does not list."""
    bad = [str(p) for p in out.rglob("*") if ".tmp" in p.name]
    run_dir = out / "ray" / "striped"
    listed = set(_registered_checkpoints(run_dir))
    bad += [str(p) for p in run_dir.glob("checkpoint_*") if p.is_dir() and p.name not in listed]
    return bad


def test_interrupted_driver_leaves_nothing_half_written_and_the_same_command_resumes(tmp_path):
    (tmp_path / "c.yaml").write_text(JOB_CONFIG)
    out = tmp_path / "out"
    cmd = [sys.executable, "jobs/train.py", "--config", str(tmp_path / "c.yaml"), "--output-dir", str(out)]
    ray_tmp = tempfile.mkdtemp(prefix="rf", dir="/tmp")  # short: Ray's socket paths must stay < 107 bytes
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", RAY_TMPDIR=ray_tmp)
    env.pop("RAY_ADDRESS", None)
    run_dir = out / "ray" / "striped"
    logs = []

    def start(i: int):
        log = open(tmp_path / f"run{i}.log", "w+")
        logs.append(log)
        # SIGINT back to its default: a test run started in the background (`pytest &`) has it ignored,
        # and a Python child then never raises KeyboardInterrupt
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)), log

    def step_of(name: str) -> int:
        return int(name.removeprefix("checkpoint_step"))

    def interrupt(i: int, sig: int, after_step: int) -> str:
        proc, log = start(i)
        try:
            _wait(lambda: any(step_of(c) > after_step for c in _registered_checkpoints(run_dir)), 600,
                  f"a checkpoint after step {after_step}", proc)
            os.kill(proc.pid, sig)  # the driver only, by its pid
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
        log.seek(0)
        text = log.read()
        assert proc.returncode == 128 + sig, text[-3000:]
        assert f"error: interrupted ({signal.Signals(sig).name})" in text and "Re-run the same command" in text
        # the driver's local Ray went down with it
        _wait(lambda: not ray_pids_under(ray_tmp), 30, "the interrupted run's Ray processes to exit")
        assert not _partial_files(out), _partial_files(out)
        assert not (out / DELTA_NAME).exists()  # training had not finished
        return text

    try:
        first = interrupt(1, signal.SIGINT, after_step=0)
        assert "resumed from step" not in first
        done = max(step_of(c) for c in _registered_checkpoints(run_dir))
        second = interrupt(2, signal.SIGTERM, after_step=done)
        m = re.search(r"resumed from step (\d+)", second)
        assert m and int(m.group(1)) >= done > 0, second[-3000:]
        done = max(step_of(c) for c in _registered_checkpoints(run_dir))
        proc, log = start(3)
        proc.wait(timeout=900)
        log.seek(0)
        third = log.read()
        assert proc.returncode == 0, third[-3000:]
        m = re.search(r"resumed from step (\d+)", third)
        assert m and int(m.group(1)) >= done > 0, third[-3000:]  # it did not start over
        # the resumed run is also the job's end-to-end check: every output, every metric group
        assert "3/3 evaluation" in third
        # ... and of its quiet console: a line per stage and report, each once; the rest in logs/
        lines = [x for x in third.splitlines() if x.strip()]
        assert len(lines) <= 30, third
        train_lines = [x for x in lines if x.startswith("[rayablate.train]")]
        assert train_lines and len(train_lines) == len(set(train_lines)), third
        assert not any("TrainingReport" in x or "Warning" in x or "logging_progress" in x for x in lines), third
        assert "resumed from step" in (out / "logs" / "job.log").read_text()
        assert (out / "logs" / "rank0.log").exists()
        check_outputs(out)
        assert not _partial_files(out), _partial_files(out)
        assert json.loads((out / "train_metrics.json").read_text())[-1]["step"] == 12
    finally:
        for log in logs:
            log.close()
        for pid in ray_pids_under(ray_tmp):  # only this test's Ray, found by its RAY_TMPDIR
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
