"""Command line: ``covidlesionseg segment INPUT... --output-dir DIR``.

Every input file (NIfTI, NRRD, MHA, PNG/JPG) and every DICOM series found in an input folder is a case
(the output folder and hidden files excepted; inputs may also follow ``--``). Each case is written to
``DIR/<case>.<format>``, where ``<case>`` is the input's name, or ``<name>_<8 hex of its path's SHA-1>``
when another input of the batch or an earlier case of DIR has that name. ``DIR/summary.csv`` has one row
per case ever processed in DIR (merged under a file lock, never truncated): input, output, status
ok|skipped|failed, error, the measures of ``statistics.MEASURES`` (severity, percent_opacity, …; an empty
cell = not available), report (the PNG written with ``--report``, else empty), seconds and warnings.
``DIR/summary.json`` says how the numbers were made: each column's unit and definition, the severity
categories, the high-opacity threshold, the HU test, and the model's name and SHA-256.

One case is one atomic unit: its report, then its record ``DIR/<case>.case.json`` (the row, with the
segmentation's SHA-256), then its segmentation are committed, each by a rename; a case is done only when its
record and outputs exist and match, so a kill or a full disk at any point leaves either a done case or one
that is redone. Temporary files of killed runs are swept. Any error of a case becomes its one-line error
(``--debug`` adds the traceback), the batch goes on, and the exit status is 1 when any case failed. Done
cases are kept (status ``skipped``, with their recorded row) unless ``--overwrite``, so rerunning a batch
resumes it; a folder holding results of another model or threshold is refused unless ``--overwrite``, so
one summary never mixes them. ``--num-parts N --part-id K`` processes every N-th case starting at K (to
split a batch over machines; each part writes ``summary.partK.csv`` and ``summary.partK.json``).
``--report`` also writes ``DIR/<case>.report.png`` (see ``report``). ``--format dicom-seg`` writes a DICOM SEG
``DIR/<case>.seg.dcm`` of a DICOM series input and ``--sr`` its TID 1500 measurement report ``DIR/<case>.sr.dcm``
(``dicom_outputs``, needs highdicom); ``--probabilities`` writes ``DIR/<case>.lesion-probability.nrrd``.
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import io as text_io
import json
import logging
import math
import os
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import SimpleITK as sitk

from . import io
from .backends import BACKENDS, BackendUnavailableError
from .checkpoints import sha256_of, sweep_stale_temporaries
from .statistics import DEFAULT_HIGH_OPACITY_THRESHOLD_HU, LEFT_RIGHT_RULE, MEASURES, NOT_AVAILABLE_RULE, SEVERITY_DEFINITIONS, VoxelGrid

RUN_COLUMNS = {
    "input": "the input file or DICOM folder (#series id when the folder holds several series)",
    "output": "the segmentation written",
    "status": "ok, skipped (done before; the row is kept from the run that made it) or failed",
    "error": "why the case failed or was skipped",
}
TRAILING_COLUMNS = {"report": "the visual report PNG (with --report)", "seconds": "time spent on the case",
                    "warnings": "notes on the input: a conversion made, why it may not be a chest CT, or that it is "
                                "coarser in plane than any slice the model trained on"}
SUMMARY_COLUMNS = [*RUN_COLUMNS, *(measure.name for measure in MEASURES), *TRAILING_COLUMNS]
KEPT_WHEN_SKIPPED = SUMMARY_COLUMNS[len(RUN_COLUMNS):]
RECORD_SUFFIX = ".case.json"
DICOM_SEG = "dicom-seg"
OUTPUT_FORMATS = (*io.OUTPUT_FORMATS, DICOM_SEG)
logger = logging.getLogger(__name__)


def fault_point(step: str) -> None:
    """Test hook, a no-op: called after each write step of a case ("report written", "segmentation written",
    "record written", "case committed") and after each summary update ("summary written")."""


def one_line(error: BaseException) -> str:
    """``error`` as one line: its type (unless an InputError, whose message names the file) and message."""
    text = " ".join(str(error).split()) or repr(error)
    return text if isinstance(error, io.InputError) else f"{type(error).__name__}: {text}"


@dataclass(frozen=True)
class Case:
    name: str
    path: Path
    series_id: str | None = None

    @property
    def label(self) -> str:
        return f"{self.path}#{self.series_id}" if self.series_id else str(self.path)


def find_cases(inputs: list[str | Path], exclude: Path | None = None) -> list[Case]:
    """Expand files and folders into cases (absolute paths, each once, named by ``io.case_name``).

    A file given explicitly is always a case (a bad one fails when read). In a folder, image files with a
    known suffix are cases and each DICOM series is a case (subfolders included); hidden files, and ``exclude``
    (the output folder) with everything below it, are left out.
    """
    excluded = Path(exclude).resolve() if exclude else None
    cases: dict[str, Case] = {}
    for item in (Path(item).resolve() for item in inputs):
        if not item.is_dir():
            cases.setdefault(str(item), Case(io.case_name(item), item))
            continue
        for folder in sorted([item, *(path for path in item.rglob("*") if path.is_dir())]):
            if excluded and (folder == excluded or excluded in folder.parents):
                continue
            series = io.dicom_series_ids(folder)
            for series_id in series:
                case = Case(io.case_name(folder) + (f"_{series_id[-8:]}" if len(series) > 1 else ""), folder,
                            series_id if len(series) > 1 else None)
                cases.setdefault(case.label, case)
            for path in sorted(folder.iterdir()):
                if path.is_file() and io.image_suffix(path) and not path.name.startswith("."):
                    cases.setdefault(str(path), Case(io.case_name(path), path))
    return list(cases.values())


class PrefetchedRead:
    """:func:`io.read_image` of one case, started in a background thread: the CLI reads its first case while the model
    loads (SimpleITK and ONNX Runtime work without the GIL). :meth:`take` hands the image over once."""

    def __init__(self, pool: ThreadPoolExecutor, case: Case):
        self.source = (case.path, case.series_id)
        self.notes: list[str] = []
        self.future = pool.submit(io.read_image, case.path, case.series_id, self.notes)

    def take(self, case: Case, notes: list[str]) -> sitk.Image | None:
        """The image if it is ``case``'s and was not taken yet, its warnings appended to ``notes``; else None. A read
        that failed raises its error here, as :func:`io.read_image` would have."""
        if self.future is None or (case.path, case.series_id) != self.source:
            return None
        future, self.future = self.future, None  # held no longer than the case needs it
        image = future.result()
        notes.extend(self.notes)
        return image


def output_names(cases: list[Case], output_dir: Path) -> list[Case]:
    """``cases`` with unique output names that depend on their input paths only, not on the argument order: a case
    keeps its name unless another case of the batch or a case recorded in ``output_dir`` has it (names compared
    ignoring case). Then the recorded input, else the first input by path, keeps it, and the others become
    ``<name>_<first 8 hex of the SHA-1 of the input>``."""
    groups: dict[str, list[Case]] = {}
    for case in cases:
        groups.setdefault(case.name.lower(), []).append(case)
    owners = {}
    for key, group in groups.items():
        recorded = read_record(record_path(output_dir, group[0].name))
        owners[key] = recorded.get("input") if recorded else min(case.label for case in group)
    return [case if owners[case.name.lower()] == case.label
            else replace(case, name=f"{case.name}_{hashlib.sha1(case.label.encode()).hexdigest()[:8]}") for case in cases]


def record_path(output_dir: Path, name: str) -> Path:
    return output_dir / f"{name}{RECORD_SUFFIX}"


def read_record(path: Path) -> dict | None:
    """A case record (its summary row plus ``output_sha256``), or None when absent or unreadable."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def output_target(output_dir: Path, name: str, output_format: str) -> Path:
    """The segmentation file of case ``name``: ``<name>.seg.dcm`` for ``dicom-seg``, else ``io.output_path``."""
    if output_format == DICOM_SEG:
        from .dicom_outputs import SEG_SUFFIX

        return Path(output_dir) / f"{name}{SEG_SUFFIX}"
    return io.output_path(output_dir, name, output_format)


def finished_record(case: Case, target: Path, output_dir: Path, report: bool, extras: tuple[str, ...] = ()) -> dict | None:
    """The record of ``case`` when the case is done: the record names its input and its outputs exist and match
    (the segmentation's SHA-256; the report, and each output of ``extras`` ("sr", "probabilities"), when it is
    recorded or asked for). None otherwise."""
    record = read_record(record_path(output_dir, case.name))
    if record is None or record.get("input") != case.label or not target.is_file():
        return None
    for key in ("report", "sr", "probabilities"):
        wanted = report if key == "report" else key in extras
        if (wanted or record.get(key)) and not (record.get(key) and Path(record[key]).is_file()):
            return None
    return record if sha256_of(target) == record.get("output_sha256") else None


class ProgressReporter:
    """Progress over all slices of the batch: a tqdm bar, or ``PROGRESS <percent> <message>`` lines for a
    parent process (the Slicer module) to parse."""

    def __init__(self, style: str, total_cases: int):
        self.style, self.total_cases = style, total_cases
        self.bar = None
        if style == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total_cases, unit="case", file=sys.stderr, dynamic_ncols=True)

    def slices(self, case_index: int, case_name: str, done: int, total: int) -> None:
        if self.style == "lines":
            percent = 100.0 * (case_index + done / max(total, 1)) / max(self.total_cases, 1)
            print(f"PROGRESS {percent:.1f} {case_name}: slice {done}/{total}", flush=True)
        elif self.bar is not None:
            self.bar.set_postfix_str(f"{case_name} {done}/{total} slices")

    def case_done(self, case_name: str, status: str) -> None:
        if self.bar is not None:
            self.bar.update(1)
        elif self.style == "lines":
            print(f"{status.upper()} {case_name}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def write_summary(path: Path, rows: list[dict]) -> None:
    buffer = text_io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    with io.atomic_output(path) as temporary:
        temporary.write_text(buffer.getvalue(), encoding="utf-8")


def read_summary(path: Path) -> dict[str, dict]:
    """The rows of ``path`` by input. An unreadable file is kept aside (``<name>.unreadable-<time>``) with a
    warning, and the rows are rebuilt from the case records of its folder."""
    if not path.is_file():
        return {}
    try:
        with open(path, newline="", encoding="utf-8") as stream:
            reader = csv.DictReader(stream)
            if "input" not in (reader.fieldnames or []):
                raise ValueError("no 'input' column")
            return {row["input"]: row for row in reader if row.get("input")}
    except (ValueError, csv.Error) as error:  # UnicodeDecodeError is a ValueError
        kept = path.with_name(f"{path.name}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}")
        os.replace(path, kept)
        print(f"WARNING {path}: unreadable ({one_line(error)}); kept as {kept.name}, rows rebuilt from the case records",
              file=sys.stderr, flush=True)
        records = (read_record(record) for record in sorted(path.parent.glob(f"*{RECORD_SUFFIX}")))
        return {record["input"]: record for record in records if record and record.get("input")}


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created when missing) across processes: flock on POSIX, msvcrt on Windows."""
    with open(path, "a+b") as stream:
        if os.name == "nt":
            import msvcrt

            while True:
                try:
                    stream.seek(0)
                    msvcrt.locking(stream.fileno(), msvcrt.LK_LOCK, 1)  # gives up after 10 s: try again
                    break
                except OSError:
                    continue
            try:
                yield
            finally:
                stream.seek(0)
                msvcrt.locking(stream.fileno(), msvcrt.LK_UNLCK, 1)
        else:
            import fcntl

            fcntl.flock(stream.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(stream.fileno(), fcntl.LOCK_UN)


def merge_summary(path: Path, row: dict) -> None:
    """Put ``row`` into the summary ``path`` in place of the earlier row of its input, keeping every other row;
    a skipped row keeps the earlier row's values where it has none. Safe with concurrent runs (file lock)."""
    with file_lock(path.with_name(f".{path.name}.lock")):
        rows = read_summary(path)
        if row["status"] == "skipped":
            row = {**rows.get(row["input"], {}), **{key: value for key, value in row.items() if value}}
        rows[row["input"]] = row
        write_summary(path, list(rows.values()))
    fault_point("summary written")


def run_description(predictor, high_opacity_threshold_hu: float) -> dict:
    """The ``summary.json`` sidecar: how every number of ``summary.csv`` was made, to trace a result."""
    return {
        "model": {"name": predictor.name, "sha256": predictor.sha256, "channels": list(predictor.channels)},
        "inference": {"backend": predictor.backend.name, "device": predictor.device},  # of the latest run; same masks (README, Speed)
        "parameters": {
            "high_opacity_threshold_hu": high_opacity_threshold_hu,
            "hu_detect_below": predictor.preprocessing.hu_detect_below,
            "guard_rails": predictor.guard_rails.to_dict(),
        },
        "columns": {
            **{name: {"definition": meaning} for name, meaning in RUN_COLUMNS.items()},
            **{m.name: {"label": m.label, "unit": m.unit, "definition": m.definition} for m in MEASURES},
            **{name: {"definition": meaning} for name, meaning in TRAILING_COLUMNS.items()},
        },
        "severity_categories": SEVERITY_DEFINITIONS,
        "not_available": NOT_AVAILABLE_RULE,
        "left_right": LEFT_RIGHT_RULE,
    }


def check_same_run(sidecar_path: Path, description: dict) -> None:
    """Refuse to add to a summary made with another model or other parameters (ValueError saying what to do)."""
    if not sidecar_path.is_file():
        return
    try:
        previous = json.loads(sidecar_path.read_text(encoding="utf-8"))
        before = {"model SHA-256": previous["model"]["sha256"], "parameters": previous["parameters"]}
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{sidecar_path}: unreadable ({one_line(error)}); it tells which model made the results in "
                         f"{sidecar_path.parent}: restore it, or use --overwrite to redo every case, or another --output-dir") from None
    now = {"model SHA-256": description["model"]["sha256"], "parameters": description["parameters"]}
    changed = [f"{key} {before[key]} (now {now[key]})" for key in now if before[key] != now[key]]
    if changed:
        raise ValueError(f"{sidecar_path.parent} holds results made with another {'; '.join(changed)}; "
                         "use --overwrite to redo every case, or another --output-dir")


def write_case_report(path: Path, image: sitk.Image, result, title: str, notes: list[str]) -> Path:
    """The visual report of one segmented case (image and masks put back in radiological orientation)."""
    from .report import write_report

    oriented = io.to_radiological(image)
    masks = {channel: sitk.GetArrayFromImage(io.to_radiological(mask)) for channel, mask in result.masks.items()}
    return write_report(path, sitk.GetArrayFromImage(oriented), masks, VoxelGrid.of_image(oriented), result.statistics, title, notes)


def segment_cases(cases: list[Case], predictor, output_dir: Path, output_format: str = "seg.nrrd", overwrite: bool = False,
                  include_lung: bool = True, summary_path: Path | None = None, progress: str = "bar", report: bool = False,
                  high_opacity_threshold_hu: float = DEFAULT_HIGH_OPACITY_THRESHOLD_HU, sr: bool = False,
                  probabilities: bool = False, first_read: PrefetchedRead | None = None) -> list[dict]:
    """Segment ``cases`` with ``predictor`` into ``output_dir``; returns this run's summary rows.

    Writes the ``.json`` sidecar of ``summary_path`` (CSV, default ``output_dir/summary.csv``) first and merges
    each case's row into the CSV as soon as the case ends; ``report`` adds a ``<case>.report.png`` per case,
    ``sr`` a ``<case>.sr.dcm`` (with ``output_format`` dicom-seg), ``probabilities`` a ``<case>.lesion-probability.nrrd``.
    ``first_read``: a case's reading already under way, used when that case is segmented.
    Raises ValueError when the folder holds results of another model or threshold and ``overwrite`` is off."""
    output_dir = Path(output_dir).absolute()
    summary_path = Path(summary_path).absolute() if summary_path else output_dir / "summary.csv"
    description = run_description(predictor, high_opacity_threshold_hu)
    sidecar_path = summary_path.with_suffix(".json")
    if not overwrite:
        check_same_run(sidecar_path, description)
    with io.atomic_output(sidecar_path) as temporary:
        temporary.write_text(json.dumps(description, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for path in sweep_stale_temporaries(output_dir):
        print(f"WARNING removed {path.name}, a temporary file left by a killed run", file=sys.stderr, flush=True)
    notes = [f"model: {predictor.name} (SHA-256 {predictor.sha256[:16] or 'unknown'}…)",
             f"high-opacity threshold: {high_opacity_threshold_hu:g} HU; definitions: {sidecar_path.name}"]
    rows: list[dict] = []
    reporter = ProgressReporter(progress, len(cases))
    for index, case in enumerate(output_names(cases, output_dir)):
        started = time.perf_counter()
        target = output_target(output_dir, case.name, output_format)
        row = {"input": case.label, "output": str(target), "status": "ok", "error": ""}
        extras = tuple(key for key, wanted in (("sr", sr), ("probabilities", probabilities)) if wanted)
        done = None if overwrite else finished_record(case, target, output_dir, report, extras)
        if done is not None:
            row.update({key: done.get(key, "") for key in KEPT_WHEN_SKIPPED})
            row.update(status="skipped", error="done before; use --overwrite to redo it")
        elif target.exists() and not overwrite and (read_record(record_path(output_dir, case.name)) or {}).get("input") != case.label:
            row.update(status="skipped", error=f"{target.name} exists without its record {case.name}{RECORD_SUFFIX}; "
                                               "use --overwrite to replace it")
        else:
            on_progress = functools.partial(reporter.slices, index, case.name)
            row = segment_case(case, target, predictor, output_dir, include_lung, report, high_opacity_threshold_hu, notes,
                               on_progress, row, started, output_format, sr, probabilities, first_read)
        rows.append(row)
        merge_summary(summary_path, row)  # after every case, so an interrupted batch keeps its record
        reporter.case_done(case.name, row["status"])
    reporter.close()
    return rows


def segment_case(case: Case, target: Path, predictor, output_dir: Path, include_lung: bool, report: bool,
                 high_opacity_threshold_hu: float, notes: list[str], on_progress, row: dict, started: float,
                 output_format: str = "seg.nrrd", sr: bool = False, probabilities: bool = False,
                 first_read: PrefetchedRead | None = None) -> dict:
    """Segment one case as an atomic unit (report, probability map, SR, record, then segmentation); returns its summary
    row, status ``failed`` with a one-line error for any exception (the traceback goes to the debug log)."""
    warnings: list[str] = []
    try:
        if output_format == DICOM_SEG:
            from .dicom_outputs import require_dicom_series

            require_dicom_series(case.path)  # before any work on a case that cannot have the output
        image = first_read.take(case, warnings) if first_read is not None else None
        if image is None:
            image = io.read_image(case.path, case.series_id, warnings)
        result = predictor.segment_image(image, on_progress=on_progress, high_opacity_threshold_hu=high_opacity_threshold_hu,
                                         return_probabilities=probabilities, probability_dtype="uint8")
        for warning in result.warnings:
            io.note(warnings, f"{case.label}: {warning}")
        row.update(result.statistics.formatted(), warnings="; ".join(warnings))
        if report:
            row["report"] = str(write_case_report(output_dir / f"{case.name}.report.png", image, result, case.name,
                                                  [*notes, *result.warnings]))
            fault_point("report written")
        del image  # the CT is not needed for writing: let its memory go before the writers take theirs
        if probabilities:
            probability_path = output_dir / f"{case.name}{io.PROBABILITY_SUFFIX}"
            row["probabilities"] = str(io.write_probability_map(probability_path, result.lesion_probability))
            result.lesion_probability = None
        written = {channel: mask for channel, mask in result.masks.items() if include_lung or channel != "lung"}

        def write_record(segmentation: Path) -> None:
            fault_point("segmentation written")
            row["seconds"] = f"{time.perf_counter() - started:.2f}"
            with io.atomic_output(record_path(output_dir, case.name)) as temporary:
                temporary.write_text(json.dumps({**row, "output_sha256": sha256_of(segmentation)}, indent=2,
                                                ensure_ascii=False) + "\n", encoding="utf-8")
            fault_point("record written")

        if output_format == DICOM_SEG:
            from . import dicom_outputs

            provenance = dicom_outputs.Provenance(predictor.name, predictor.sha256)
            sources = dicom_outputs.read_series_headers(case.path, case.series_id)
            segmentation = dicom_outputs.build_segmentation(written, sources, provenance)
            if sr:
                report_dataset = dicom_outputs.build_measurement_report(result.statistics, segmentation, sources, provenance)
                row["sr"] = str(dicom_outputs.write_dataset(output_dir / f"{case.name}{dicom_outputs.SR_SUFFIX}", report_dataset))
            dicom_outputs.write_dataset(target, segmentation, before_commit=write_record)
        else:
            io.write_segmentation(target, written, before_commit=write_record)
        fault_point("case committed")
        return row
    except Exception as error:  # any failure of one case is that case's error; the batch goes on
        logger.debug("traceback of the failed case %s", case.label, exc_info=True)
        message = one_line(error)
        message = message if message.startswith(str(case.path)) else f"{case.label}: {message}"
        print(f"ERROR {message}", file=sys.stderr, flush=True)
        return {"input": case.label, "output": "", "status": "failed", "error": message, "warnings": "; ".join(warnings),
                "seconds": f"{time.perf_counter() - started:.2f}"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="covidlesionseg", description="COVID-19 lung lesion segmentation in chest CT.")
    commands = parser.add_subparsers(dest="command", required=True)
    segment = commands.add_parser("segment", help="segment CT volumes (files, DICOM folders, or folders of them)",
                                  formatter_class=argparse.RawDescriptionHelpFormatter, epilog=measures_help())
    segment.add_argument("inputs", nargs="*", metavar="INPUT", help="image file (NIfTI/NRRD/MHA/PNG…) or folder; "
                                                                     "more may follow -- (e.g. a name starting with -)")
    segment.add_argument("--output-dir", "-o", required=True, type=Path, help="folder for segmentations and summary.csv")
    source = segment.add_mutually_exclusive_group()
    source.add_argument("--model", help="model name from Resources/models.json (default: the shipped default model)")
    source.add_argument("--weights", type=Path, help="a .safetensors checkpoint file to use instead of a registered model")
    segment.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto = CUDA when available")
    segment.add_argument("--batch-size", type=int, default=8, help="slices per network batch (default 8)")
    segment.add_argument("--backend", default="auto", choices=BACKENDS, help="where the network runs: auto = on a CPU with native "
                         "bfloat16 (AVX512-BF16, AMX) torch-bf16, on other CPUs ONNX Runtime when onnxruntime is installed (exported "
                         "once from the checkpoint, cached beside it), else PyTorch; torch-bf16: PyTorch under bf16 autocast, the "
                         "masks of fp32; onnxruntime-int8: the export quantized to int8, several times faster on CPUs with VNNI, "
                         "lesion masks a little further from fp32's (README, Speed)")
    segment.add_argument("--format", dest="output_format", default="seg.nrrd", choices=OUTPUT_FORMATS,
                         help="segmentation file: seg.nrrd (Slicer), nii.gz (labelmap), or dicom-seg (a DICOM SEG <case>.seg.dcm "
                              "referencing the source series; DICOM series input only; needs highdicom)")
    segment.add_argument("--sr", action="store_true", help="with --format dicom-seg: also write <case>.sr.dcm, a DICOM TID 1500 "
                                                           "measurement report of the measures referencing the SEG's segments")
    segment.add_argument("--probabilities", action="store_true", help="also write <case>.lesion-probability.nrrd: the lesion "
                         "probability (uint8, 255 × p; >= 128 is the lesion before the guard rails) on the input grid")
    segment.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: skip those cases)")
    segment.add_argument("--no-lung", action="store_true", help="do not write the lung segment (lung %% is still reported)")
    segment.add_argument("--num-parts", type=int, default=1, help="split the cases into N parts (for several machines)")
    segment.add_argument("--part-id", type=int, default=0, help="which part (0…N-1) this run processes")
    segment.add_argument("--progress", default="bar", choices=["bar", "lines", "none"], help="'lines' prints PROGRESS <percent> lines")
    segment.add_argument("--report", action="store_true", help="also write <case>.report.png: slices with contours and the measures")
    segment.add_argument("--high-opacity-threshold", type=finite_float, default=DEFAULT_HIGH_OPACITY_THRESHOLD_HU, metavar="HU",
                         help=f"lesion voxels at or above this are high opacity (default {DEFAULT_HIGH_OPACITY_THRESHOLD_HU:g} HU)")
    guard = segment.add_argument_group("guard rails against false lesions (defaults: predictor.GuardRails, chosen on the cross-validation)")
    guard.add_argument("--lung-min-ml", type=finite_float, metavar="ML",
                       help="keep only 3D lung components of at least ML, lesion inside them (0 = off)")
    guard.add_argument("--lesion-min-ml", type=finite_float, metavar="ML", help="drop 3D lesion components smaller than ML (0 = off)")
    guard.add_argument("--flip-tta", action=argparse.BooleanOptionalAction,
                       help="average each slice's prediction with its left-right mirror's (2x time)")
    guard.add_argument("--hu-lung-prior", action=argparse.BooleanOptionalAction,
                       help="HU input: lesion only inside the dilated classical lung mask")
    guard.add_argument("--lesion-min-hu", type=hu_or_off, metavar="HU",
                       help="HU input: lesion only where the in-plane smoothed CT is at least HU ('off' = off)")
    guard.add_argument("--lesion-min-contrast-hu", type=hu_or_off, metavar="HU",
                       help="HU input: drop 3D lesion components less than HU denser than the lung around them ('off' = off)")
    guard.add_argument("--lesion-threshold", type=finite_float, metavar="P",
                       help="lesion where the network's lesion probability is at least P (0 < P < 1; 0.5 = the network's own decision)")
    segment.add_argument("--debug", action="store_true", help="print the traceback of every error")
    from .measure import add_parser as add_measure_parser

    add_measure_parser(commands)  # covidlesionseg measure CT SEG
    return parser


def hu_or_off(text: str) -> float | str:
    """argparse type: a finite number of HU, or ``off`` (kept as the string, as None means "not given")."""
    return "off" if text.strip().lower() == "off" else finite_float(text)


def finite_float(text: str) -> float:
    """argparse type: a finite number (NaN and infinity refused)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def check_output_dir(folder: Path) -> None:
    """Create ``folder`` and prove that a file can be written and synced in it (OSError naming the folder
    otherwise), before any time goes into loading the model."""
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"output folder {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test.{os.getpid()}-{uuid.uuid4().hex[:8]}.part"  # swept if a kill leaves it
        try:
            with open(probe, "wb") as stream:
                stream.write(b"\0" * 4096)
                stream.flush()
                os.fsync(stream.fileno())
        finally:
            probe.unlink(missing_ok=True)
    except OSError as error:
        raise OSError(f"output folder {folder} cannot be written: {error.strerror or one_line(error)}") from None


def measures_help() -> str:
    """The columns of summary.csv with units and definitions, and the rules, for ``segment --help``."""
    def wrapped(text: str) -> str:
        return textwrap.fill(text, width=110, initial_indent="  ", subsequent_indent="      ")

    lines = ["summary.csv columns after input, output, status, error (units and definitions also in summary.json):"]
    lines += [wrapped(f"{m.name}{f' ({m.unit})' if m.unit else ''}: {m.definition}") for m in MEASURES]
    lines += [wrapped(f"{name}: {meaning}") for name, meaning in TRAILING_COLUMNS.items()]
    lines += ["", "Left and right:", wrapped(LEFT_RIGHT_RULE), "", "Not available:", wrapped(NOT_AVAILABLE_RULE)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    after = argv[argv.index("--") + 1 :] if "--" in argv else []
    parser = build_parser()
    args = parser.parse_args(argv[: len(argv) - len(after) - 1] if "--" in argv else argv)
    if args.command == "measure":
        return args.run(args)
    args.inputs = [*args.inputs, *after]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger(__package__).setLevel(logging.DEBUG if args.debug else logging.WARNING)
    if not args.inputs:
        parser.error("give at least one INPUT")
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.num_parts < 1 or not 0 <= args.part_id < args.num_parts:
        parser.error("--part-id must be in 0…N-1 for --num-parts N")
    if args.sr and args.output_format != DICOM_SEG:
        parser.error("--sr needs --format dicom-seg (the report references the DICOM SEG's segments)")
    try:
        return segment_command(args)
    except Exception as error:  # last resort: no traceback reaches the user unless --debug
        logger.debug("traceback", exc_info=True)
        print(f"ERROR {one_line(error)}", file=sys.stderr)
        return 1


def segment_command(args: argparse.Namespace) -> int:
    try:
        check_output_dir(args.output_dir)
    except OSError as error:
        print(f"ERROR {error}", file=sys.stderr)
        return 1
    # named over the whole batch before it is split, so that parts never give two inputs one name
    cases = output_names(find_cases(args.inputs, exclude=args.output_dir), args.output_dir)[args.part_id :: args.num_parts]
    if not cases:
        print("no cases found in the given inputs", file=sys.stderr)
        return 1
    if args.output_format == DICOM_SEG:
        from .dicom_outputs import DicomOutputError, highdicom

        try:
            highdicom()
        except DicomOutputError as error:
            print(f"ERROR {error}", file=sys.stderr)
            return 1
    from .predictor import GuardRails, Predictor

    try:
        given = {name: getattr(args, name) for name in GuardRails.__dataclass_fields__ if getattr(args, name) is not None}
        guard_rails = GuardRails(**{name: None if value == "off" else value for name, value in given.items()})
    except ValueError as error:
        print(f"ERROR guard rails: {error}", file=sys.stderr)
        return 2
    with ThreadPoolExecutor(max_workers=1) as reader:
        first_read = PrefetchedRead(reader, cases[0])  # read while the model loads
        try:
            if args.weights:
                predictor = Predictor.from_checkpoint(args.weights, args.device, args.batch_size, guard_rails, args.backend)
            elif args.model:
                predictor = Predictor.from_checkpoint(args.model, args.device, args.batch_size, guard_rails, args.backend)
            else:
                predictor = Predictor.default(args.device, args.batch_size, guard_rails, args.backend)
        except BackendUnavailableError as error:  # --backend onnxruntime that cannot run here: the message says what to do
            print(f"ERROR {error}", file=sys.stderr)
            return 1
        except Exception as error:  # a checkpoint the schema let through can still fail to build
            logger.debug("traceback", exc_info=True)
            print(f"ERROR model: {error if isinstance(error, (OSError, ValueError)) else one_line(error)}", file=sys.stderr)
            return 1
        summary_name = "summary.csv" if args.num_parts == 1 else f"summary.part{args.part_id}.csv"
        try:
            rows = segment_cases(cases, predictor, args.output_dir, args.output_format, args.overwrite, not args.no_lung,
                                 args.output_dir / summary_name, args.progress, args.report, args.high_opacity_threshold,
                                 args.sr, args.probabilities, first_read)
        except (OSError, ValueError) as error:
            logger.debug("traceback", exc_info=True)
            print(f"ERROR {error}", file=sys.stderr)
            return 1
    failed = [row for row in rows if row["status"] == "failed"]
    print(f"{len(rows) - len(failed)} of {len(rows)} cases done ({len(failed)} failed); summary: {args.output_dir / summary_name}",
          file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
