"""How closely each ONNX Runtime backend's masks follow PyTorch's, on the shipped default model's held-out volumes.

    python Testing/benchmarks/backend_agreement.py

For the shipped sample (``radiopaedia_27_86410_0``, as the CLI reads it) and, when ``../shared/data`` is present, every
second stored slice of ``coronacases_004`` (turned radiological), it prints per backend and channel the Dice of the
backend's mask (probability >= 0.5, before the guard rails) to PyTorch's fp32 mask, and the mask sizes in pixels.
Issue 15 asks a faster path to keep a Dice of at least 0.995; ``Testing/tests/test_backends.py`` holds the bounds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_backends import SAMPLE, dice, held_out_slices  # noqa: E402

from COVIDLesionSegLib.predictor import Predictor  # noqa: E402

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "covid19-ct-seg-20cases-png256"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["onnxruntime", "onnxruntime-int8"])
    args = parser.parse_args(argv)
    volumes = {"radiopaedia_27_86410_0 (sample)": (sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE))), False)}
    if (DATA / "manifest.csv").is_file():
        volumes["coronacases_004 (every 2nd slice)"] = (held_out_slices(DATA, "coronacases_004", 2), True)
    reference = Predictor.default(device="cpu", backend="torch")
    expected = {name: reference.predict_probabilities(volume, preprocessed=preprocessed)
                for name, (volume, preprocessed) in volumes.items()}
    print(f"Model: {reference.name}; masks at probability >= 0.5 against PyTorch fp32's\n")
    print("| backend | volume | channel | Dice | PyTorch pixels | backend pixels |")
    print("|---|---|---|---|---|---|")
    for backend in args.backends:
        predictor = Predictor.default(device="cpu", backend=backend)
        if predictor.backend.name != backend:
            raise SystemExit(f"{backend} could not run here (it fell back to {predictor.backend.name}); see the warning above")
        for name, (volume, preprocessed) in volumes.items():
            found = predictor.predict_probabilities(volume, preprocessed=preprocessed)
            for channel, probabilities in expected[name].items():
                mask, other = probabilities >= 0.5, found[channel] >= 0.5
                print(f"| {backend} | {name} | {channel} | {dice(other, mask):.4f} | {int(mask.sum())} | {int(other.sum())} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
