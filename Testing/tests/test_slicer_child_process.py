"""The child-process runner the Slicer module uses: real processes, real output streaming, real process-tree kills."""

from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from COVIDLesionSegLib import child_process
from COVIDLesionSegLib.child_process import ChildProcess, Progress, child_environment, parse_progress, segment_command
from COVIDLesionSegLib.cli import build_parser
from COVIDLesionSegLib.statistics import DEFAULT_HIGH_OPACITY_THRESHOLD_HU


def python_command(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def is_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # ended, not yet reaped by its new parent
    except psutil.NoSuchProcess:
        return True


def poll_until(process: ChildProcess, condition, timeout_s: float = 20.0, **callbacks):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        process.poll(**callbacks)
        time.sleep(0.01)


@pytest.mark.parametrize(("line", "expected"), [
    ("PROGRESS 12.5 case7: slice 3/40", Progress(12.5, "case7: slice 3/40")),
    ("PROGRESS 100", Progress(100.0, "")),
    ("PROGRESS 150 overshoot", Progress(100.0, "overshoot")),
    ("PROGRESS -3 undershoot", Progress(0.0, "undershoot")),
    ("PROGRESS abc slice", None),
    ("OK case7", None),
    ("progress 10 lower case", None),
])
def test_parse_progress(line, expected):
    assert parse_progress(line) == expected


def test_segment_command_is_accepted_by_the_cli_parser(tmp_path):
    command = segment_command([tmp_path / "a.nrrd", tmp_path / "b"], tmp_path / "out", python="/opt/Slicer/bin/PythonSlicer",
                              model="resattunet", weights=tmp_path / "w.safetensors", device="cpu", batch_size=3,
                              include_lung=False, overwrite=True)
    assert command[:3] == ["/opt/Slicer/bin/PythonSlicer", "-m", "COVIDLesionSegLib.cli"]
    arguments = build_parser().parse_args(command[3:])
    assert arguments.inputs == [str(tmp_path / "a.nrrd"), str(tmp_path / "b")]
    assert arguments.output_dir == tmp_path / "out"
    assert arguments.weights == tmp_path / "w.safetensors" and arguments.model is None  # the weights file wins
    assert (arguments.device, arguments.batch_size, arguments.output_format, arguments.progress) == ("cpu", 3, "seg.nrrd", "lines")
    assert arguments.no_lung and arguments.overwrite


def test_segment_command_defaults(tmp_path):
    command = segment_command([tmp_path], tmp_path / "out", model="resattunet")
    arguments = build_parser().parse_args(command[3:])
    assert arguments.model == "resattunet" and arguments.weights is None
    assert (arguments.device, arguments.backend, arguments.batch_size) == ("auto", "auto", 8)
    assert not arguments.no_lung and not arguments.overwrite
    assert not arguments.report and arguments.high_opacity_threshold == DEFAULT_HIGH_OPACITY_THRESHOLD_HU
    defaulted = ("--report", "--high-opacity-threshold", "--lesion-min-contrast-hu")
    assert not any(part.startswith(defaulted) for part in command)  # the CLI's defaults
    assert arguments.lesion_min_contrast_hu is None


@pytest.mark.parametrize("threshold", [-250.0, -1e-05, 0, 100.25])
def test_segment_command_passes_the_report_and_the_high_opacity_threshold(tmp_path, threshold):
    command = segment_command([tmp_path], tmp_path / "out", model="resattunet", report=True, high_opacity_threshold_hu=threshold)
    arguments = build_parser().parse_args(command[3:])
    assert arguments.report and arguments.high_opacity_threshold == threshold


@pytest.mark.parametrize(("contrast_hu", "parsed"), [(0, "off"), (0.0, "off"), (40, 40.0), (75.0, 75.0), (12.5, 12.5)])
def test_segment_command_passes_the_contrast_guard_rail_with_zero_as_off(tmp_path, contrast_hu, parsed):
    command = segment_command([tmp_path], tmp_path / "out", model="resattunet", lesion_min_contrast_hu=contrast_hu)
    assert build_parser().parse_args(command[3:]).lesion_min_contrast_hu == parsed


def test_child_environment_makes_the_core_importable_and_hides_cuda_for_cpu():
    environment = child_environment("cpu", base={"PYTHONPATH": "/elsewhere", "PATH": "/bin"})
    assert environment["PYTHONPATH"].split(os.pathsep) == [str(child_process.PACKAGE_PARENT), "/elsewhere"]
    assert (child_process.PACKAGE_PARENT / "COVIDLesionSegLib" / "cli.py").is_file()
    assert environment["CUDA_VISIBLE_DEVICES"] == "-1" and environment["PYTHONUNBUFFERED"] == "1"
    assert "CUDA_VISIBLE_DEVICES" not in child_environment("auto", base={})


def test_output_is_streamed_as_progress_and_log_lines_with_the_exit_code():
    process = ChildProcess(python_command("""
        import sys
        print("loading model", flush=True)
        for percent in (0, 50, 100):
            print(f"PROGRESS {percent} step {percent}", flush=True)
        print("ERROR a case failed", file=sys.stderr, flush=True)
        sys.exit(3)
    """))
    progress, log = [], []
    assert process.wait(on_progress=progress.append, on_log=log.append) == 3
    assert progress == [Progress(0, "step 0"), Progress(50, "step 50"), Progress(100, "step 100")]
    assert log == ["loading model", "ERROR a case failed"]
    assert process.poll() == 3 and not process.cancelled


def test_poll_never_blocks_while_the_child_runs():
    process = ChildProcess(python_command("import time; print('started', flush=True); time.sleep(30)"))
    log = []
    poll_until(process, lambda: log, on_log=log.append)
    started = time.monotonic()
    assert process.poll() is None
    assert time.monotonic() - started < 0.5
    process.cancel()
    assert process.wait() != 0


def test_cancel_ends_the_child_and_its_children():
    process = ChildProcess(python_command("""
        import subprocess, sys, time
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print(f"GRANDCHILD {grandchild.pid}", flush=True)
        time.sleep(60)
    """))
    log = []
    poll_until(process, lambda: log, on_log=log.append)
    grandchild = int(log[0].split()[1])
    assert psutil.pid_exists(grandchild)

    process.cancel(timeout_s=5)

    assert process.cancelled
    assert is_gone(process.pid) and is_gone(grandchild)
    deadline = time.monotonic() + 10
    while (returncode := process.poll()) is None:  # the output pipe closes once every holder is gone
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert returncode != 0


def test_cancel_kills_a_child_that_ignores_terminate():
    process = ChildProcess(python_command("""
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ignoring SIGTERM", flush=True)
        time.sleep(60)
    """))
    log = []
    poll_until(process, lambda: log, on_log=log.append)
    started = time.monotonic()
    process.cancel(timeout_s=0.5)
    assert is_gone(process.pid)
    assert time.monotonic() - started < 5
    assert process.wait() != 0


def test_cancel_after_the_end_is_harmless():
    process = ChildProcess(python_command("print('done')"))
    assert process.wait() == 0
    process.cancel()
    assert process.poll() == 0 and not process.cancelled


def test_undecodable_output_is_replaced_not_fatal(tmp_path):
    script = tmp_path / "bytes.py"
    script.write_text("import sys\nsys.stdout.buffer.write(b'caf\\xe9 \\xff\\n')\nsys.stdout.flush()\n")
    log = []
    assert ChildProcess([sys.executable, str(script)]).wait(on_log=log.append) == 0
    assert log == ["caf\ufffd \ufffd"]


def test_a_missing_program_raises_at_start(tmp_path):
    with pytest.raises(OSError):
        ChildProcess([str(tmp_path / "no-such-program")])


def test_runner_imports_neither_slicer_qt_nor_torch():
    code = ("import sys; import COVIDLesionSegLib.child_process; "
            "print(sorted(name for name in ('torch', 'slicer', 'qt', 'psutil') if name in sys.modules))")
    process = ChildProcess([sys.executable, "-c", code], env=child_environment("auto"), cwd=Path.home())
    log = []
    assert process.wait(on_log=log.append) == 0
    assert log == ["[]"]
