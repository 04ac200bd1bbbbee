"""``covidlesionseg measure CT SEG``: every measure of ``statistics`` recomputed from a segmentation of ``CT``, e.g. one
the reader corrected in Slicer's Segment Editor, with the same code, orientation and HU test as ``segment``.

``SEG`` is a ``.seg.nrrd`` (segments found by the IDs this tool writes, ``lesion`` and ``lung``, else by their names)
or a labelmap (1 = lesion, 2 = lung without lesion, as ``segment --format nii.gz`` writes it). It is resampled (nearest
neighbour) onto the CT's grid, since Slicer may save a segmentation on another extent. The lung includes the lesion, as
``statistics`` defines lung_ml: lesion voxels drawn outside the lung count as lung. Without a lung segment the lung
measures are not available. The measures go to ``--output`` (CSV: input, segmentation, then the ``summary.csv``
measures with the same text) or to standard output.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import io
from .preprocessing import PreprocessingConfig, is_hounsfield
from .segments import LESION, LUNG
from .statistics import DEFAULT_HIGH_OPACITY_THRESHOLD_HU, MEASURES, LesionStatistics, VoxelGrid, lesion_statistics

COLUMNS = ["input", "segmentation", *(measure.name for measure in MEASURES)]


def measure_masks(image: sitk.Image, lesion: sitk.Image, lung: sitk.Image | None = None,
                  high_opacity_threshold_hu: float = DEFAULT_HIGH_OPACITY_THRESHOLD_HU) -> LesionStatistics:
    """The statistics of 0/1 masks on ``image``'s grid, computed as ``Predictor.segment_image`` computes them: on the
    radiologically oriented arrays, with the HU measures only when the CT is in HU by the recipe's test
    (``preprocessing.is_hounsfield`` with the default ``hu_detect_below``, the shipped models' value)."""
    oriented = io.to_radiological(image)
    ct = sitk.GetArrayViewFromImage(oriented)
    lesion_array = sitk.GetArrayFromImage(io.to_radiological(lesion)) > 0
    lung_array = None if lung is None else (sitk.GetArrayFromImage(io.to_radiological(lung)) > 0) | lesion_array
    ct_hu = ct if is_hounsfield(ct, PreprocessingConfig()) else None
    return lesion_statistics(lesion_array, VoxelGrid.of_image(oriented), lung_array, ct_hu, high_opacity_threshold_hu)


def read_masks(path: str | Path, reference: sitk.Image) -> dict[str, sitk.Image]:
    """``{"lesion": mask, "lung": mask}`` (lung only when present) of a ``.seg.nrrd`` or labelmap, on ``reference``'s grid."""
    path = Path(path)
    if not path.is_file():
        raise io.InputError(f"{path}: no such file")
    if path.name.endswith(".seg.nrrd"):
        import slicerio

        segmentation = slicerio.read_segmentation(str(path))
        masks = {}
        for definition in (LESION, LUNG):
            segment = _find_segment(segmentation, definition)
            if segment is not None:
                voxels = slicerio.segment_mask(segmentation, segment).transpose(2, 1, 0).astype(np.uint8)  # (i, j, k) → [z, y, x]
                masks[definition.channel] = _image(voxels, np.asarray(segmentation["ijkToLPS"], dtype=np.float64))
    else:
        labels = sitk.ReadImage(str(path))
        masks = {"lesion": labels == 1, "lung": (labels == 1) | (labels == 2)}
    if "lesion" not in masks:
        raise io.InputError(f"{path}: no segment '{LESION.channel}' or '{LESION.name}'")
    return {channel: sitk.Resample(mask, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
            for channel, mask in masks.items()}


def _find_segment(segmentation: dict, definition) -> dict | None:
    by_id = [segment for segment in segmentation["segments"] if segment["id"] == definition.channel]
    by_name = [segment for segment in segmentation["segments"] if segment.get("name") == definition.name]
    return (by_id or by_name or [None])[0]


def _image(array: np.ndarray, ijk_to_lps: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((ijk_to_lps[:3, :3] / spacing).flatten().tolist())
    image.SetOrigin(ijk_to_lps[:3, 3].tolist())
    return image


def measure_files(ct_path: str | Path, segmentation_path: str | Path,
                  high_opacity_threshold_hu: float = DEFAULT_HIGH_OPACITY_THRESHOLD_HU) -> dict[str, str]:
    """One row of :data:`COLUMNS`: the measures of ``segmentation_path`` on the CT ``ct_path``, as ``summary.csv`` text."""
    image = io.read_image(ct_path)
    masks = read_masks(segmentation_path, image)
    statistics = measure_masks(image, masks["lesion"], masks.get("lung"), high_opacity_threshold_hu)
    return {"input": str(ct_path), "segmentation": str(segmentation_path), **statistics.formatted()}


def add_parser(commands) -> None:
    """The ``measure`` subcommand of the ``covidlesionseg`` parser."""
    parser = commands.add_parser("measure", help="recompute every measure from a (corrected) segmentation of a CT")
    parser.add_argument("ct", metavar="CT", help="the CT image file or DICOM folder the segmentation belongs to")
    parser.add_argument("segmentation", metavar="SEG", help=".seg.nrrd (segments lesion, lung) or labelmap (1 lesion, 2 lung)")
    parser.add_argument("--output", "-o", type=Path, help="CSV file to write (default: standard output)")
    parser.add_argument("--high-opacity-threshold", type=float, default=DEFAULT_HIGH_OPACITY_THRESHOLD_HU, metavar="HU",
                        help=f"lesion voxels at or above this are high opacity (default {DEFAULT_HIGH_OPACITY_THRESHOLD_HU:g} HU)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        row = measure_files(args.ct, args.segmentation, args.high_opacity_threshold)
    except (io.InputError, OSError, ValueError, RuntimeError) as error:
        print(f"ERROR {error}", file=sys.stderr)
        return 1
    if args.output:
        with open(args.output, "w", newline="", encoding="utf-8") as stream:
            _write(stream, row)
    else:
        _write(sys.stdout, row)
    return 0


def _write(stream, row: dict[str, str]) -> None:
    writer = csv.DictWriter(stream, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerow(row)
