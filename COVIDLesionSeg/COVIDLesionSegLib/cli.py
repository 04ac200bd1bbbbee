"""Command line: ``covidlesionseg segment INPUT... --output-dir DIR``.

Every input file (NIfTI, NRRD, MHA, PNG/JPG) and every DICOM series found in an input folder is a case.
Each case is written to ``DIR/<case>.<format>``; ``DIR/summary.csv`` gets one row per case: input, output,
status ok|skipped|failed, error, the measures of ``statistics.MEASURES`` (severity, percent_opacity, …;
an empty cell = not available), report (the PNG written with ``--report``, else empty) and seconds.
``DIR/summary.json`` says how the numbers were made: each column's unit and definition, the severity
categories, the high-opacity threshold, the HU test, and the model's name and SHA-256.

A failing case is reported and the batch goes on; the exit status is 1 when any case failed. Existing
outputs are kept (status ``skipped``, with their earlier row) unless ``--overwrite``, so rerunning a batch
resumes it; a folder holding results of another model or threshold is refused unless ``--overwrite``, so
one summary never mixes them. ``--num-parts N --part-id K`` processes every N-th case starting at K (to
split a batch over machines; each part writes ``summary.partK.csv`` and ``summary.partK.json``).
``--report`` also writes ``DIR/<case>.report.png`` (see ``report``).
"""

from __future__ import annotations

import argparse
import csv
import functools
import io as text_io
import json
import logging
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk

from . import io
from .statistics import DEFAULT_HIGH_OPACITY_THRESHOLD_HU, LEFT_RIGHT_RULE, MEASURES, NOT_AVAILABLE_RULE, SEVERITY_DEFINITIONS, VoxelGrid

RUN_COLUMNS = {
    "input": "the input file or DICOM folder (#series id when the folder holds several series)",
    "output": "the segmentation written",
    "status": "ok, skipped (output existed; the row is kept from the run that made it) or failed",
    "error": "why the case failed or was skipped",
}
TRAILING_COLUMNS = {"report": "the visual report PNG (with --report)", "seconds": "time spent on the case"}
SUMMARY_COLUMNS = [*RUN_COLUMNS, *(measure.name for measure in MEASURES), *TRAILING_COLUMNS]
KEPT_WHEN_SKIPPED = SUMMARY_COLUMNS[len(RUN_COLUMNS):]


@dataclass(frozen=True)
class Case:
    name: str
    path: Path
    series_id: str | None = None

    @property
    def label(self) -> str:
        return f"{self.path}#{self.series_id}" if self.series_id else str(self.path)


def find_cases(inputs: list[str | Path]) -> list[Case]:
    """Expand files and folders into cases, sorted, with unique names.

    A file given explicitly is always a case (a bad one fails when read). In a folder, image files with a
    known suffix are cases and each DICOM series is a case (subfolders included).
    """
    cases: list[Case] = []
    for item in map(Path, inputs):
        if not item.is_dir():
            cases.append(Case(io.case_name(item), item))
            continue
        for folder in sorted([item, *(path for path in item.rglob("*") if path.is_dir())]):
            series = io.dicom_series_ids(folder)
            for series_id in series:
                suffix = f"_{series_id[-8:]}" if len(series) > 1 else ""
                cases.append(Case(io.case_name(folder) + suffix, folder, series_id if len(series) > 1 else None))
            cases.extend(Case(io.case_name(path), path) for path in sorted(folder.iterdir()) if path.is_file() and io.image_suffix(path))
    return unique_names(cases)


def unique_names(cases: list[Case]) -> list[Case]:
    seen: dict[str, int] = {}
    unique = []
    for case in cases:
        count = seen.get(case.name, 0)
        seen[case.name] = count + 1
        unique.append(case if count == 0 else Case(f"{case.name}_{count + 1}", case.path, case.series_id))
    return unique


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
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with io.atomic_output(path) as temporary:
        temporary.write_text(buffer.getvalue(), encoding="utf-8")


def read_summary(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as stream:
        return {row["input"]: row for row in csv.DictReader(stream)}


def run_description(predictor, high_opacity_threshold_hu: float) -> dict:
    """The ``summary.json`` sidecar: how every number of ``summary.csv`` was made, to trace a result."""
    return {
        "model": {"name": predictor.name, "sha256": predictor.sha256, "channels": list(predictor.channels)},
        "parameters": {
            "high_opacity_threshold_hu": high_opacity_threshold_hu,
            "hu_detect_below": predictor.preprocessing.hu_detect_below,
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
    previous = json.loads(sidecar_path.read_text(encoding="utf-8"))
    before = {"model SHA-256": previous.get("model", {}).get("sha256"), "parameters": previous.get("parameters")}
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
                  high_opacity_threshold_hu: float = DEFAULT_HIGH_OPACITY_THRESHOLD_HU) -> list[dict]:
    """Segment ``cases`` with ``predictor`` into ``output_dir``; returns the summary rows.

    Writes ``summary_path`` (CSV, default ``output_dir/summary.csv``) after every case and its ``.json``
    sidecar first; ``report`` adds a ``<case>.report.png`` per case. Raises ValueError when the folder holds
    results of another model or threshold and ``overwrite`` is off."""
    summary_path = summary_path or output_dir / "summary.csv"
    description = run_description(predictor, high_opacity_threshold_hu)
    sidecar_path = summary_path.with_suffix(".json")
    if not overwrite:
        check_same_run(sidecar_path, description)
    with io.atomic_output(sidecar_path) as temporary:
        temporary.write_text(json.dumps(description, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    notes = [f"model: {predictor.name} (SHA-256 {predictor.sha256[:16] or 'unknown'}…)",
             f"high-opacity threshold: {high_opacity_threshold_hu:g} HU; definitions: {sidecar_path.name}"]
    previous = read_summary(summary_path)
    rows: list[dict] = []
    reporter = ProgressReporter(progress, len(cases))
    for index, case in enumerate(cases):
        started = time.perf_counter()
        target = io.output_path(output_dir, case.name, output_format)
        row = {"input": case.label, "output": str(target), "status": "ok", "error": ""}
        if target.exists() and not overwrite:
            row.update({key: previous.get(case.label, {}).get(key, "") for key in KEPT_WHEN_SKIPPED})
            row.update(status="skipped", error="output exists; use --overwrite to replace it")
        else:
            try:
                image = io.read_image(case.path, case.series_id)
                on_progress = functools.partial(reporter.slices, index, case.name)
                result = predictor.segment_image(image, on_progress=on_progress, high_opacity_threshold_hu=high_opacity_threshold_hu)
                written = {channel: mask for channel, mask in result.masks.items() if include_lung or channel != "lung"}
                io.write_segmentation(target, written)
                row.update(result.statistics.formatted())
                if report:
                    row["report"] = str(write_case_report(output_dir / f"{case.name}.report.png", image, result, case.name, notes))
            except (io.InputError, OSError, ValueError, RuntimeError) as error:
                row.update(status="failed", error=str(error), output="")
                print(f"ERROR {error}", file=sys.stderr, flush=True)
            row["seconds"] = f"{time.perf_counter() - started:.2f}"
        rows.append(row)
        write_summary(summary_path, rows)  # after every case, so an interrupted batch keeps its record
        reporter.case_done(case.name, row["status"])
    reporter.close()
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="covidlesionseg", description="COVID-19 lung lesion segmentation in chest CT.")
    commands = parser.add_subparsers(dest="command", required=True)
    segment = commands.add_parser("segment", help="segment CT volumes (files, DICOM folders, or folders of them)",
                                  formatter_class=argparse.RawDescriptionHelpFormatter, epilog=measures_help())
    segment.add_argument("inputs", nargs="+", metavar="INPUT", help="image file (NIfTI/NRRD/MHA/PNG…) or folder")
    segment.add_argument("--output-dir", "-o", required=True, type=Path, help="folder for segmentations and summary.csv")
    source = segment.add_mutually_exclusive_group()
    source.add_argument("--model", help="model name from Resources/models.json (default: the shipped default model)")
    source.add_argument("--weights", type=Path, help="a .safetensors checkpoint file to use instead of a registered model")
    segment.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto = CUDA when available")
    segment.add_argument("--batch-size", type=int, default=8, help="slices per network batch (default 8)")
    segment.add_argument("--format", dest="output_format", default="seg.nrrd", choices=io.OUTPUT_FORMATS)
    segment.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: skip those cases)")
    segment.add_argument("--no-lung", action="store_true", help="do not write the lung segment (lung %% is still reported)")
    segment.add_argument("--num-parts", type=int, default=1, help="split the cases into N parts (for several machines)")
    segment.add_argument("--part-id", type=int, default=0, help="which part (0…N-1) this run processes")
    segment.add_argument("--progress", default="bar", choices=["bar", "lines", "none"], help="'lines' prints PROGRESS <percent> lines")
    segment.add_argument("--report", action="store_true", help="also write <case>.report.png: slices with contours and the measures")
    segment.add_argument("--high-opacity-threshold", type=float, default=DEFAULT_HIGH_OPACITY_THRESHOLD_HU, metavar="HU",
                         help=f"lesion voxels at or above this are high opacity (default {DEFAULT_HIGH_OPACITY_THRESHOLD_HU:g} HU)")
    return parser


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
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.num_parts < 1 or not 0 <= args.part_id < args.num_parts:
        parser.error("--part-id must be in 0…N-1 for --num-parts N")
    cases = find_cases(args.inputs)[args.part_id :: args.num_parts]
    if not cases:
        print("no cases found in the given inputs", file=sys.stderr)
        return 1
    from .predictor import Predictor

    try:
        if args.weights:
            predictor = Predictor.from_checkpoint(args.weights, args.device, args.batch_size)
        elif args.model:
            predictor = Predictor.from_checkpoint(args.model, args.device, args.batch_size)
        else:
            predictor = Predictor.default(args.device, args.batch_size)
    except (OSError, ValueError, RuntimeError) as error:
        print(f"ERROR model: {error}", file=sys.stderr)
        return 1
    summary_name = "summary.csv" if args.num_parts == 1 else f"summary.part{args.part_id}.csv"
    try:
        rows = segment_cases(cases, predictor, args.output_dir, args.output_format, args.overwrite, not args.no_lung,
                             args.output_dir / summary_name, args.progress, args.report, args.high_opacity_threshold)
    except ValueError as error:
        print(f"ERROR {error}", file=sys.stderr)
        return 1
    failed = [row for row in rows if row["status"] == "failed"]
    print(f"{len(rows) - len(failed)} of {len(rows)} cases done ({len(failed)} failed); summary: {args.output_dir / summary_name}",
          file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
