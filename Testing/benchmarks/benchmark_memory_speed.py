"""Peak memory and time of ``covidlesionseg segment`` on synthetic 512² HU chest CTs of growing length.

    nice -n 19 python Testing/benchmarks/benchmark_memory_speed.py --slices 60 300 600

For each slice count the CLI runs at its default settings (the shipped default model, seg.nrrd output,
default guard rails; ``--progress lines`` only, to see the first slices) in a child process on a
synthetic 512×512×N HU volume written as ``.nii.gz`` in a temporary folder, and the table gives:

- *peak RSS*: the child's maximum resident set size (``os.wait4``, the kernel's own figure for that process);
- *wall*: process start to exit; CLI slices/s = N / wall;
- *to first batch*: process start to the CLI's first ``PROGRESS`` line, i.e. imports, model load, reading the
  volume and whatever the code does before the network's first batch of slices is done;
- *network slices/s*: the network alone (this process, batch ``--batch-size``, ``channels_last``, fp32, random
  256² inputs), so the CLI figures can be read against what the network costs.

``--source DIR`` runs the CLI of another copy of ``COVIDLesionSegLib`` (a folder holding it, e.g. an earlier
commit unpacked with ``git archive``), to compare code versions on the same machine and volumes. Children run
with ``OMP_NUM_THREADS`` = ``--threads``. Not a test: the figures depend on the machine and on its other load.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

SPACING_MM = (0.7, 0.7, 1.0)


def synthetic_ct(slices: int, size: int = 512, seed: int = 0) -> np.ndarray:
    """int16 HU ``[slices, size, size]``: a body ellipse of soft tissue (40 HU) holding two lungs (−850 HU) whose size
    follows the z axis, a few round ground-glass lesions (−300 HU) in them, −3024 outside a circular field of view,
    Gaussian noise (SD 20 HU). Built slice by slice, so that the benchmark itself stays small."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size] / size - 0.5
    volume = np.empty((slices, size, size), dtype=np.int16)
    lesions = [(rng.uniform(0.2, 0.8), side * rng.uniform(0.12, 0.28), rng.uniform(-0.12, 0.12), rng.uniform(0.02, 0.05))
               for side in (-1, 1) for _ in range(3)]  # (z fraction, x, y, radius)
    for z in range(slices):
        fraction = z / max(slices - 1, 1)
        plane = np.full((size, size), -1000.0)
        plane[(x / 0.45) ** 2 + (y / 0.35) ** 2 < 1] = 40
        scale = max(0.0, np.sin(np.pi * (0.1 + 0.8 * fraction)))
        for side in (-0.2, 0.2):
            plane[((x - side) / (0.15 * scale + 1e-6)) ** 2 + (y / (0.25 * scale + 1e-6)) ** 2 < 1] = -850
        for lesion_z, lesion_x, lesion_y, radius in lesions:
            plane[(x - lesion_x) ** 2 + (y - lesion_y) ** 2 + ((fraction - lesion_z) * 0.5) ** 2 < radius**2] = -300
        plane[x**2 + y**2 > 0.25] = -3024
        volume[z] = np.round(plane + rng.normal(0, 20, (size, size)))
    return volume


def write_volume(path: Path, slices: int) -> Path:
    image = sitk.GetImageFromArray(synthetic_ct(slices))
    image.SetSpacing(SPACING_MM)
    sitk.WriteImage(image, str(path), useCompression=True)
    return path


def run_cli(volume: Path, output: Path, source: Path | None, threads: int) -> dict:
    """The CLI in a child process at default settings; wall time, time to the first PROGRESS line, peak RSS."""
    bootstrap = "import sys\n" + (f"sys.path.insert(0, {str(source)!r})\n" if source else "") + \
        "from COVIDLesionSegLib.cli import main\nsys.exit(main())"
    command = [sys.executable, "-c", bootstrap, "segment", str(volume), "-o", str(output), "--progress", "lines", "--overwrite"]
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment, text=True)
    first_batch = None
    for line in child.stdout:
        if first_batch is None and line.startswith("PROGRESS"):
            first_batch = time.perf_counter() - started
    errors = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if child.returncode != 0:
        raise RuntimeError(f"the CLI failed on {volume.name} (exit {child.returncode}):\n{errors[-2000:]}")
    return {"wall_s": wall, "first_batch_s": first_batch, "peak_rss_mib": usage.ru_maxrss / 1024}


def network_speed(batch_size: int, threads: int, seconds: float) -> float:
    """Slices/s of the shipped default model's network alone (fp32, channels_last), after two warm-up batches."""
    import torch

    from COVIDLesionSegLib.predictor import Predictor

    torch.set_num_threads(threads)
    predictor = Predictor.default(device="cpu", batch_size=batch_size)
    config = predictor.preprocessing
    batch = torch.randn(batch_size, config.input_channels, config.size, config.size).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        for _ in range(2):
            predictor.network(batch)
        started, done = time.perf_counter(), 0
        while done == 0 or time.perf_counter() - started < seconds:
            predictor.network(batch)
            done += batch_size
    return done / (time.perf_counter() - started)


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = ""
    try:
        kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
        memory = f", {kib / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration):
        pass
    import torch

    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return f"{model}, {os.cpu_count()} cores{memory}, Python {platform.python_version()}, torch {torch.__version__}{load}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, nargs="+", default=[60, 300, 600], help="slice counts of the synthetic volumes")
    parser.add_argument("--threads", type=int, default=2, help="torch/OpenMP threads of the CLI and the network measurement")
    parser.add_argument("--batch-size", type=int, default=8, help="batch of the network measurement (the CLI's default is 8)")
    parser.add_argument("--network-seconds", type=float, default=20.0, help="how long to measure the network alone")
    parser.add_argument("--source", type=Path, help="a folder holding another COVIDLesionSegLib to run instead of the installed one")
    args = parser.parse_args(argv)
    described = machine()
    print(f"Machine: {described}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="covidlesionseg-benchmark-") as folder:
        folder = Path(folder)
        for slices in args.slices:
            volume = write_volume(folder / f"synthetic-512x512x{slices}.nii.gz", slices)
            result = run_cli(volume, folder / f"out-{slices}", args.source, args.threads)
            rows.append((slices, result))
            print(f"{slices} slices: {result}", flush=True)
            volume.unlink()
    network = network_speed(args.batch_size, args.threads, args.network_seconds)
    code = f"COVIDLesionSegLib from {args.source}" if args.source else "the installed COVIDLesionSegLib"
    print(f"\nMachine: {described}; {args.threads} threads; {code}; CLI at default settings (shipped default model).\n")
    print("| volume | peak RSS (MiB) | wall (s) | CLI slices/s | to first batch (s) |")
    print("|---|---|---|---|---|")
    for slices, result in rows:
        first = "—" if result["first_batch_s"] is None else f"{result['first_batch_s']:.1f}"
        print(f"| 512×512×{slices} | {result['peak_rss_mib']:.0f} | {result['wall_s']:.1f} | {slices / result['wall_s']:.2f} | {first} |")
    counts = [slices for slices, _ in rows]
    if 300 in counts and 600 in counts:
        peaks = {slices: result["peak_rss_mib"] for slices, result in rows}
        volume_mib = 300 * 512 * 512 * (2 + 2) / 2**20  # 300 more slices of int16 input + two uint8 output masks
        print(f"\nPeak RSS growth from 300 to 600 slices: {peaks[600] - peaks[300]:.0f} MiB "
              f"(300 slices of int16 input and two uint8 masks: {volume_mib:.0f} MiB).")
    print(f"\nNetwork alone: {network:.2f} slices/s (batch {args.batch_size}, fp32, channels_last, 256², {args.threads} threads).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
