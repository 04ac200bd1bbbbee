"""Run the segmentation CLI in a child process, stream its output, and cancel it with its whole process tree.

The 3D Slicer module runs ``python -m COVIDLesionSegLib.cli segment ... --progress lines`` through
:class:`ChildProcess` so that Slicer's GUI never blocks: a reader thread queues the child's output lines
(stdout and stderr merged) and the GUI calls :meth:`ChildProcess.poll` from a timer. Lines of the form
``PROGRESS <percent 0-100> <message>`` become progress updates, every other line is log text.
:meth:`ChildProcess.cancel` ends the child and all of its descendants (Slicer's ``PythonSlicer`` is a
launcher that starts the real interpreter as its own child, so ending only the launcher is not enough).

Nothing here imports slicer, qt or torch; ``psutil`` is imported only when a run is cancelled.
"""

from __future__ import annotations

import contextlib
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

PROGRESS_PREFIX = "PROGRESS "
PACKAGE_PARENT = Path(__file__).resolve().parent.parent  # the folder that holds COVIDLesionSegLib


@dataclass(frozen=True)
class Progress:
    percent: float
    message: str


def parse_progress(line: str) -> Progress | None:
    """``"PROGRESS 12.5 case7: slice 3/40"`` → ``Progress(12.5, "case7: slice 3/40")``; None for other lines."""
    if not line.startswith(PROGRESS_PREFIX):
        return None
    percent, _, message = line[len(PROGRESS_PREFIX) :].partition(" ")
    try:
        return Progress(min(max(float(percent), 0.0), 100.0), message.strip())
    except ValueError:
        return None


def segment_command(
    inputs: Sequence[str | Path],
    output_dir: str | Path,
    *,
    python: str | Path = sys.executable,
    model: str | None = None,
    weights: str | Path | None = None,
    device: str = "auto",
    backend: str = "auto",
    batch_size: int = 8,
    include_lung: bool = True,
    overwrite: bool = False,
    report: bool = False,
    high_opacity_threshold_hu: float | None = None,
    lesion_min_contrast_hu: float | None = None,
) -> list[str]:
    """The ``covidlesionseg segment`` command line run by ``python``, writing ``.seg.nrrd`` files and progress lines.

    ``weights`` (a checkpoint file) takes precedence over ``model`` (a registry name); with neither, the CLI
    uses the registry's default model. ``report`` adds ``--report`` (a ``<case>.report.png`` per case);
    ``high_opacity_threshold_hu`` is passed as ``--high-opacity-threshold`` and ``lesion_min_contrast_hu`` as
    ``--lesion-min-contrast-hu`` (0: off; None, for either: the CLI's default). ``backend`` "auto" runs
    the network in ONNX Runtime on the CPU when the onnxruntime package is installed in that Python, else in PyTorch.
    """
    command = [str(python), "-m", "COVIDLesionSegLib.cli", "segment", *map(str, inputs), "--output-dir", str(output_dir),
               "--device", device, "--backend", backend, "--batch-size", str(batch_size), "--format", "seg.nrrd", "--progress", "lines"]
    if weights:
        command += ["--weights", str(weights)]
    elif model:
        command += ["--model", model]
    if not include_lung:
        command.append("--no-lung")
    if overwrite:
        command.append("--overwrite")
    if report:
        command.append("--report")
    if high_opacity_threshold_hu is not None:
        command.append(f"--high-opacity-threshold={float(high_opacity_threshold_hu)!r}")  # "=": a value such as -1e-05 is no option
    if lesion_min_contrast_hu is not None:
        command.append(f"--lesion-min-contrast-hu={'off' if lesion_min_contrast_hu == 0 else repr(float(lesion_min_contrast_hu))}")
    return command


def child_environment(device: str = "auto", base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with ``COVIDLesionSegLib`` importable, unbuffered UTF-8
    output, and CUDA hidden from the child when ``device`` is ``"cpu"``."""
    environment = dict(os.environ if base is None else base)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_PARENT), environment.get("PYTHONPATH")]))
    environment["PYTHONUNBUFFERED"] = "1"
    environment["PYTHONIOENCODING"] = "utf-8"
    if device == "cpu":
        environment["CUDA_VISIBLE_DEVICES"] = "-1"
    return environment


class ChildProcess:
    """A started command whose output lines are read by a background thread."""

    def __init__(self, command: Sequence[str], env: dict[str, str] | None = None, cwd: str | Path | None = None):
        self.command = list(command)
        self.cancelled = False
        hide_console = {"creationflags": subprocess.CREATE_NO_WINDOW} if os.name == "nt" else {}
        self._process = subprocess.Popen(
            self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, encoding="utf-8", errors="replace", bufsize=1, env=env, cwd=cwd, **hide_console,
        )
        self._lines: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._reader = threading.Thread(target=self._read_output, name="COVIDLesionSeg child output", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self._process.pid

    def _read_output(self) -> None:
        with self._process.stdout as stream:
            for line in stream:
                self._lines.put(line.rstrip("\r\n"))

    def poll(self, on_progress: Callable[[Progress], None] | None = None, on_log: Callable[[str], None] | None = None) -> int | None:
        """Hand every line read so far to ``on_progress`` or ``on_log``; never blocks.

        Returns the exit code once the child has ended and all of its output has been handed over, else None.
        """
        # Checked before draining: once the reader is done, every line is already in the queue.
        finished = not self._reader.is_alive() and self._process.poll() is not None
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                break
            progress = parse_progress(line)
            if progress is not None:
                if on_progress:
                    on_progress(progress)
            elif on_log:
                on_log(line)
        return self._process.returncode if finished else None

    def wait(self, on_progress: Callable[[Progress], None] | None = None, on_log: Callable[[str], None] | None = None,
             interval_s: float = 0.05) -> int:
        """Block until the child ends, handing its output over as :meth:`poll` does; returns the exit code."""
        while (returncode := self.poll(on_progress, on_log)) is None:
            time.sleep(interval_s)
        return returncode

    def cancel(self, timeout_s: float = 5.0) -> None:
        """End the child and all of its descendants: terminate them, then kill what is still alive after ``timeout_s``.

        The descendants are listed before anything is ended, so none escapes by being orphaned first. ``cancelled``
        is set only when the child was still running (a child that had already ended keeps its own result).
        """
        import psutil

        self.cancelled = self._process.poll() is None
        try:
            descendants = psutil.Process(self._process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            descendants = []
        if self._process.poll() is None:
            self._process.terminate()
        for process in descendants:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.terminate()
        try:
            self._process.wait(timeout_s)  # through Popen, so its exit status is kept
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        for process in _running_after(descendants, timeout_s):
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()


def _running_after(processes: list, timeout_s: float) -> list:
    """The ``psutil`` processes still running after up to ``timeout_s``; zombies count as ended (a zombie has exited
    and only waits for its new parent, often a slow init, to collect it)."""
    import psutil

    def running(process) -> bool:
        try:
            return process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + timeout_s
    while (alive := [process for process in processes if running(process)]) and time.monotonic() < deadline:
        time.sleep(0.02)
    return alive
