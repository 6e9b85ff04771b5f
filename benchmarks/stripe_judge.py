"""A second judge of world v1's stripes, beside the probe, for attacked images.

    python benchmarks/stripe_judge.py outputs/attack                    # a `jobs/attack.py` output folder
    python benchmarks/stripe_judge.py outputs/bench-robustness/striped/robust \\
        outputs/robust_settings/striped_setting0_seed0/attack/attack_images.npz   # folders or .npz files

The probe learned four patterns (plain, striped, dotted, checkered) and must call every image one of
them. An inversion against a model that never learned stripes (the floor: `jobs/pretrain_toy.py
--exclude striped`) draws dotted and checkered grids, and the probe calls most of those striped. This
judge asks only what a person sees in world v1's stripes: horizontal bands. Inside the shape (the
pixels that are not the white background, eroded twice so the outline does not count), it measures the
mean luminance change between vertical neighbours and between horizontal ones; an image is striped
when the vertical share of that change is above 0.65 and its level above 8 (on 0-255). Stripes change
only from row to row (share near 1); dots and checks change both ways (near 0.5); a plain fill does not
change (level near 0).

It first checks itself on clean world-v1 renders (128 of each pattern, every shape and colour), then
prints, for each folder's attack_images.npz (written by every attack: `jobs/attack.py`,
`benchmarks/robustness.py`), each row's image count, the probe's striped rate and this judge's.
Runs on the CPU in seconds; loads no diffusion model.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARE, LEVEL = 0.65, 8.0  # vertical share of the change inside the shape; its mean level on 0-255
BACKGROUND = 215  # a pixel whose darkest channel is at or above this is background (white)


def _erode(mask: np.ndarray) -> np.ndarray:
    p = np.pad(mask, 1)
    return p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def stripe_scores(images: np.ndarray) -> np.ndarray:
    """Per image (uint8 NxHxWx3): (vertical share of the luminance change inside the shape, its level)."""
    out = []
    for im in np.asarray(images, dtype=np.float32):
        lum = im.mean(-1)
        mask = _erode(_erode(im.min(-1) < BACKGROUND))
        dy, dx = np.abs(np.diff(lum, axis=0)), np.abs(np.diff(lum, axis=1))
        my, mx = mask[1:] & mask[:-1], mask[:, 1:] & mask[:, :-1]
        ey = float(dy[my].mean()) if my.any() else 0.0
        ex = float(dx[mx].mean()) if mx.any() else 0.0
        out.append((ey / (ex + ey + 1e-6), ex + ey))
    return np.array(out, dtype=np.float64).reshape(-1, 2)


def striped(images: np.ndarray) -> np.ndarray:
    """Per image: True where it shows horizontal stripes (see the module's docstring)."""
    s = stripe_scores(images)
    return (s[:, 0] > SHARE) & (s[:, 1] > LEVEL)


def clean_renders(pattern: str, n: int = 128, seed: int = 5) -> np.ndarray:
    """`n` world-v1 renders in `pattern`, of random shapes and colours (uint8)."""
    from rayablate.toyworld.world import Labels, by_name

    world, rng = by_name("v1"), np.random.default_rng(seed)
    out = []
    for _ in range(n):
        lab = world.random_labels(rng)
        out.append((world.render(Labels(lab.object, lab.colour, pattern), rng) * 255).round().astype(np.uint8))
    return np.stack(out)


def row_rates(probe, rows: list[tuple[str, np.ndarray]]) -> list[tuple[str, int, float, float]]:
    """Per (label, images) row: (label, image count, the probe's striped rate, this judge's rate)."""
    return [(label, len(imgs), probe.concept_rate(imgs, "striped"), float(striped(imgs).mean()))
            for label, imgs in rows]


def read_rows(path: str | Path) -> list[tuple[str, np.ndarray]]:
    """An attack output folder (its attack_images.npz) or the .npz itself -> [(label, images)]."""
    from rayablate.attack import load_attack_images

    p = Path(path)
    npz = p / "attack_images.npz" if p.is_dir() else p
    if not npz.exists():
        raise SystemExit(f"{path}: no attack_images.npz (every attack writes one since it was added; "
                         "run the attack again)")
    return load_attack_images(npz)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="*", help="attack output folders, or their attack_images.npz files")
    ap.add_argument("--calibration-images", type=int, default=128, help="clean renders per pattern for the self-check")
    args = ap.parse_args(argv)
    rows_by_path = [(p, read_rows(p)) for p in args.paths]  # every path read before the first number
    from rayablate.worlds import world_for

    probe = world_for("").judge()
    width = max([40] + [len(label) + 2 for _, rows in rows_by_path for label, _ in rows])
    print(f"{'images':{width}s} {'n':>4s} {'probe: striped':>15s} {'judge: stripes':>15s}")

    def lines(rows: list[tuple[str, np.ndarray]]) -> None:
        for label, n, by_probe, by_judge in row_rates(probe, rows):
            print(f"{'  ' + label:{width}s} {n:4d} {by_probe:15.2f} {by_judge:15.2f}", flush=True)

    from rayablate.toyworld.world import by_name

    print("clean world-v1 renders (the judge's self-check)")
    lines([(pattern, clean_renders(pattern, args.calibration_images)) for pattern in by_name("v1").values("pattern")])
    for path, rows in rows_by_path:
        print(path)
        lines(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
