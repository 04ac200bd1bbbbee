"""A synthetic stand-in for ``covid19-ct-seg-20cases-png256``: the same manifest columns, folder layout and benchmark
folds file, with small random slices, so the GPU suite's dry run (and its test) runs every stage without the real
data. Not data to learn from.

    python Testing/gpu/make_synthetic_data.py OUT [--volumes 20] [--slices-per-volume 12] [--size 64]
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import cv2
import numpy as np

COLUMNS = (
    "volume_id", "patient_id", "split_group", "source", "pos_in_volume", "source_index",
    "image", "mask", "lung_mask", "lesion_pixels", "lung_pixels", "orientation",
)  # fmt: skip


def make(folder: Path, volumes: int = 20, slices_per_volume: int = 12, size: int = 64, seed: int = 0) -> Path:
    """Write the data set into ``folder``; returns it. 20 volumes: the benchmark's 5 folds of 4 volumes."""
    rng = np.random.default_rng(seed)
    for name in ("images", "masks", "lung_masks"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[:size, :size] / size - 0.5
    lungs = ((np.abs(x) - 0.2) / 0.15) ** 2 + (y / 0.3) ** 2 < 1
    rows, index = [], 0
    volume_ids = [f"synthetic_{number:03d}" for number in range(volumes)]
    for volume_id in volume_ids:
        for position in range(slices_per_volume):
            centre = rng.uniform(-0.3, 0.3, 2)
            lesion = lungs & ((x - centre[0]) ** 2 + (y - centre[1]) ** 2 < rng.uniform(0.005, 0.02))
            image = np.clip(120 + 60 * lungs - 80 * lesion + rng.normal(0, 20, (size, size)), 0, 255).astype(np.uint8)
            stem = f"{volume_id}_{position:03d}.png"
            cv2.imwrite(str(folder / "images" / stem), image)
            cv2.imwrite(str(folder / "masks" / stem), (lesion * 255).astype(np.uint8))
            cv2.imwrite(str(folder / "lung_masks" / stem), (lungs * 255).astype(np.uint8))
            rows.append(
                {
                    "volume_id": volume_id, "patient_id": volume_id, "split_group": volume_id, "source": "synthetic",
                    "pos_in_volume": position, "source_index": index, "image": f"images/{stem}", "mask": f"masks/{stem}",
                    "lung_mask": f"lung_masks/{stem}", "lesion_pixels": int(lesion.sum()), "lung_pixels": int(lungs.sum()),
                    "orientation": "radiological",
                }
            )  # fmt: skip
            index += 1
    with open(folder / "manifest.csv", "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    groups = [volume_ids[4 * k : 4 * k + 4] for k in range(len(volume_ids) // 4)]
    folds = [{"train": group, "test": [volume for volume in volume_ids if volume not in group]} for group in groups]
    (folder / "benchmark_task1_folds.json").write_text(json.dumps({"source": "synthetic", "folds": folds}, indent=1))
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output")
    parser.add_argument("--volumes", type=int, default=20)
    parser.add_argument("--slices-per-volume", type=int, default=12)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    make(Path(args.output), args.volumes, args.slices_per_volume, args.size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
