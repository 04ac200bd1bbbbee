"""Inference speed and memory: the network alone and the end-to-end CLI on a synthetic 512×512×N CT.

Prints a markdown table (and with ``--markdown``/``--json`` writes it) for each device asked for:

- *network*: slices/s of the network alone on preprocessed 256² inputs, for each precision (fp32; on CUDA also
  fp16 and bf16 autocast), batch size, memory format (``channels_last`` or not) and, with ``--compile``, the
  ``torch.compile``d network (one configuration: the first CUDA precision and batch size given, ``channels_last``);
  peak GPU memory of each;
- *CLI*: ``covidlesionseg segment`` end to end (read, preprocess, network with the core's fp16 autocast on CUDA,
  statistics, write) on a synthetic 512×512×``--slices`` HU volume, slices/s and peak resident memory.

::

    python Testing/benchmarks/benchmark_inference.py --slices 32 --model resattunet                 # CPU and CUDA
    python Testing/benchmarks/benchmark_inference.py --devices cuda --slices 300 --batch-sizes 8 32 \\
        --precisions fp32 fp16 bf16 --compile --time-budget 80 --markdown speed.md --json speed.json

The network is the named architecture with random weights (speed does not depend on the weights), saved
as a real checkpoint so the CLI path is the one users run. ``--time-budget`` stops starting new measurements
once that many seconds have passed (the CLI row is measured first); rows not measured are listed as skipped.
Not a test: figures depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from COVIDLesionSegLib import cli
from COVIDLesionSegLib.checkpoints import Checkpoint, save_checkpoint
from COVIDLesionSegLib.models import build_model
from COVIDLesionSegLib.predictor import Predictor

AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}
TINY_WIDTHS = [4, 8, 16, 32, 64]  # --tiny: a U-Net this narrow (dry runs)


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


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def network_speed(network, device: torch.device, batch_size: int, size: int, channels: int, slices: int,
                  precision: str = "fp32", channels_last: bool = True, seconds: float = 5.0) -> dict:
    """Slices/s of ``network`` on random ``[batch_size, channels, size, size]`` inputs: two warm-up batches (and
    compilation) excluded, then batches until ``slices`` slices or ``seconds`` have passed (at least one batch).
    Peak GPU memory in MB on CUDA."""
    batch = torch.randn(batch_size, channels, size, size, device=device)
    if channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast(device.type, dtype=AUTOCAST[precision]) if precision in AUTOCAST else nullcontext()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode(), autocast:
        warm_started = time.perf_counter()
        for _ in range(2):
            network(batch)
        synchronize(device)
        warm_up = time.perf_counter() - warm_started
        started, done = time.perf_counter(), 0
        while done < slices and (done == 0 or time.perf_counter() - started < seconds):
            network(batch)
            done += batch_size
            if done % (8 * batch_size) == 0:
                synchronize(device)  # keep the clock honest without a sync per batch
        synchronize(device)
    elapsed = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"slices_per_s": done / elapsed, "slices": done, "seconds": round(elapsed, 3), "warm_up_s": round(warm_up, 2),
            "peak_gpu_mb": peak}  # fmt: skip


def cli_speed(checkpoint: Path, volume: Path, output: Path, device: str, batch_size: int, slices: int) -> dict:
    """``covidlesionseg segment`` on ``volume`` (seconds, slices/s, peak RSS); raises if it fails."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    status = cli.main(["segment", str(volume), "-o", str(output), "--weights", str(checkpoint), "--device", device, "--backend", "torch",
                       "--batch-size", str(batch_size), "--progress", "none", "--overwrite"])  # fmt: skip
    # (the network in PyTorch, as measured above; ONNX Runtime's CLI figures come from benchmark_memory_speed.py)
    seconds = time.perf_counter() - started
    if status != 0:
        raise RuntimeError(f"{device}: the CLI failed (exit {status})")
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    return {"slices_per_s": slices / seconds, "seconds": round(seconds, 2), "peak_rss_mb": round(peak_rss_mb()), "peak_gpu_mb": peak}


def measure_compiled(network, device, precision, batch, size, channels, args, base, add, over_budget) -> None:
    """One row: the ``torch.compile``d network (channels_last), compilation in its warm-up."""
    row = {**base, "what": "network", "precision": precision, "batch": batch, "compiled": True}
    if over_budget():
        add({**row, "note": "skipped: time budget spent"})
        return
    compiled = torch.compile(network.to(memory_format=torch.channels_last))
    try:
        row.update(network_speed(compiled, device, batch, size, channels, args.network_slices, precision, True, args.seconds))
        row["note"] = f"compilation + warm-up {row['warm_up_s']} s"
    except Exception as error:  # compilation can fail on an image without a compiler; say so
        row["note"] = f"torch.compile failed: {type(error).__name__}: {str(error)[:120]}"
    add(row)


def markdown(report: dict) -> str:
    lines = [
        f"Model `{report['model']}` ({report['parameters']:,} parameters, random weights), input {report['size']}², "
        f"torch {report['torch']}, {report['gpu'] or 'no GPU'}; {report['date']}.",
        "",
        "| device | what | precision | batch | channels_last | compiled | slices/s | peak GPU MB | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        speed = "—" if row.get("slices_per_s") is None else f"{row['slices_per_s']:.1f}"
        peak = "—" if row.get("peak_gpu_mb") is None else f"{row['peak_gpu_mb']:.0f}"
        lines.append(
            f"| {row['device']} | {row['what']} | {row['precision']} | {row['batch']} | {'yes' if row['channels_last'] else 'no'} | "
            f"{'yes' if row.get('compiled') else 'no'} | {speed} | {peak} | {row.get('note', '')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resattunet")
    parser.add_argument("--tiny", action="store_true", help=f"a U-Net of widths {TINY_WIDTHS} instead (dry runs)")
    parser.add_argument("--slices", type=int, default=32, help="slices of the synthetic 512×512 volume, and per network measurement")
    parser.add_argument("--batch-size", type=int, default=8, help="the CLI's batch size")
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="network batch sizes (default: --batch-size)")
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "fp16", "bf16"], default=["fp32", "fp16"],
                        help="network precisions on CUDA (the CPU runs fp32 only; default fp32 fp16)")  # fmt: skip
    parser.add_argument("--both-formats", action="store_true", help="measure contiguous inputs beside channels_last")
    parser.add_argument("--compile", action="store_true", help="also torch.compile the network (one configuration)")
    parser.add_argument("--no-cli", action="store_true", help="skip the end-to-end CLI rows")
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"])
    parser.add_argument("--seconds", type=float, default=5.0, help="at most this long per network measurement (default 5)")
    parser.add_argument("--network-slices", type=int, help="at most this many slices per network measurement (default --slices)")
    parser.add_argument("--time-budget", type=float, help="start no measurement after this many seconds")
    parser.add_argument("--markdown", type=Path, help="write the table here")
    parser.add_argument("--json", type=Path, help="write every number here")
    args = parser.parse_args(argv)
    args.network_slices = args.network_slices or args.slices
    began = time.perf_counter()
    over_budget = lambda: args.time_budget is not None and time.perf_counter() - began > args.time_budget  # noqa: E731
    cuda_name = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, CUDA: {cuda_name or 'no'}", flush=True)
    model_name, kwargs = ("unet", {"widths": TINY_WIDTHS}) if args.tiny else (args.model, {})
    network_cpu = build_model(model_name, **kwargs).eval()
    report = {"model": model_name + (" (tiny)" if args.tiny else ""), "parameters": sum(p.numel() for p in network_cpu.parameters()),
              "torch": torch.__version__, "gpu": cuda_name, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "rows": []}  # fmt: skip
    cli_ok = not args.no_cli and not getattr(sitk, "STUB", False)

    def add(row: dict) -> None:
        """Record a row and rewrite the outputs, so a run cut off by a time limit keeps the rows measured."""
        report["rows"].append(row)
        print(row, flush=True)
        if args.markdown:
            args.markdown.write_text(markdown(report))
        if args.json:
            args.json.write_text(json.dumps(report, indent=1) + "\n")
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        checkpoint = save_checkpoint(Checkpoint(model_name, kwargs, network_cpu.state_dict()), folder / "model.safetensors")
        predictor = Predictor.from_checkpoint(checkpoint, "cpu", args.batch_size)
        size, channels = predictor.preprocessing.size, predictor.preprocessing.input_channels
        report["size"] = size
        volume = folder / "synthetic.nii.gz"
        if cli_ok:
            sitk.WriteImage(synthetic_ct(args.slices), str(volume))
        for device_name in args.devices:
            if device_name.startswith("cuda") and not torch.cuda.is_available():
                print("cuda: skipped (no CUDA GPU visible)")
                continue
            device = torch.device(device_name)
            base = {"device": device_name, "channels_last": True}
            if cli_ok:
                row = {**base, "what": f"CLI 512×512×{args.slices}", "precision": "fp16 autocast" if device.type == "cuda" else "fp32",
                       "batch": args.batch_size}  # fmt: skip
                row.update(cli_speed(checkpoint, volume, folder / f"out-{device_name}", device_name, args.batch_size, args.slices))
                row["note"] = f"{row['seconds']} s, peak RSS {row['peak_rss_mb']} MB"
                add(row)
            elif not args.no_cli:
                add({**base, "what": "CLI", "precision": "—", "batch": args.batch_size, "note": "skipped: " + sitk.REASON})
            network = build_model(model_name, **kwargs).to(device).eval()
            network.load_state_dict(network_cpu.state_dict())
            batches = args.batch_sizes or [args.batch_size]
            configurations = [
                (precision, batch, channels_last)
                for precision in (args.precisions if device.type == "cuda" else ["fp32"])
                for batch in batches
                for channels_last in ((True, False) if args.both_formats else (True,))
            ]
            # the largest batch in channels_last first, then the compiled network, then the rest: a budget cut drops the rest
            first = [item for item in configurations if item[1] == max(batches) and item[2]]
            compile_at = len(first) if args.compile and device.type == "cuda" else None
            ordered = first + [item for item in configurations if item not in first]
            for position in range(len(ordered) + 1):
                if position == compile_at:
                    measure_compiled(network, device, args.precisions[-1], max(batches), size, channels, args, base, add, over_budget)
                if position == len(ordered):
                    break
                precision, batch, channels_last = ordered[position]
                row = {**base, "what": "network", "precision": precision, "batch": batch, "channels_last": channels_last}
                if over_budget():
                    add({**row, "note": "skipped: time budget spent"})
                    continue
                network = network.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
                try:
                    settings = (precision, channels_last, args.seconds)
                    row.update(network_speed(network, device, batch, size, channels, args.network_slices, *settings))
                except torch.cuda.OutOfMemoryError:
                    row["note"] = "out of GPU memory"
                    torch.cuda.empty_cache()
                add(row)
    print("\n" + markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
