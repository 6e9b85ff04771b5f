"""The jobs as a user runs them: end to end on the bundled toy model, bad inputs, `ray job submit`."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--steps", "4", "--num-anchor-images", "8", "--eval-images", "4", "--batch-size", "4",
        "--num-workers", "2"]


def run_job(args, env=None, timeout=900):
    e = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    e.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)


def test_exit_process_keeps_the_exit_code_and_runs_atexit_handlers(tmp_path):
    """jobs/*.py end through `exit_process` (frozen objects skip Python's last garbage collection):
    the code must still reach the shell, and atexit handlers (Ray's shutdown) must still run."""
    mark = tmp_path / "atexit-ran"
    code = ("import atexit, pathlib, sys; sys.path.insert(0, '.'); from rayablate.cli import exit_process; "
            f"atexit.register(lambda: pathlib.Path({str(mark)!r}).write_text('yes')); exit_process(3)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stderr
    assert mark.read_text() == "yes"


def _fresh_python(code: str, *unset: str) -> list[str]:
    """stdout lines of `code` in a fresh interpreter at the repository root, without RAY_ADDRESS and
    the variables `unset` (so it starts a Ray of its own)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", *unset)}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip().splitlines()


def test_a_jobs_local_ray_workers_tune_their_collector_and_the_library_alone_does_not(tmp_path):
    """`init_ray` starts a local Ray whose workers set resources.GC_THRESHOLDS as they import rayablate
    (1.8-2.1 s of collection per training worker's start-up otherwise); importing rayablate without
    it leaves Python's defaults (an in-process API user's process is theirs)."""
    code = ("import gc, sys; sys.path.insert(0, '.'); import rayablate; print(gc.get_threshold()); "
            "from rayablate.job import init_ray; ray = init_ray(num_cpus=1)\n"
            "@ray.remote(num_cpus=0.5)\ndef thresholds():\n    import gc, rayablate\n    return gc.get_threshold()\n"
            "print(ray.get(thresholds.remote())); ray.shutdown()")
    lines = _fresh_python(code, "RAYABLATE_TUNE_GC")
    assert lines[0] == "(700, 10, 10)" and lines[-1] == "(10000, 10, 10)", lines


def test_a_jobs_local_ray_starts_the_dashboards_minimal_head_unless_asked_for_the_full_one():
    """jobs/train.py and jobs/evaluate.py start their local Ray with `init_ray(dashboard=False)`: the
    dashboard's minimal head, no web UI (its fits need no state API); RAYABLATE_DASHBOARD=1, or
    `dashboard=True` (Tune, batch), starts the full one."""
    code = ("import os, sys; sys.path.insert(0, '.'); import ray; from rayablate.job import init_ray\n"
            "def url(**kw):\n    init_ray(num_cpus=1, **kw)\n"
            "    u = ray._private.worker.global_worker.node.address_info.get('webui_url'); ray.shutdown(); return u\n"
            "print(repr(url(dashboard=False))); os.environ['RAYABLATE_DASHBOARD'] = '1'\n"
            "print(repr(url(dashboard=False)))")
    minimal, full = _fresh_python(code, "RAYABLATE_DASHBOARD")[-2:]
    assert minimal in ("''", "None") and full.startswith("'127.0.0.1:"), (minimal, full)


def test_a_local_rays_start_imports_the_drivers_warm_modules_and_its_stop_kills_the_monitor_first():
    """`init_ray(warm=...)` imports the given modules on a thread while the local Ray starts (a job's
    driver: job.DRIVER_WARM_MODULES, its evaluation's open_clip and KID), and has finished when it
    returns; a module that cannot be imported is left to whoever needs it. Without `warm`, nothing.
    `stop_autoscaler_monitor` kills that Ray's autoscaler monitor (its pid; then None), after which
    `ray.shutdown()` still stops the rest."""
    code = ("import os, sys, threading; sys.path.insert(0, '.')\n"
            "from rayablate.job import init_ray, DRIVER_WARM_MODULES, shutdown_ray, stop_autoscaler_monitor\n"
            "import ray\n"
            "init_ray(num_cpus=1); print('open_clip' in sys.modules); shutdown_ray()\n"
            "print(ray.is_initialized(), stop_autoscaler_monitor())\n"
            "init_ray(num_cpus=1, warm=DRIVER_WARM_MODULES + ('no_such_module_here',))\n"
            "print('open_clip' in sys.modules, 'torchmetrics.image.kid' in sys.modules, "
            "any(t.name == 'rayablate-warm' for t in threading.enumerate()))\n"
            "pid = stop_autoscaler_monitor(); print(type(pid).__name__, stop_autoscaler_monitor())\n"
            "try:\n    os.kill(pid, 0); print('alive')\nexcept ProcessLookupError:\n    print('gone')\n"
            "print(ray.get(ray.put(7))); ray.shutdown(); print(ray.is_initialized())")
    assert _fresh_python(code)[-7:] == ["False", "False None", "True True False", "int None", "gone", "7", "False"]


def test_a_quiet_job_process_sends_native_stderr_to_its_log_and_keeps_pythons_on_the_console(tmp_path):
    """In a job's own process (`cli.script` -> `console.native_stderr_to_log`), quiet mode's `log_to`
    points file descriptor 2 (native code: Ray's C++ core worker) at logs/job.log, while `sys.stderr`
    (error messages, progress bars) stays on the console; the session's end puts fd 2 back. Verbose
    mode, and a process that did not ask (a test calling `main`), keep fd 2 on the console."""
    code = ("import os, sys; sys.path.insert(0, '.'); from rayablate import console\n"
            "def run(out, verbose):\n"
            "    with console.session(verbose):\n"
            "        console.log_to(out); os.write(2, f'native {out}\\n'.encode())\n"
            "        print(f'python {out}', file=sys.stderr, flush=True)\n"
            f"run({str(tmp_path / 'a')!r}, False); console.native_stderr_to_log()\n"
            f"run({str(tmp_path / 'b')!r}, False); run({str(tmp_path / 'c')!r}, True)\n"
            "os.write(2, b'native after\\n')")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    shown = r.stderr.splitlines()
    a, b, c = (str(tmp_path / x) for x in "abc")
    assert shown == [f"native {a}", f"python {a}", f"python {b}", f"native {c}", f"python {c}", "native after"], shown
    assert f"native {b}" in (tmp_path / "b" / "logs" / "job.log").read_text()
    assert "native" not in (tmp_path / "a" / "logs" / "job.log").read_text()


def test_a_quiet_job_logs_rays_worker_pool_warning_and_shows_every_other_pushed_message(tmp_path):
    """Ray's driver prints what the cluster pushes to it through `ray._private.worker.print_to_stdstream`
    (its error listener looks the function up on every message), whatever `log_to_driver` says. In quiet
    mode the worker-pool size warning (a Tune search's many trial processes raise it) goes to
    logs/job.log; any other pushed message (an actor's death) is still printed; the session's end
    restores Ray's function, and verbose mode prints both."""
    pool = ("WARNING: 8 PYTHON worker processes have been started on node: abc with address: 1.2.3.4, "
            "which is 4x the maximum expected startup concurrency (2).")
    code = ("import sys; sys.path.insert(0, '.'); from rayablate import console\n"
            "from ray._private import worker as w\n"
            "def push(text):\n"
            "    w.print_to_stdstream({'lines': [text], 'pid': 'raylet', 'is_err': False}, ignore_prefix=False)\n"
            "    sys.stdout.flush()\n"
            "original = w.print_to_stdstream\n"
            f"with console.session(False):\n    console.log_to({str(tmp_path)!r}); push({pool!r}); push('actor died')\n"
            "print('restored', w.print_to_stdstream is original, flush=True)\n"
            f"with console.session(True):\n    push({pool!r})\n")
    lines = _fresh_python(code)
    shown = [line for line in lines if "raylet" in line or line.startswith("restored")]
    assert len(shown) == 3 and "actor died" in shown[0] and shown[1] == "restored True", lines
    assert "4x the maximum expected startup concurrency" in shown[2]
    log = (tmp_path / "logs" / "job.log").read_text()
    assert "(raylet) WARNING: 8 PYTHON worker processes" in log and "actor died" not in log


@pytest.mark.parametrize("extra,msg", [
    (["--model", "/definitely/not/here"], "model path does not exist"),
    (["--lr-matcher", "0"], "lr_matcher"),
    (["--param-group", "attention"], "param_group"),
    (["--target", "plain"], "concept.anchor"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, extra, msg):
    out = tmp_path / "out"
    r = run_job(["jobs/train.py", "--output-dir", str(out), *extra], timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert msg in r.stderr and "error:" in r.stderr
    assert not out.exists()


def test_empty_prompt_list_exits_2(tmp_path):
    cfg = tmp_path / "c.yaml"
    (tmp_path / "prompts.txt").write_text("\n  \n")
    cfg.write_text(f"concept:\n  target: Van Gogh\n  anchor: painting\n  prompt_file: {tmp_path / 'prompts.txt'}\n")
    r = run_job(["jobs/train.py", "--config", str(cfg), "--output-dir", str(tmp_path / "out")], timeout=120)
    assert r.returncode == 2 and "prompt file" in r.stderr and "empty" in r.stderr
    assert not (tmp_path / "out").exists()


def test_corrupt_parquet_row_exits_2(tmp_path):
    from rayablate.images import encode_png

    good = encode_png(np.zeros((32, 32, 3), np.uint8))
    pq.write_table(pa.table({"image": [good, b"\x89PNG garbage"], "caption": ["a red circle", "a blue square"]}),
                   tmp_path / "user.parquet")
    r = run_job(["jobs/train.py", "--user-data", str(tmp_path / "user.parquet"), "--output-dir",
                 str(tmp_path / "out")], timeout=120)
    assert r.returncode == 2 and "row 1" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "out").exists()


# What every finished jobs/train.py run writes into its output folder.
OUTPUT_FILES = ("metrics.json", "report.md", "grid.png", "loss_curve.png", "matcher_delta.safetensors", "config.yaml")


def check_outputs(out: Path):
    for f in OUTPUT_FILES:
        assert (out / f).exists(), f
    m = check_metrics(json.loads((out / "metrics.json").read_text()))
    assert not list(out.rglob("*.tmp"))
    return m


def check_metrics(m: dict) -> dict:
    """The default style job's metrics.json: every group, every metric, the wall time."""
    for group in ("target", "anchor", "neighbours.dotted", "neighbours.checkered", "paraphrases"):
        for k in ("concept_rate_before", "concept_rate_after", "clip_accuracy_before", "clip_accuracy_after",
                  "clip_score_before", "clip_score_after"):
            assert isinstance(m[group][k], float), (group, k)
    assert "kid" in m["anchor"] and "kid" in m["neighbours.dotted"]
    assert m["wall_seconds"] > 0 and m["config"]["concept"]["target"] == "striped"
    return m


# The end-to-end run of jobs/train.py on the bundled model (every output file and metric group,
# through `check_outputs`) is the last, resumed run of
# tests/test_faults.py::test_interrupted_driver_leaves_nothing_half_written_the_same_command_resumes_and_matches_the_api;
# `ray job submit` against a started head (token auth, 2 workers) is
# tests/test_cluster.py::test_two_node_cluster_trains_on_both_nodes_with_outputs_and_checkpoints_in_s3.


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _has_open_file_under(proc: Path, prefix: str) -> bool:
    try:
        return any(os.readlink(fd).startswith(prefix) for fd in (proc / "fd").iterdir())
    except OSError:
        return False


def ray_pids_under(ray_tmp) -> list[int]:
    """The processes of the Ray whose RAY_TMPDIR is `ray_tmp`: their command line names it, or (Ray's
    agents rename themselves, `ray::DashboardAgent`, and drop RAY_TMPDIR from their environment) they
    keep log files under it open."""
    marker = str(ray_tmp).rstrip("/")
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker + "/" in cmd or marker + " " in cmd or cmd.rstrip().endswith(marker) \
                or _has_open_file_under(proc, marker + "/"):
            pids.append(int(proc.name))
    return pids


def stop_ray_under(ray_tmp: Path) -> None:
    """Stop the test's own Ray, found by its RAY_TMPDIR (`ray stop` would kill every Ray process on the
    machine, other sessions' included)."""
    import signal

    for pid in ray_pids_under(ray_tmp):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
