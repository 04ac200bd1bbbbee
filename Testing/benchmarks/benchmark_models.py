"""Seconds per slice of registered models, with and without the guard rails, in one run on the same machine.

    python Testing/benchmarks/benchmark_models.py --models resattunet-lesion-lung-v1 resattunet-lesion-lung-v5 --repeats 3

Each model segments the same real volumes through ``Predictor.segment_image`` (what the CLI runs, without
file writing): slicerio's ``CTChest4.nrrd`` (HU, 128×128×34, 3 mm pixels) and the shipped sample (8-bit, 256²×33). Runs
alternate between models and settings, ``--repeats`` times, and the fastest run of each is printed (the
least disturbed by other work on the machine). Not a test: the figures depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from COVIDLesionSegLib.io import read_image
from COVIDLesionSegLib.predictor import NO_GUARD_RAILS, GuardRails, Predictor
from COVIDLesionSegLib.resources import default_model_name, resources_dir


def volumes() -> dict:
    from slicerio.data_helper import get_testdata_file

    sample = resources_dir() / "Samples" / "radiopaedia_27_86410_0.nii.gz"
    return {"CTChest4.nrrd (HU)": read_image(Path(get_testdata_file("CTChest4.nrrd"))), f"{sample.name} (8-bit)": read_image(sample)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resattunet-lesion-lung-v1", default_model_name()],
                        help="registry names or checkpoint files (default: v1 and the default model)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    images = volumes()
    settings = {"no guard rails": NO_GUARD_RAILS, "default guard rails": GuardRails()}
    predictors = {name: Predictor.from_checkpoint(name, device="cpu") for name in args.models}
    best: dict[tuple, float] = {}
    for _ in range(args.repeats):
        for model, predictor in predictors.items():
            for setting, guard_rails in settings.items():
                predictor.guard_rails = guard_rails
                for volume, image in images.items():
                    started = time.perf_counter()
                    predictor.segment_image(image)
                    seconds = (time.perf_counter() - started) / image.GetSize()[2]
                    key = (model, setting, volume)
                    best[key] = min(best.get(key, seconds), seconds)
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; default guard rails: {GuardRails().to_dict()}")
    print("| model | guard rails | " + " | ".join(f"{volume} s/slice" for volume in images) + " |")
    print("|---|---|" + "---|" * len(images))
    for model in predictors:
        for setting in settings:
            print(f"| {model} | {setting} | " + " | ".join(f"{best[model, setting, volume]:.3f}" for volume in images) + " |")


if __name__ == "__main__":
    main()
