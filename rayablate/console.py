"""What a job prints: one line per stage, one progress bar per long stage, library noise in logs/.

By default (`--verbose` off):

- the driver's own lines (`[rayablate] ...`) and the final table go to the console;
- Ray Data shows one overall progress bar per dataset on a terminal, and nothing when the output
  is not a terminal (a CI log, a file): the stage lines say what ran and how long it took;
- Ray workers' and actors' output is not forwarded (`log_to_driver=False`). Training progress
  reaches the driver through a small actor (`Board`): rank 0 posts its lines there, the driver
  prints each once, as a bar that redraws in place on a terminal;
- library warnings (torch, DeepSpeed, torchmetrics, Ray) and Ray's INFO logging go to
  `<output-dir>/logs/job.log` instead of the console, next to every line the console showed; so does
  what native code writes to the process's stderr (Ray's C++ core worker in the driver) in a job's
  own process (`cli.script`: file descriptor 2 goes to the log, `sys.stderr` keeps the console); each
  training worker writes its own lines to `<output-dir>/logs/rank<r>.log` when it can reach the
  folder (always on one machine). Ray keeps its full worker logs in its session folder.
- Ray's warning that more worker processes have started than the node has CPUs (a Tune search with
  a few trials starts a dozen: trial, controller, training and sampler processes) is pushed to
  the driver, which prints it whatever `log_to_driver` says; quiet mode sends it to job.log
  instead. Every other message Ray pushes there (an actor's death, for one) stays on the console.

`--verbose` keeps the everything-on-the-console behaviour (workers' output forwarded, library
warnings shown). Workers learn the mode from RAYABLATE_VERBOSE, which the driver sets before Ray starts.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
import warnings
from pathlib import Path

ENV = "RAYABLATE_VERBOSE"
LOG_DIR = "logs"
_LIBRARY_LOGGERS = ("ray", "ray.train", "ray.tune", "deepspeed", "DeepSpeed", "torch", "py.warnings")
_state = {"file": None, "native": False, "stderr": None, "ray_print": None}
# the start of Ray's worker-pool size warning (raylet worker_pool.cc), pushed to every driver
RAY_POOL_WARNING = "PYTHON worker processes have been started on node"


def is_verbose() -> bool:
    """Verbose unless a job chose quiet (`session(False)`): library code and tests keep Ray's output."""
    return os.environ.get(ENV, "1") == "1"


def is_tty() -> bool:
    return sys.stdout.isatty()


@contextlib.contextmanager
def session(verbose: bool):
    """A job's console mode (`with console.session(args.verbose): ...`); enter it before Ray starts
    (local workers inherit RAYABLATE_VERBOSE). On exit this process is as it was (a CLI run in-process,
    as tests do, leaves nothing behind): environment, Ray Data's context, loggers, warning filters."""
    env = {k: os.environ.get(k) for k in (ENV, "RAY_DATA_LOGGING_CONFIG")}
    loggers = {n: (list(logging.getLogger(n).handlers), logging.getLogger(n).propagate)
               for n in (*_LIBRARY_LOGGERS, "ray.data")}
    fields = ("enable_progress_bars", "enable_operator_progress_bars", "print_on_execution_start",
              "enable_auto_log_stats")
    ctx = _data_context()
    saved = {f: getattr(ctx, f) for f in fields if hasattr(ctx, f)} if ctx is not None else {}
    with warnings.catch_warnings():
        try:
            _setup(verbose, ctx)
            yield
        finally:
            for k, v in env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            for n, (handlers, propagate) in loggers.items():
                lg = logging.getLogger(n)
                lg.handlers[:] = handlers
                lg.propagate = propagate
            for f, v in saved.items():
                setattr(ctx, f, v)
            logging.captureWarnings(False)
            _native_stderr_back()
            _ray_pool_warning_back()
            if _state["file"] is not None:
                _state["file"].close()
                _state["file"] = None


def _data_context():
    try:
        from ray.data import DataContext

        return DataContext.get_current()
    except Exception:
        return None


def _setup(verbose: bool, ctx) -> None:
    os.environ[ENV] = "1" if verbose else "0"
    if verbose:
        return
    os.environ["RAY_DATA_LOGGING_CONFIG"] = str(Path(__file__).with_name("ray_data_logging.yaml"))
    quiet_libraries()
    _ray_pool_warning_to_log()
    try:
        from ray.data._internal.logging import configure_logging

        configure_logging()  # Ray Data configured itself on import: apply the quiet file now
    except Exception:  # another Ray version: its default output stays
        pass
    if ctx is not None:
        ctx.enable_progress_bars = is_tty()  # one overall bar on a terminal; nothing in a log file
        for f in ("enable_operator_progress_bars", "print_on_execution_start", "enable_auto_log_stats"):
            if hasattr(ctx, f):
                setattr(ctx, f, False)


def _ray_pool_warning_to_log() -> None:
    """Ray's driver prints what the cluster pushes to it (`ray._private.worker.listen_error_messages`
    calls the module's `print_to_stdstream`); the worker-pool size warning goes to job.log instead.
    Another Ray version without that function keeps its output."""
    try:
        from ray._private import worker as ray_worker
    except Exception:
        return
    original = getattr(ray_worker, "print_to_stdstream", None)
    if original is None or _state["ray_print"] is not None:
        return

    def print_unless_pool_warning(data, *args, **kwargs):
        lines = data.get("lines") if isinstance(data, dict) else None
        if lines and data.get("pid") == "raylet" and all(RAY_POOL_WARNING in str(line) for line in lines):
            for line in lines:
                say_file(f"(raylet) {line}")
            return None
        return original(data, *args, **kwargs)

    _state["ray_print"] = original
    ray_worker.print_to_stdstream = print_unless_pool_warning


def _ray_pool_warning_back() -> None:
    if _state["ray_print"] is None:
        return
    from ray._private import worker as ray_worker

    ray_worker.print_to_stdstream = _state["ray_print"]
    _state["ray_print"] = None


def quiet_libraries() -> None:
    """Library warnings and INFO logging off the console (into logs/job.log once `log_to` names it)."""
    warnings.simplefilter("default")  # each distinct warning once, as a log record of "py.warnings"
    logging.captureWarnings(True)
    for name in _LIBRARY_LOGGERS:
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                lg.removeHandler(h)  # console handlers only (file handlers stay)
        if not any(isinstance(h, logging.NullHandler) for h in lg.handlers):
            lg.addHandler(logging.NullHandler())  # never Python's last-resort handler (stderr)
        lg.propagate = False
        if _state["file"] is not None and _state["file"] not in lg.handlers:
            lg.addHandler(_state["file"])


def log_to(out: str | Path) -> Path | None:
    """Append the console's lines and the libraries' logging to out/logs/job.log (quiet mode only)."""
    if is_verbose():
        return None
    path = Path(out) / LOG_DIR / "job.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
    except OSError:
        return None
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    if _state["native"]:
        _native_stderr_to(path)
    old = _state["file"]
    _state["file"] = handler
    for name in _LIBRARY_LOGGERS:
        lg = logging.getLogger(name)
        if old is not None:
            lg.removeHandler(old)
        lg.addHandler(handler)
    quiet_libraries()
    return path


def native_stderr_to_log() -> None:
    """In a job's own process (`cli.script`), quiet mode's `log_to` also sends what native code
    writes to file descriptor 2 into logs/job.log: Ray's C++ core worker logs there in the driver,
    e.g. an ERROR line for every Ray Data actor pool (`core_worker.cc ... constructor arguments in the
    object store and max_restarts > 0`, ray-project/ray#53727, which the job can do nothing about).
    Python's own `sys.stderr` (error messages, progress bars) stays on the console. Not for a CLI
    run in-process (tests): their captured stderr is theirs."""
    _state["native"] = True


def _native_stderr_to(path: Path) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError:
        return
    sys.stderr.flush()
    if _state["stderr"] is None:
        console = os.fdopen(os.dup(2), "w", buffering=1, encoding=getattr(sys.stderr, "encoding", None) or "utf-8",
                            errors="backslashreplace")
        _state["stderr"] = (sys.stderr, console)
        sys.stderr = console
    os.dup2(fd, 2)
    os.close(fd)


def _native_stderr_back() -> None:
    if _state["stderr"] is None:
        return
    previous, console = _state["stderr"]
    _state["stderr"] = None
    console.flush()
    os.dup2(console.fileno(), 2)
    sys.stderr = previous
    console.close()


def say(line: str) -> None:
    """One console line, also kept in logs/job.log."""
    print(line, flush=True)
    say_file(line)


def say_file(line: str) -> None:
    """A line for logs/job.log only."""
    if _state["file"] is not None:
        _state["file"].emit(logging.makeLogRecord({"name": "rayablate", "levelname": "INFO", "msg": line,
                                                   "levelno": logging.INFO}))


# --- training progress: workers -> a small actor -> the driver ---------------------------------

def board_cls():
    import ray

    @ray.remote(num_cpus=0)
    class Board:
        """Lines and step counts rank 0 posts; the driver takes what is new. It also counts how
        often the training function started on rank 0 (1 + worker-group restarts): one actor for
        both, since every actor is a process start on the training's critical path."""

        def __init__(self):
            self.lines: list[str] = []
            self.step = 0
            self.n = 0

        def increment(self) -> int:
            self.n += 1
            return self.n

        def count(self) -> int:
            return self.n

        def post(self, line: str | None, step: int | None = None) -> None:
            if line is not None:
                self.lines.append(line)
            if step is not None:
                self.step = max(self.step, step)

        def since(self, n: int) -> tuple[list[str], int]:
            return self.lines[n:], self.step

    return Board


class Follower:
    """A driver thread that prints the board's new lines once each and, on a terminal, keeps a
    progress bar of the steps redrawn in place (`with Follower(board, total, desc): trainer.fit()`)."""

    def __init__(self, board, total: int, desc: str, every_s: float = 0.5):
        self.board, self.total, self.desc, self.every_s = board, total, desc, every_s
        self.seen, self.bar = 0, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        if is_tty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc=self.desc, leave=False, dynamic_ncols=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        self._poll()  # the last lines
        if self.bar is not None:
            self.bar.close()
        return False

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._poll()

    def _poll(self) -> None:
        import ray

        try:
            lines, step = ray.get(self.board.since.remote(self.seen), timeout=10)
        except Exception:  # the board is gone (the run is ending): nothing more to show
            return
        self.seen += len(lines)
        for line in lines:
            if self.bar is not None:
                self.bar.write(line)
                say_file(line)
            else:
                say(line)
        if self.bar is not None:
            self.bar.n = min(step, self.total)
            self.bar.refresh()


class WorkerLog:
    """A training worker's lines: posted to the board by rank 0 (or printed when there is none, or
    in verbose mode), and appended to <output-dir>/logs/rank<r>.log when that folder is reachable."""

    def __init__(self, rank: int, board=None, log_dir: str | None = None, verbose: bool = True):
        self.rank, self.board, self.verbose = rank, board, verbose
        self.file = None
        if log_dir:
            try:
                Path(log_dir).mkdir(parents=True, exist_ok=True)
                self.file = open(Path(log_dir) / f"rank{rank}.log", "a", encoding="utf-8")
            except OSError:
                self.file = None
        if not verbose:
            quiet_libraries()

    def __call__(self, line: str) -> None:
        if self.file is not None:
            self.file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
            self.file.flush()
        if self.rank != 0:
            return
        if self.board is not None and not self.verbose:
            self.board.post.remote(line)
        else:
            print(line, flush=True)

    def step(self, step: int) -> None:
        """Rank 0's step count, for the driver's progress bar."""
        if self.rank == 0 and self.board is not None:
            self.board.post.remote(None, step)
