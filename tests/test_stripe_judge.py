"""benchmarks/stripe_judge.py: the second judge of world v1's stripes (horizontal bands inside the shape),
which the floor's attacked images need because the probe calls dotted and checkered grids striped."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from rayablate.attack import save_attack_images

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import stripe_judge as J  # noqa: E402


def test_the_judge_calls_clean_stripes_striped_and_no_other_pattern():
    for pattern in ("plain", "striped", "dotted", "checkered"):
        rate = J.striped(J.clean_renders(pattern, 48, seed=11)).mean()
        assert rate == (1.0 if pattern == "striped" else 0.0), (pattern, rate)


def test_stripes_turned_on_their_side_are_not_horizontal_stripes():
    """The judge reads direction: the same striped renders rotated by 90 degrees are vertical bands."""
    imgs = J.clean_renders("striped", 32, seed=3)
    assert J.striped(imgs).mean() == 1.0
    assert J.striped(np.ascontiguousarray(np.rot90(imgs, axes=(1, 2)))).mean() == 0.0


def test_the_command_reads_an_attack_folder_and_prints_both_judges_per_row(tmp_path, capsys):
    rows = [("plain word", J.clean_renders("dotted", 8, seed=1)), ("inversion x", J.clean_renders("striped", 8, seed=2))]
    save_attack_images(rows, tmp_path / "attack_images.npz")
    assert J.main([str(tmp_path), "--calibration-images", "4"]) == 0
    out = capsys.readouterr().out
    [dotted] = [ln for ln in out.splitlines() if ln.strip().startswith("plain word")]
    [inverted] = [ln for ln in out.splitlines() if ln.strip().startswith("inversion x")]
    assert dotted.split()[-3:] == ["8", "0.00", "0.00"]  # the probe: dotted; the judge: no stripes
    assert inverted.split()[-3:] == ["8", "1.00", "1.00"]


def test_a_folder_without_attack_images_is_named_in_the_error(tmp_path):
    with pytest.raises(SystemExit, match=str(tmp_path)):
        J.main([str(tmp_path)])
