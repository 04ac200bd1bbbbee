"""How closely each faster backend's masks (bf16, ONNX Runtime) follow PyTorch fp32's, on the shipped model's held-out volumes.

    python Testing/benchmarks/backend_agreement.py [--int8-variants] [--every-volume]

For the shipped sample (``radiopaedia_27_86410_0``, as the CLI reads it) and, when ``../shared/data`` is present, every
second stored slice of ``coronacases_004`` (in radiological orientation, as stored), it prints per backend and channel the
Dice of the backend's mask (probability >= 0.5, and for the lesion also >= the default lesion threshold; before the
guard rails) to PyTorch's fp32 mask, and the mask sizes in pixels.
Issue 15 asks a faster path to keep a Dice of at least 0.995; ``Testing/tests/test_backends.py`` holds the bounds.

``--int8-variants`` also quantizes the export in other ways than the shipped int8 backend does (``INT8_VARIANTS``:
the calibration method, only the convolutions, parts of the network left in fp32) and prints the same rows for each,
with its network speed (batch 8, this process's threads): how far static post-training quantization gets.

``--every-volume`` also compares the masks on every third stored slice of each of the 20 volumes of the shared data and
prints, per backend, channel and threshold, the least Dice over the volumes whose PyTorch mask has at least
:data:`MIN_PIXELS` pixels, that volume, and how many of them fall below 0.995. All but the two held-out volumes were
trained on, which makes the network surer there; how closely two backends agree is a question of arithmetic, so they
still show where it comes close to the bar.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_backends import SAMPLE, dice, held_out_slices  # noqa: E402

from COVIDLesionSegLib.backends import OnnxRuntimeBackend, calibration_inputs, export_onnx, onnxruntime_session, quantize_int8  # noqa: E402
from COVIDLesionSegLib.checkpoints import load_checkpoint, locate_model  # noqa: E402
from COVIDLesionSegLib.predictor import GuardRails, Predictor  # noqa: E402

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "covid19-ct-seg-20cases-png256"
MIN_PIXELS = 1000  # --every-volume: a mask of fewer pixels (in the slices compared) moves its Dice by a handful of them


def in_fp32(*prefixes: str, keep: bool = False):
    """The nodes whose names start with one of ``prefixes`` (``keep``: those that do not) are left in fp32."""
    return lambda names: [name for name in names if name.startswith(prefixes) != keep]


INT8_VARIANTS = {  # name: quantize_int8 options; fp32_nodes maps the export's node names to those left in fp32
    "Percentile calibration, every operator (the shipped int8 backend)": {},
    "MinMax calibration": {"calibration": "MinMax"},
    "Entropy calibration": {"calibration": "Entropy"},
    "convolutions only": {"op_types": ["Conv"]},
    "last decoder stage and head in fp32": {"fp32_nodes": in_fp32("/decoder.3/", "/head/")},
    "last two decoder stages and head in fp32": {"fp32_nodes": in_fp32("/decoder.2/", "/decoder.3/", "/head/")},
    "encoder only (decoder and head in fp32)": {"fp32_nodes": in_fp32("/encoder/", keep=True)},
}


def network_speed(backend: OnnxRuntimeBackend, inputs: np.ndarray, batch_size: int = 8, seconds: float = 4.0) -> float:
    """Slices/s of ``backend`` on ``inputs`` (at least one batch), after one warm-up batch."""
    batch = inputs[:batch_size]
    backend.logits(batch)
    started, done = time.perf_counter(), 0
    while done == 0 or time.perf_counter() - started < seconds:
        backend.logits(batch)
        done += len(batch)
    return done / (time.perf_counter() - started)


def int8_variants(reference: Predictor) -> dict[str, Predictor]:
    """A predictor per :data:`INT8_VARIANTS` entry, on the shipped default model's export quantized that way."""
    import onnx

    path, _ = locate_model(reference.name)
    model = export_onnx(load_checkpoint(path))
    names = [node.name for node in onnx.load_from_string(model).graph.node]
    predictors = {}
    for name, options in INT8_VARIANTS.items():
        options = {**options, "fp32_nodes": options["fp32_nodes"](names)} if "fp32_nodes" in options else options
        backend = OnnxRuntimeBackend(onnxruntime_session(quantize_int8(model, reference.checkpoint.preprocessing, **options)),
                                     "onnxruntime-int8")
        predictors[name] = Predictor(reference.checkpoint, "cpu", reference.batch_size, name=reference.name,
                                     sha256=reference.sha256, backend=backend)
    return predictors


def thresholds(channel: str) -> list[float]:
    """The probability thresholds a channel's masks are compared at: 0.5, and for the lesion the default lesion threshold."""
    return sorted({0.5, GuardRails().lesion_threshold} if channel == "lesion" else {0.5})


def print_least_dice_over_volumes(reference: Predictor, predictors: dict[str, Predictor]) -> None:
    """For each predictor, channel and threshold: the least Dice to ``reference``'s masks over every third stored slice of
    each volume of :data:`DATA` whose reference mask has at least :data:`MIN_PIXELS` pixels, and the count below 0.995."""
    with open(DATA / "manifest.csv", newline="") as stream:
        volume_ids = sorted({row["volume_id"] for row in csv.DictReader(stream)})
    dices: dict[tuple[str, str, float], dict[str, float]] = {}
    for volume_id in volume_ids:
        volume = held_out_slices(DATA, volume_id, 3)
        expected = reference.predict_probabilities(volume, preprocessed=True)
        for label, predictor in predictors.items():
            found = predictor.predict_probabilities(volume, preprocessed=True)
            for channel, probabilities in expected.items():
                for threshold in thresholds(channel):
                    mask = probabilities >= threshold
                    if mask.sum() >= MIN_PIXELS:
                        dices.setdefault((label, channel, threshold), {})[volume_id] = dice(found[channel] >= threshold, mask)
    print(f"\nEvery third stored slice of each of the {len(volume_ids)} volumes (those whose PyTorch mask has at least "
          f"{MIN_PIXELS} pixels):\n")
    print("| backend | channel | threshold | volumes | least Dice | on | below 0.995 |")
    print("|---|---|---|---|---|---|---|")
    for (label, channel, threshold), by_volume in dices.items():
        least = min(by_volume, key=by_volume.get)
        below = sum(value < 0.995 for value in by_volume.values())
        print(f"| {label} | {channel} | {threshold:g} | {len(by_volume)} | {by_volume[least]:.4f} | {least} | {below} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["torch-bf16", "onnxruntime", "onnxruntime-int8"])
    parser.add_argument("--int8-variants", action="store_true", help="also other int8 quantizations of the export (INT8_VARIANTS)")
    parser.add_argument("--every-volume", action="store_true", help="also the least Dice over every third slice of each volume")
    args = parser.parse_args(argv)
    volumes = {"radiopaedia_27_86410_0 (sample)": (sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE))), False)}
    if (DATA / "manifest.csv").is_file():
        volumes["coronacases_004 (every 2nd slice)"] = (held_out_slices(DATA, "coronacases_004", 2), True)
    reference = Predictor.default(device="cpu", backend="torch")
    expected = {name: reference.predict_probabilities(volume, preprocessed=preprocessed)
                for name, (volume, preprocessed) in volumes.items()}
    predictors = {}
    for backend in args.backends:
        predictors[backend] = Predictor.default(device="cpu", backend=backend)
        if predictors[backend].backend.name != backend:
            raise SystemExit(f"{backend} could not run here (it fell back to {predictors[backend].backend.name}); see the warning above")
    if args.int8_variants:
        predictors.update(int8_variants(reference))
    print(f"Model: {reference.name}; masks at probability >= the threshold against PyTorch fp32's\n")
    print("| backend | volume | channel | threshold | Dice | PyTorch pixels | backend pixels |")
    print("|---|---|---|---|---|---|---|")
    for label, predictor in predictors.items():
        for name, (volume, preprocessed) in volumes.items():
            found = predictor.predict_probabilities(volume, preprocessed=preprocessed)
            for channel, probabilities in expected[name].items():
                for threshold in thresholds(channel):
                    mask, other = probabilities >= threshold, found[channel] >= threshold
                    print(f"| {label} | {name} | {channel} | {threshold:g} | {dice(other, mask):.4f} | {int(mask.sum())} | "
                          f"{int(other.sum())} |")
    if args.every_volume:
        print_least_dice_over_volumes(reference, predictors)
    if args.int8_variants:
        inputs = calibration_inputs(reference.checkpoint.preprocessing)
        print("\nNetwork alone, batch 8 of calibration slices, slices/s (this process's threads):\n")
        for label, predictor in predictors.items():
            if isinstance(predictor.backend, OnnxRuntimeBackend):
                print(f"- {label}: {network_speed(predictor.backend, inputs):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
