"""Time and agreement of the body box judged on shrunk slices against full resolution (``preprocessing.body_crop_box``).

    python Testing/benchmarks/benchmark_body_box.py runs/data/chest-ct-hu-no-covid-lidc/volumes/*.nii.gz --synthetic 600

For each volume (read and turned to radiological orientation as inference does) and for a synthetic 512×512×N HU
volume (``benchmark_memory_speed.synthetic_ct``), the box as the code judges it (512² and larger slices shrunk by a
whole factor) and as it was judged before (``BODY_BOX_JUDGED_SIDE`` raised to the slice size: full resolution), the
largest difference of their top, left and side in pixels, and the fastest of ``--repeats`` timings of each. The
recipe is the shipped default model's (body field of view and margin). Not a test: times depend on the machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import astuple
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from COVIDLesionSegLib import io, preprocessing
from COVIDLesionSegLib.checkpoints import locate_model, read_checkpoint_metadata
from COVIDLesionSegLib.resources import default_model_name

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_memory_speed import synthetic_ct  # noqa: E402


def fastest(function, repeats: int) -> tuple[object, float]:
    """``function()``'s result and the fastest of ``repeats`` timings in seconds."""
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        seconds.append(time.perf_counter() - started)
    return result, min(seconds)


def compare_box(volume: np.ndarray, config: preprocessing.PreprocessingConfig, repeats: int) -> tuple:
    """(box as judged now, its seconds, box at full resolution, its seconds) of ``volume[z, y, x]``."""
    shrunk, shrunk_seconds = fastest(lambda: preprocessing.body_crop_box(volume, config), repeats)
    judged_side = preprocessing.BODY_BOX_JUDGED_SIDE
    preprocessing.BODY_BOX_JUDGED_SIDE = max(volume.shape[-2:]) + 1  # factor 1: the full-resolution judgement
    try:
        full, full_seconds = fastest(lambda: preprocessing.body_crop_box(volume, config), repeats)
    finally:
        preprocessing.BODY_BOX_JUDGED_SIDE = judged_side
    return shrunk, shrunk_seconds, full, full_seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("volumes", nargs="*", type=Path, help="CT volumes (any format the CLI reads)")
    parser.add_argument("--synthetic", type=int, nargs="*", default=[], metavar="N", help="also synthetic 512×512×N HU volumes")
    parser.add_argument("--repeats", type=int, default=3, help="timings per box (the fastest is shown)")
    arguments = parser.parse_args(argv)
    config = read_checkpoint_metadata(locate_model(default_model_name())[0]).preprocessing
    print(f"Recipe of {default_model_name()}: field of view {config.field_of_view}, margin {config.body_margin}; "
          f"BODY_BOX_JUDGED_SIDE {preprocessing.BODY_BOX_JUDGED_SIDE}\n")
    print("| volume | size (z, y, x) | box as judged (top, left, side) | at full resolution | largest difference (px) | s | s, full |")
    print("|---|---|---|---|---|---|---|")
    cases = [(path.name, lambda path=path: sitk.GetArrayFromImage(io.to_radiological(io.read_image(path)))) for path in arguments.volumes]
    cases += [(f"synthetic 512×512×{slices}", lambda slices=slices: synthetic_ct(slices)) for slices in arguments.synthetic]
    for name, load in cases:
        volume = load()
        shrunk, shrunk_seconds, full, full_seconds = compare_box(volume, config, arguments.repeats)
        shrunk, full = (None if box is None else astuple(box) for box in (shrunk, full))
        difference = "—" if shrunk is None or full is None else str(max(abs(a - b) for a, b in zip(shrunk, full, strict=True)))
        print(f"| {name} | {volume.shape} | {shrunk} | {full} | {difference} | {shrunk_seconds:.3f} | {full_seconds:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
