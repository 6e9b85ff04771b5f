"""Entry point: `python jobs/evaluate.py --help`, or `ray job submit --working-dir . -- python jobs/evaluate.py ...`.

Starts a local Ray when RAY_ADDRESS is unset; joins the cluster otherwise.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rayablate.cli import exit_process, main  # noqa: E402

if __name__ == "__main__":
    exit_process(main(["evaluate", *sys.argv[1:]]))
