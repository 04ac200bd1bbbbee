"""Inference speed and memory: the network alone and the end-to-end CLI on a synthetic 512×512×N CT.

Prints a small table (slices/s, seconds, peak resident memory) for the CPU and, when available, CUDA:

    python Testing/benchmarks/benchmark_inference.py --slices 32 --model resattunet

The network is the named architecture with random weights (speed does not depend on the weights), saved
as a real checkpoint so the CLI path is the one users run. Not a test: figures depend on the machine.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from COVIDLesionSegLib import cli
from COVIDLesionSegLib.checkpoints import Checkpoint, save_checkpoint
from COVIDLesionSegLib.models import build_model
from COVIDLesionSegLib.predictor import Predictor


def synthetic_ct(slices: int, size: int = 512) -> sitk.Image:
    """Air outside a body ellipse of soft tissue with two dark lungs; −3024 HU outside a circular FOV."""
    y, x = np.mgrid[:size, :size] / size - 0.5
    plane = np.full((size, size), -1000.0)
    plane[(x / 0.45) ** 2 + (y / 0.35) ** 2 < 1] = 40
    for side in (-0.2, 0.2):
        plane[((x - side) / 0.15) ** 2 + (y / 0.25) ** 2 < 1] = -850
    plane[x**2 + y**2 > 0.25] = -3024
    noise = np.random.default_rng(0).normal(0, 20, (slices, size, size))
    image = sitk.GetImageFromArray((plane[None] + noise).astype(np.int16))
    image.SetSpacing((0.7, 0.7, 1.5))
    return image


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def network_speed(predictor: Predictor, slices: int) -> float:
    """Slices/s of the network alone on preprocessed 256² inputs (one warm-up batch excluded)."""
    size = predictor.preprocessing.size
    batch = torch.randn(predictor.batch_size, predictor.preprocessing.input_channels, size, size, device=predictor.device)
    if predictor.device.type == "cpu":
        batch = batch.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast("cuda", dtype=torch.float16, enabled=predictor.device.type == "cuda")
    with torch.inference_mode(), autocast:
        predictor.network(batch)
        if predictor.device.type == "cuda":
            torch.cuda.synchronize()
        started, done = time.perf_counter(), 0
        while done < slices:
            predictor.network(batch)
            done += len(batch)
        if predictor.device.type == "cuda":
            torch.cuda.synchronize()
    return done / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resattunet")
    parser.add_argument("--slices", type=int, default=32, help="slices of the synthetic 512×512 volume")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"])
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, CUDA: {torch.cuda.is_available()}")
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        checkpoint = save_checkpoint(Checkpoint(args.model, {}, build_model(args.model).state_dict()), folder / "model.safetensors")
        volume = folder / "synthetic.nrrd"
        sitk.WriteImage(synthetic_ct(args.slices), str(volume))
        rows = []
        for device in args.devices:
            if device == "cuda" and not torch.cuda.is_available():
                print("cuda: skipped (no CUDA GPU visible)")
                continue
            predictor = Predictor.from_checkpoint(checkpoint, device, args.batch_size)
            network = network_speed(predictor, args.slices)
            started = time.perf_counter()
            status = cli.main(["segment", str(volume), "-o", str(folder / f"out-{device}"), "--weights", str(checkpoint),
                               "--device", device, "--batch-size", str(args.batch_size), "--progress", "none", "--overwrite"])
            seconds = time.perf_counter() - started
            if status != 0:
                print(f"{device}: the CLI failed (exit {status})", file=sys.stderr)
                return status
            rows.append((device, network, args.slices / seconds, seconds, peak_rss_mb()))
    print(f"\nmodel {args.model}, synthetic CT 512×512×{args.slices}, batch {args.batch_size}")
    print("| device | network slices/s | end-to-end CLI slices/s | CLI seconds | peak RSS MB |")
    print("|---|---|---|---|---|")
    for device, network, end_to_end, seconds, rss in rows:
        print(f"| {device} | {network:.2f} | {end_to_end:.2f} | {seconds:.1f} | {rss:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
