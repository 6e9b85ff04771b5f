"""Fault injection for tests: the hooks a test passes to `train.run_training(..., faults=Faults(...))`.

Production runs pass none, so the training loop carries no test logic: it only calls these three
hooks when an object is given. The object travels to every Ray Train worker (a plain dataclass).
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path


@dataclasses.dataclass
class Faults:
    fail_at_step: int | None = None  # rank 0 raises once, on the first attempt, before this step
    pid_dir: str | None = None  # each rank writes rank<N>.pid there, so a test can kill it
    hold_at_step: int | None = None  # after this step's checkpoint every rank waits for release_file
    release_file: str | None = None
    hold_timeout_s: float = 300.0

    def started(self, rank: int) -> None:
        if self.pid_dir:
            Path(self.pid_dir, f"rank{rank}.pid").write_text(str(os.getpid()))

    def before_step(self, step: int, rank: int, attempt: int) -> None:
        if self.fail_at_step is not None and step == int(self.fail_at_step) and attempt == 1 and rank == 0:
            raise RuntimeError(f"injected failure before step {step} (fail_at_step)")

    def after_checkpoint(self, step: int) -> None:
        if self.hold_at_step is None or step != int(self.hold_at_step):
            return
        deadline = time.time() + self.hold_timeout_s
        while not os.path.exists(self.release_file) and time.time() < deadline:
            time.sleep(0.1)
