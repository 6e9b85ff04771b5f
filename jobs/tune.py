"""Entry point: `python jobs/tune.py --help`, or `ray job submit --working-dir . -- python jobs/tune.py ...`.

Starts a local Ray when RAY_ADDRESS is unset; joins the cluster otherwise.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rayablate.cli import script  # noqa: E402

if __name__ == "__main__":
    script("tune")
