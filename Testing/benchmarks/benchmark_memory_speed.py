"""Peak memory, start-up and time of ``covidlesionseg segment`` per network backend on synthetic 512² HU chest CTs.

    nice -n 19 python Testing/benchmarks/benchmark_memory_speed.py --slices 60 300 600

For each slice count the CLI runs at its default settings (the shipped default model, seg.nrrd output, default guard
rails; ``--progress lines`` only, to see the first slices) with each ``--backends`` in turn (by default ``--backend torch``,
``torch-bf16``, ``onnxruntime``, ``onnxruntime-int8``, alternating, so that all see the same load) in a child
process on a synthetic 512×512×N HU volume written as ``.nii.gz`` in a temporary folder, and the table gives:

- *peak RSS*: the child's maximum resident set size (``os.wait4``, the kernel's own figure for that process);
- *wall*: process start to exit; CLI slices/s = N / wall;
- *to first batch*: process start to the CLI's first ``PROGRESS`` line, i.e. imports, model load, reading the
  volume and whatever the code does before the network's first batch of slices is done (the start-up). The ONNX
  exports are made (or found) before the CLI runs, so the ONNX Runtime rows are those of a warm cache;
- *network slices/s*: the network alone (this process, batch ``--batch-size``, random 256² inputs): PyTorch eager
  ``channels_last`` (fp32, and under bf16 autocast for torch-bf16) and the ONNX Runtime sessions, measured in
  ``--rounds`` alternating rounds; the ratio to PyTorch is that of each round's pair, so that a change of load between
  rounds cancels out.

``--lungmask-env DIR`` also runs ``lungmask`` (R231, the 2D lung CT U-Net CLI people already use) on each volume as
the reference, at its default settings (batch 20, its post-processing on) but with random weights of its R231
network (``--modelpath``; its real weights are downloaded at run time, which these machines cannot): its speed does
not depend on the weights, except in the post-processing of what the network paints. lungmask lives in the benchmark's
own venv at DIR (made on first use): a ``.pth`` file there adds this interpreter's site-packages, so torch, numpy and
SimpleITK are shared, and pip installs lungmask and what else it needs into DIR only.

``--source DIR`` runs the CLI of another copy of ``COVIDLesionSegLib`` (a folder holding it, e.g. an earlier
commit unpacked with ``git archive``), to compare code versions on the same machine and volumes (one without
``--backend`` needs ``--backends default``). ``--baseline DIR`` runs such a copy's CLI at its own defaults on each
volume as well, right after the backends, and prints each backend's wall time as a fraction of it: how much faster
the code got than that version, in one run. Children run with ``OMP_NUM_THREADS`` = ``--threads``. Not a test: the
figures depend on the machine and on its other load, which the machine line gives (load average at the start).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

SPACING_MM = (0.7, 0.7, 1.0)
NETWORK_BACKENDS = ("torch", "torch-bf16", "onnxruntime", "onnxruntime-int8")  # the CLI's --backend but auto


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


def timed_child(command: list[str], threads: int) -> dict:
    """Run ``command`` with ``OMP_NUM_THREADS`` = ``threads``: wall time, time to its first ``PROGRESS`` line (None
    without one), peak RSS, exit status and the end of its standard error."""
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment, text=True)
    first_batch = None
    for line in child.stdout:
        if first_batch is None and line.startswith("PROGRESS"):
            first_batch = time.perf_counter() - started
    errors = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    return {"wall_s": time.perf_counter() - started, "first_batch_s": first_batch, "peak_rss_mib": usage.ru_maxrss / 1024,
            "exit": os.waitstatus_to_exitcode(status), "errors": errors[-2000:]}


def run_cli(volume: Path, output: Path, source: Path | None, threads: int, backend: str) -> dict:
    """The CLI in a child process at default settings (``--backend backend`` unless "default"); see ``timed_child``."""
    bootstrap = "import sys\n" + (f"sys.path.insert(0, {str(source)!r})\n" if source else "") + \
        "from COVIDLesionSegLib.cli import main\nsys.exit(main())"
    command = [sys.executable, "-c", bootstrap, "segment", str(volume), "-o", str(output), "--progress", "lines", "--overwrite"]
    result = timed_child(command + ([] if backend == "default" else ["--backend", backend]), threads)
    if result["exit"] != 0 or "the network runs in PyTorch" in result["errors"]:  # failed, or fell back from the backend asked for
        raise RuntimeError(f"the CLI ({backend}) failed or fell back on {volume.name} (exit {result['exit']}):\n{result['errors']}")
    return result


LUNGMASK = "lungmask==0.2.22"


def lungmask_python(environment: Path) -> Path:
    """The Python of the benchmark's own venv ``environment`` holding ``LUNGMASK`` (made on first use; see the module's
    docstring): torch, numpy and SimpleITK come from this interpreter's site-packages through a ``.pth`` file."""
    python = environment / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(environment)], check=True)
        site_packages = next(environment.glob("lib/python*/site-packages"))
        (site_packages / "covidlesionseg-benchmark-base.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", LUNGMASK], check=True)
    return python


def write_random_r231(python: Path, path: Path) -> Path:
    """A state dict of lungmask's R231 network (its ``get_model`` settings) with seeded random weights."""
    subprocess.run([str(python), "-c", "import torch; from lungmask.resunet import UNet; torch.manual_seed(0); "
                    "torch.save(UNet(n_classes=3, padding=True, depth=5, up_mode='upsample', batch_norm=True, residual=False)"
                    f".state_dict(), {str(path)!r})"], check=True)
    return path


def run_lungmask(python: Path, weights: Path, volume: Path, output: Path, threads: int) -> dict:
    """lungmask's CLI in a child process at its default settings but ``--modelpath weights``; see ``timed_child``."""
    result = timed_child([str(python), "-m", "lungmask", str(volume), str(output), "--modelpath", str(weights), "--noprogress"], threads)
    if result["exit"] != 0 or not output.exists():
        raise RuntimeError(f"lungmask failed on {volume.name} (exit {result['exit']}):\n{result['errors']}")
    return result


def select_figures(result: dict) -> dict:
    """The timings and peak RSS of a ``timed_child`` result, rounded for a progress line."""
    return {key: None if result[key] is None else round(result[key], 2) for key in ("wall_s", "first_batch_s", "peak_rss_mib")}


def in_child(code: str, threads: int) -> None:
    """Run ``code`` in a child Python with this module's names. This process stays small before the CLI runs: a child's
    peak RSS (``ru_maxrss``) counts its parent's peak when it was started (Linux carries it over on ``exec``)."""
    subprocess.run([sys.executable, "-c", f"from benchmark_memory_speed import *\n{code}"], check=True, cwd=Path(__file__).parent,
                   env={**os.environ, "OMP_NUM_THREADS": str(threads)})


def default_model() -> tuple[Path, str]:
    """The shipped default model's file and SHA-256."""
    from COVIDLesionSegLib.checkpoints import locate_model, sha256_of
    from COVIDLesionSegLib.resources import default_model_name

    path, _ = locate_model(default_model_name())
    return path, sha256_of(path)


def network_speeds(backends: list[str], batch_size: int, threads: int, seconds: float, rounds: int) -> dict[str, list[float]]:
    """Slices/s of the shipped default model's network alone in each backend, ``rounds`` alternating rounds of
    ``seconds`` each after two warm-up batches: PyTorch eager with ``channels_last`` (fp32, or bf16 autocast for torch-bf16),
    ONNX Runtime's sessions."""
    import torch

    from COVIDLesionSegLib.backends import open_backend

    torch.set_num_threads(threads)
    path, sha256 = default_model()
    runs = {}
    for name in backends:
        backend, checkpoint = open_backend(path, sha256, name, "cpu", threads=threads)
        config = checkpoint.preprocessing
        inputs = np.random.default_rng(0).normal(size=(batch_size, config.input_channels, config.size, config.size)).astype(np.float32)
        if name.startswith("torch"):
            tensor = torch.from_numpy(inputs).contiguous(memory_format=torch.channels_last)

            def run(network=backend.network, tensor=tensor, bf16=backend.cpu_bf16):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    return network(tensor)

            runs[name] = run
        else:
            runs[name] = lambda backend=backend, inputs=inputs: backend.logits(inputs)
    speeds = {name: [] for name in runs}
    with torch.inference_mode():
        for run in runs.values():
            run(), run()
        for _ in range(rounds):
            for name, run in runs.items():
                started, done = time.perf_counter(), 0
                while done == 0 or time.perf_counter() - started < seconds:
                    run()
                    done += batch_size
                speeds[name].append(done / (time.perf_counter() - started))
    return speeds


def print_wall_ratios(name: str, short: str, references: dict[int, dict], rows: list[tuple], backends: list[str]) -> None:
    """A markdown table of each backend's CLI wall time over ``references``' (by slice count) on the same volume."""
    print(f"\nCLI wall / {name}'s wall on the same volume (below 1: faster than {short}):\n")
    print("| volume | " + " | ".join(backends) + " |")
    print("|---|" + "---|" * len(backends))
    for slices, reference in references.items():
        ratios = [result["wall_s"] / reference["wall_s"] for count, _, result in rows if count == slices]
        print(f"| 512×512×{slices} | " + " | ".join(f"{ratio:.2f}" for ratio in ratios) + " |")


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
    versions = []
    for package in ("torch", "onnxruntime"):
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")  # not imported: this process stays small
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"no {package}")
    versions = ", ".join(versions)
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return f"{model}, {os.cpu_count()} cores{memory}, Python {platform.python_version()}, {versions}{load}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, nargs="+", default=[60, 300, 600], help="slice counts of the synthetic volumes")
    parser.add_argument("--backends", nargs="+", default=list(NETWORK_BACKENDS), choices=[*NETWORK_BACKENDS, "auto", "default"],
                        help="the CLI's --backend of each run, in turn ('default': no --backend, for --source code without it)")
    parser.add_argument("--threads", type=int, default=2, help="torch/OpenMP/ONNX Runtime threads of the CLI and the network")
    parser.add_argument("--batch-size", type=int, default=8, help="batch of the network measurement (the CLI's default is 8)")
    parser.add_argument("--network-seconds", type=float, default=10.0, help="how long each round measures each backend's network")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of the network measurement")
    parser.add_argument("--source", type=Path, help="a folder holding another COVIDLesionSegLib to run instead of the installed one")
    parser.add_argument("--baseline", type=Path, help="a folder holding an earlier COVIDLesionSegLib: also run its CLI (its "
                        "defaults) on each volume and compare")
    parser.add_argument("--lungmask-env", type=Path, help=f"the benchmark's own venv for {LUNGMASK} (made on first use): run it as "
                        "the reference on each volume")
    args = parser.parse_args(argv)
    described = machine()
    print(f"Machine: {described}", flush=True)
    network_backends = [name for name in NETWORK_BACKENDS if name in args.backends]
    exported = {name for name in network_backends if name.startswith("onnxruntime")}
    exported |= {"onnxruntime"} if "auto" in args.backends else set()  # auto runs ONNX Runtime on CPUs without native bf16
    for backend in sorted(exported):  # ONNX exports made before the CLI runs
        started = time.perf_counter()
        in_child(f"from COVIDLesionSegLib.backends import open_backend; open_backend(*default_model(), {backend!r}, 'cpu')", args.threads)
        print(f"{backend}: export of the default model made or found valid in {time.perf_counter() - started:.1f} s", flush=True)
    rows, references, baselines = [], {}, {}
    with tempfile.TemporaryDirectory(prefix="covidlesionseg-benchmark-") as folder:
        folder = Path(folder)
        if args.lungmask_env:
            python = lungmask_python(args.lungmask_env.resolve())
            weights = write_random_r231(python, folder / "r231-random.pth")
        for slices in args.slices:
            volume = folder / f"synthetic-512x512x{slices}.nii.gz"
            in_child(f"write_volume(Path({str(volume)!r}), {slices})", args.threads)
            for backend in args.backends:
                result = run_cli(volume, folder / f"out-{slices}-{backend}", args.source, args.threads, backend)
                rows.append((slices, backend, result))
                print(f"{slices} slices, {backend}: {select_figures(result)}", flush=True)
            if args.baseline:
                baselines[slices] = run_cli(volume, folder / f"out-{slices}-baseline", args.baseline, args.threads, "default")
                print(f"{slices} slices, baseline: {select_figures(baselines[slices])}", flush=True)
            if args.lungmask_env:
                references[slices] = run_lungmask(python, weights, volume, folder / f"lungmask-{slices}.nii.gz", args.threads)
                print(f"{slices} slices, lungmask: {select_figures(references[slices])}", flush=True)
            volume.unlink()
    speeds = network_speeds(network_backends, args.batch_size, args.threads, args.network_seconds, args.rounds)
    code = f"COVIDLesionSegLib from {args.source}" if args.source else "the installed COVIDLesionSegLib"
    print(f"\nMachine: {described}; {args.threads} threads; {code}; CLI at default settings (shipped default model) but --backend.\n")
    print("| volume | backend | peak RSS (MiB) | wall (s) | CLI slices/s | to first batch (s) |")
    print("|---|---|---|---|---|---|")
    baseline = f"baseline {args.baseline} (its defaults)" if args.baseline else ""
    table_rows = (rows + [(slices, baseline, result) for slices, result in baselines.items()]
                  + [(slices, f"{LUNGMASK} (R231, random weights)", result) for slices, result in references.items()])
    for slices, backend, result in sorted(table_rows, key=lambda row: row[0]):
        first = "—" if result["first_batch_s"] is None else f"{result['first_batch_s']:.1f}"
        print(f"| 512×512×{slices} | {backend} | {result['peak_rss_mib']:.0f} | {result['wall_s']:.1f} | "
              f"{slices / result['wall_s']:.2f} | {first} |")
    for name, short, by_volume in ((LUNGMASK, "lungmask", references), (f"the {baseline}", "the baseline", baselines)):
        if by_volume:
            print_wall_ratios(name, short, by_volume, rows, args.backends)
    others = [backend for backend in args.backends if backend != "torch"]
    if "torch" in args.backends and others:
        by_run = {(slices, backend): result for slices, backend, result in rows}
        print("\nEach backend / torch, same volume, consecutive runs:\n")
        print("| volume | backend | wall | to first batch | peak RSS |")
        print("|---|---|---|---|---|")
        for slices in args.slices:
            eager = by_run[slices, "torch"]
            for backend in others:
                other = by_run[slices, backend]
                first = ("—" if None in (other["first_batch_s"], eager["first_batch_s"])
                         else f"{other['first_batch_s'] / eager['first_batch_s']:.2f}")
                print(f"| 512×512×{slices} | {backend} | {other['wall_s'] / eager['wall_s']:.2f} | {first} | "
                      f"{other['peak_rss_mib'] / eager['peak_rss_mib']:.2f} |")
    counts = sorted({slices for slices, _, _ in rows})
    if 300 in counts and 600 in counts:
        volume_mib = 300 * 512 * 512 * (2 + 2) / 2**20  # 300 more slices of int16 input + two uint8 output masks
        for backend in args.backends:
            peaks = {slices: result["peak_rss_mib"] for slices, name, result in rows if name == backend}
            print(f"\nPeak RSS growth from 300 to 600 slices, {backend}: {peaks[600] - peaks[300]:.0f} MiB "
                  f"(300 slices of int16 input and two uint8 masks: {volume_mib:.0f} MiB).")
    print(f"\nNetwork alone (batch {args.batch_size}, 256², {args.threads} threads; {args.rounds} alternating rounds of "
          f"{args.network_seconds:g} s each), slices/s per round:")
    for name, values in speeds.items():
        label = "torch (eager, channels_last, fp32)" if name == "torch" else name
        print(f"- {label}: {', '.join(f'{value:.2f}' for value in values)} (median {np.median(values):.2f})")
    for name in [name for name in speeds if name != "torch" and "torch" in speeds]:
        ratios = [other / eager for eager, other in zip(speeds["torch"], speeds[name], strict=True)]
        print(f"- {name} / torch per round: {', '.join(f'{ratio:.2f}' for ratio in ratios)} (median {np.median(ratios):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
