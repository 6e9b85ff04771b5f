"""Entry point: `python jobs/attack.py --help`: attack an ablated model (concept inversion, prompt
search) and report how much of the concept comes back. Runs in this process; no Ray needed."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rayablate.cli import script  # noqa: E402

if __name__ == "__main__":
    script("attack")
