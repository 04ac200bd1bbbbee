"""MRML node handling of the COVIDLesionSeg Slicer module, free of Qt so it runs on the ``slicer-core`` wheel too.

- :class:`CLIOptions`, :func:`volume_run_command`, :func:`folder_run_command`: the core CLI command line for a scene
  volume (written with :func:`write_volume`: voxels and geometry exactly, LPS on disk) or for a folder of cases.
- :func:`load_volume_result`, :func:`load_folder_results`: what the finished CLI wrote → scene nodes (a volume
  run's visual report is moved out of the temporary work folder first, into ``report_dir``).
- :func:`load_segmentation`: the CLI's ``.seg.nrrd`` → segments of a ``vtkMRMLSegmentationNode`` whose reference
  image geometry is the input volume, in the input's study, over the same anatomy whatever the node's transform.
- :func:`measure_run_command`, :func:`load_measure_result`: the measures recomputed from the segments as they are now
  (after the reader's corrections), by the CLI's ``measure`` subcommand, into the statistics table.
- :func:`read_summary`, :func:`update_statistics_table`, :func:`write_table_csv`: the CLI's ``summary.csv`` →
  a ``vtkMRMLTableNode`` (lesion volume, slices with lesion, % of lung, … as ``statistics.MEASURES`` defines them,
  numbers in numeric columns, which segmentation state they come from, the visual report's path) → a CSV file.
- :func:`run_report`: the visual report PNG that belongs to the last run shown in a statistics table.
- :func:`measures_help_html`: the definitions of ``statistics`` (every measure, the severity categories, the
  left/right and not-available rules) quoted as HTML for the module's help.
- :func:`load_terminology`: the shipped terminology context into Slicer's terminology logic.
- :func:`load_probability_result`, :func:`show_probability_overlay`, :func:`set_overlay_threshold`,
  :func:`threshold_probability_into_segment`: the CLI's lesion probability map (``--probabilities``) as a coloured
  overlay whose threshold the reader moves, and re-thresholded into the lesion segment.
- :func:`mark_model_output`, :func:`dicom_seg_export_problem`, :func:`export_segmentation_to_dicom_database`: the
  segmentation (as edited) exported as a DICOM SEG into Slicer's DICOM database through the DICOM SEG plugin, the way
  the DICOM module's export dialog does it, with each segment's algorithm type (AUTOMATIC, or SEMIAUTOMATIC once edited).
- :func:`requirement_lines`, :func:`missing_requirements`, :func:`write_constraints`: what to pip-install into Slicer's
  Python, without ever replacing the packages Slicer ships (:data:`SLICER_PACKAGES`).
- :func:`resource_path`, :func:`registered_models`: files shipped in ``Resources/`` (found by the core's torch-free
  ``COVIDLesionSegLib.resources``).

Imports only ``slicer`` (MRML classes) and ``vtk``; never qt, ctk or torch. It is a package, not a file beside
``COVIDLesionSeg.py``, because Slicer tries to load every ``.py`` file in a module folder as a module.
"""

from __future__ import annotations

import collections
import csv
import html
import importlib.metadata
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import slicer
import vtk

from COVIDLesionSegLib import child_process
from COVIDLesionSegLib.resources import RegistryEntry, load_registry, resources_dir
from COVIDLesionSegLib.segments import LESION, LUNG, SEGMENTS, TERMINOLOGY_CONTEXT

MODULE_DIR = Path(__file__).resolve().parent.parent  # the folder of COVIDLesionSeg.py
UI_FILE = "UI/COVIDLesionSeg.ui"
ICON_FILE = "Icons/COVIDLesionSeg.png"
TERMINOLOGY_FILE = "Terminology/COVIDLesionSeg.term.json"
REQUIREMENTS_FILE = "requirements.txt"
SUMMARY_FILE = "summary.csv"
MEASURES_FILE = "measures.csv"  # what ``covidlesionseg measure`` writes in a recompute's work folder
VOLUME_RUN_OUTPUT = "output"  # the sub-folder of a volume run's work folder that receives the CLI's outputs

STATISTICS_TABLE_NAME = f"{LESION.name} statistics"  # the table of the last run; its Case column names the volumes
SOURCE_COLUMN = "Computed from"  # the statistics table's column saying which segmentation state a row measures
REPORT_COLUMN = "Report"  # the statistics table's column of visual report paths (present when a row has a report)
WARNINGS_COLUMN = "Warnings"  # notes on the input from summary.csv (present when a row has one)
REPORT_SUFFIX = ".report.png"
# statistics.DEFAULT_HIGH_OPACITY_THRESHOLD_HU, repeated here because importing statistics loads SimpleITK, which
# the module must not do at Slicer's start-up; a test keeps the two equal.
DEFAULT_HIGH_OPACITY_THRESHOLD_HU = -200.0
# predictor.GuardRails().lesion_min_contrast_hu, repeated for the same reason (predictor loads torch); a test keeps them equal
DEFAULT_LESION_MIN_CONTRAST_HU = 75.0
SLICER_PACKAGES = ("numpy", "SimpleITK", "requests")  # shipped with Slicer: installing must never replace them


def resource_path(relative: str) -> Path:
    return resources_dir() / relative


def registered_models(path: Path | None = None) -> list[RegistryEntry]:
    """The entries of the model registry (default ``Resources/models.json``); empty when there is none."""
    try:
        return list(load_registry(path).values())
    except FileNotFoundError:
        return []


def requirement_lines(path: Path) -> list[str]:
    """The requirements of a requirements file (comments and blank lines dropped)."""
    lines = (line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def missing_requirements(requirements: list[str]) -> list[str]:
    """The requirements that apply to this Python (environment markers) and whose package is absent or of a version
    outside the specifier."""
    from packaging.requirements import Requirement  # shipped with Slicer (5.6: packaging 23.2)

    missing = []
    for line in requirements:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        try:
            installed = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed is None or not requirement.specifier.contains(installed, prereleases=True):
            missing.append(line)
    return missing


def write_constraints(path: str | Path) -> Path:
    """A pip constraints file pinning :data:`SLICER_PACKAGES` at their installed versions: with ``-c`` it, pip
    installs only versions of other packages that work with them, or fails, rather than replacing them."""
    pins = []
    for name in SLICER_PACKAGES:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}\n")
        except importlib.metadata.PackageNotFoundError:
            continue
    path = Path(path)
    path.write_text("".join(pins), encoding="utf-8")
    return path


def optional_path(path: Path | str | None) -> Path | None:
    """A path parameter, or None when it is unset (Slicer stores an unset path as ``.``)."""
    return None if path is None or str(path) in ("", ".") else Path(path)


def safe_file_stem(name: str) -> str:
    """A node name usable as a file name: ``"CT chest: 2/3"`` → ``"CT_chest_2_3"``."""
    return re.sub(r"[^\w.-]+", "_", name).strip("._") or "volume"


@dataclass(frozen=True)
class CLIOptions:
    """How to run the core CLI: Python interpreter, registered model or weights file (which wins), device, batch size,
    whether to add the lung segment and lung statistics, whether to write the visual report of each case, the
    high-opacity threshold (None: the CLI's default, ``statistics.DEFAULT_HIGH_OPACITY_THRESHOLD_HU``) and the contrast
    guard rail in HU (0: off; None: the CLI's default, ``predictor.GuardRails.lesion_min_contrast_hu``)."""

    python: str
    model: str = ""
    weights: Path | None = None
    device: str = "auto"
    batch_size: int = 8
    include_lung: bool = True
    report: bool = False
    high_opacity_threshold_hu: float | None = None
    lesion_min_contrast_hu: float | None = None
    probabilities: bool = False

    def command(self, inputs: list[Path], output_dir: Path, overwrite: bool) -> list[str]:
        if self.weights and not Path(self.weights).is_file():
            raise ValueError(f"Weights file not found: {self.weights}")
        if not self.weights and not self.model:
            raise ValueError("Choose a registered model or a weights file (.safetensors).")
        command = child_process.segment_command(inputs, output_dir, python=self.python, model=self.model or None, weights=self.weights,
                                                device=self.device, batch_size=self.batch_size, include_lung=self.include_lung,
                                                overwrite=overwrite, report=self.report,
                                                high_opacity_threshold_hu=self.high_opacity_threshold_hu,
                                                lesion_min_contrast_hu=self.lesion_min_contrast_hu)
        return command + (["--probabilities"] if self.probabilities else [])

    @property
    def algorithm_name(self) -> str:
        """What a DICOM SEG names as the algorithm of the model's segments (Segment Algorithm Name, at most 64 characters)."""
        return f"COVIDLesionSeg {Path(self.weights).name if self.weights else self.model}"[:64]


def volume_run_command(volume_node, work_dir: str | Path, options: CLIOptions) -> list[str]:
    """Write ``volume_node`` into ``work_dir`` and return the CLI command that segments it into ``work_dir/output``."""
    work_dir = Path(work_dir)
    input_file = write_volume(volume_node, work_dir / f"{safe_file_stem(volume_node.GetName())}.nrrd")
    return options.command([input_file], work_dir / VOLUME_RUN_OUTPUT, overwrite=True)


def load_volume_result(work_dir: str | Path, volume_node, segmentation_node=None, table_node=None, include_lung: bool = True,
                       report_dir: str | Path | None = None, algorithm_name: str = "COVIDLesionSeg"):
    """Load what the process of :func:`volume_run_command` wrote: segments into ``segmentation_node`` and statistics into
    ``table_node`` (each created in the volume's scene when None). Returns ``(segmentation_node, table_node, row)``.

    The segments are marked as the model's output of ``algorithm_name`` (:func:`mark_model_output`).
    A visual report (a run with ``CLIOptions.report``) is moved into ``report_dir``, so that it outlives the work folder,
    as ``<volume name>.report.png`` (``_2``, ``_3``, … added rather than replacing an earlier report); ``row["report"]``
    and the table's Report column give its new path. Without ``report_dir`` it stays in the work folder.

    Raises ``FileNotFoundError`` when the process wrote no summary and ``RuntimeError`` when the case failed.
    """
    row = read_summary(Path(work_dir) / VOLUME_RUN_OUTPUT / SUMMARY_FILE)[0]
    if row["status"] != "ok":
        raise RuntimeError(f"Segmentation of '{volume_node.GetName()}' failed: {row['error']}")
    if row.get("report") and report_dir is not None:
        row["report"] = str(_move_to_new_file(Path(row["report"]), Path(report_dir), safe_file_stem(volume_node.GetName())))
    scene = volume_node.GetScene()
    if segmentation_node is None:  # a new node goes under the volume's transform; a chosen one keeps its own
        segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volume_node.GetName()} {LESION.name}")
        segmentation_node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    load_segmentation(row["output"], volume_node, segmentation_node)
    mark_model_output(segmentation_node, volume_node, algorithm_name)
    table_node = table_node or scene.AddNewNodeByClass("vtkMRMLTableNode", STATISTICS_TABLE_NAME)
    update_statistics_table(table_node, [row], include_lung, [volume_node.GetName()],
                            [f"model output in '{segmentation_node.GetName()}', {_now()}"])
    place_in_study(table_node, volume_node)
    return segmentation_node, table_node, row


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def segment_mask(segmentation_node, segment_id: str, volume_node) -> np.ndarray:
    """One segment as it is now, as a bool ``[z, y, x]`` array on ``volume_node``'s voxel grid (whatever the two nodes'
    transforms), through a temporary labelmap node that is always removed."""
    scene = segmentation_node.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__COVIDLesionSeg_export__")
    try:
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentation_node, [segment_id], labelmap, volume_node, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY):
            raise RuntimeError(f"could not export segment '{segment_id}' of '{segmentation_node.GetName()}'")
        return slicer.util.arrayFromVolume(labelmap) > 0
    finally:
        scene.RemoveNode(labelmap)


def segments_labelmap(segmentation_node, volume_node) -> np.ndarray:
    """The lesion and lung segments as they are now, on ``volume_node``'s voxel grid (``[z, y, x]``, whatever the two
    nodes' transforms): 1 = lesion, 2 = lung without lesion, the labelmap ``covidlesionseg measure`` reads. Segments are
    found by the IDs this tool gives them, else by name; raises ValueError without a lesion segment."""
    segmentation = segmentation_node.GetSegmentation()
    labels = np.zeros(slicer.util.arrayFromVolume(volume_node).shape, np.uint8)
    found = False
    for definition, label in ((LUNG, 2), (LESION, 1)):  # the lesion last: it wins where both are
        segment_id = _segment_id(segmentation, definition)
        if not segment_id:
            continue
        found |= definition is LESION
        labels[segment_mask(segmentation_node, segment_id, volume_node)] = label
    if not found:
        raise ValueError(f"'{segmentation_node.GetName()}' has no segment '{LESION.name}'; run the segmentation first")
    return labels


def measure_run_command(volume_node, segmentation_node, work_dir: str | Path, python: str,
                        high_opacity_threshold_hu: float | None = None) -> list[str]:
    """Write the volume and its current segments (:func:`segments_labelmap`) into ``work_dir`` and return the CLI command
    that measures them into ``work_dir/measures.csv`` (``covidlesionseg measure``)."""
    work_dir = Path(work_dir)
    ct = write_volume(volume_node, work_dir / f"{safe_file_stem(volume_node.GetName())}.nrrd")
    labels_scene = slicer.vtkMRMLScene()  # a private scene, so nothing transient appears in the user's scene
    labels = labels_scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    image = vtk.vtkImageData()
    image.SetDimensions(volume_node.GetImageData().GetDimensions())
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    labels.SetAndObserveImageData(image)
    slicer.util.arrayFromVolume(labels)[:] = segments_labelmap(segmentation_node, volume_node)
    geometry = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(geometry)
    labels.SetIJKToRASMatrix(geometry)
    segments = write_volume(labels, work_dir / "segments.nrrd", labelmap=True)
    threshold = [] if high_opacity_threshold_hu is None else [f"--high-opacity-threshold={high_opacity_threshold_hu:g}"]
    return [str(python), "-m", "COVIDLesionSegLib.cli", "measure", str(ct), str(segments), "--output",
            str(work_dir / MEASURES_FILE), *threshold]


def load_measure_result(work_dir: str | Path, volume_node, segmentation_node, table_node=None, include_lung: bool = True):
    """The measures written by :func:`measure_run_command`'s process into ``table_node`` (created when None), as the row
    of ``volume_node``, saying that they come from the segments of ``segmentation_node`` as edited. Returns
    ``(table_node, row)``; raises ``FileNotFoundError`` when the process wrote nothing."""
    row = {**read_summary(Path(work_dir) / MEASURES_FILE)[0], "status": "ok", "error": ""}
    table_node = table_node or volume_node.GetScene().AddNewNodeByClass("vtkMRMLTableNode", STATISTICS_TABLE_NAME)
    update_statistics_table(table_node, [row], include_lung, [volume_node.GetName()],
                            [f"segments of '{segmentation_node.GetName()}' as edited, {_now()}"])
    place_in_study(table_node, volume_node)
    return table_node, row


def _move_to_new_file(path: Path, folder: Path, stem: str) -> Path:
    """Move the report ``path`` into ``folder`` as ``<stem>.report.png``, or ``<stem>_2.report.png``, … if taken."""
    folder.mkdir(parents=True, exist_ok=True)
    target, count = folder / f"{stem}{REPORT_SUFFIX}", 1
    while target.exists():
        count += 1
        target = folder / f"{stem}_{count}{REPORT_SUFFIX}"
    return Path(shutil.move(str(path), str(target)))


def folder_run_command(input_folder: Path | None, output_folder: Path | None, options: CLIOptions) -> list[str]:
    """The CLI command that segments every case of ``input_folder`` into ``output_folder``, skipping cases done before."""
    if not input_folder or not Path(input_folder).is_dir():
        raise ValueError("Select an existing input folder.")
    if not output_folder:
        raise ValueError("Select an output folder.")
    if Path(output_folder).resolve().is_relative_to(Path(input_folder).resolve()):
        raise ValueError("Choose an output folder outside the input folder: segmentations written inside it would be "
                         "read as new cases by the next batch run.")
    return options.command([Path(input_folder)], Path(output_folder), overwrite=False)


def load_folder_results(output_folder: str | Path, scene, table_node=None, include_lung: bool = True,
                        written_after: float | None = None):
    """The summary of a :func:`folder_run_command` process in ``table_node`` (created in ``scene`` when None).
    Returns ``(table_node, rows)``; raises ``FileNotFoundError`` when the process wrote no summary (one older than
    ``written_after``, a ``time.time()`` value, is a previous run's)."""
    rows = read_summary(Path(output_folder) / SUMMARY_FILE, written_after)
    table_node = table_node or scene.AddNewNodeByClass("vtkMRMLTableNode", STATISTICS_TABLE_NAME)
    sources = [f"model output {row['output']}" if row["output"] else "" for row in rows]
    update_statistics_table(table_node, rows, include_lung, sources=sources)
    return table_node, rows


def batch_report(rows: list[dict[str, str]]) -> str:
    """``"12 cases: 9 segmented, 2 skipped (already done), 1 failed."``"""
    counts = collections.Counter(row["status"] for row in rows)
    return (f"{len(rows)} cases: {counts['ok']} segmented, {counts['skipped']} skipped (already done), "
            f"{counts['failed']} failed.")


def write_volume(volume_node, path: str | Path, labelmap: bool = False) -> Path:
    """Write a scalar volume node (a labelmap node with ``labelmap``) to ``path`` (``.nrrd``, uncompressed) with its
    voxels and geometry unchanged.

    The volume's parent transform is not applied: results are placed under the same transform instead.
    """
    if volume_node is None or volume_node.GetImageData() is None:
        raise ValueError("the input volume has no image data; load a CT volume first")
    if volume_node.IsA("vtkMRMLLabelMapVolumeNode") != labelmap or volume_node.GetImageData().GetNumberOfScalarComponents() != 1:
        raise ValueError(f"'{volume_node.GetName()}' is not a greyscale scalar volume; select a CT volume")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(False)  # a temporary file: writing speed matters more than size
    if not storage.WriteData(volume_node):
        raise OSError(f"{path}: could not write volume '{volume_node.GetName()}'")
    return path


def load_segmentation(path: str | Path, volume_node, segmentation_node) -> list[str]:
    """Import the segments of ``path`` (written on ``volume_node``'s grid) into ``segmentation_node``; returns their IDs.

    Segments this tool wrote before (IDs in ``segments.SEGMENTS``) are replaced, other segments are kept. The node
    gets display nodes, a closed surface (3D view), the volume as reference image geometry and the volume's study. Its
    parent transform is left as it is: when it differs from the volume's, the segments are transformed so that they cover the same anatomy.
    """
    reader_scene = slicer.vtkMRMLScene()  # a private scene, so nothing transient appears in the user's scene
    source = reader_scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(source):
        raise OSError(f"{path}: could not read the segmentation file")
    source_segmentation = source.GetSegmentation()
    segment_ids = [source_segmentation.GetNthSegmentID(index) for index in range(source_segmentation.GetNumberOfSegments())]
    if volume_node.GetParentTransformNode() is not segmentation_node.GetParentTransformNode():
        volume_to_segmentation = vtk.vtkGeneralTransform()
        slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(volume_node.GetParentTransformNode(),
                                                             segmentation_node.GetParentTransformNode(), volume_to_segmentation)
        if slicer.vtkMRMLTransformNode.IsGeneralTransformLinear(volume_to_segmentation):
            source_segmentation.ApplyLinearTransform(volume_to_segmentation)
        else:
            source_segmentation.ApplyNonLinearTransform(volume_to_segmentation)

    if segmentation_node.GetDisplayNode() is None:
        segmentation_node.CreateDefaultDisplayNodes()
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)  # in the node's own frame
    target = segmentation_node.GetSegmentation()
    for segment_id in set(SEGMENTS) | set(segment_ids):
        if target.GetSegment(segment_id) is not None:
            target.RemoveSegment(segment_id)
    for segment_id in segment_ids:
        if not target.CopySegmentFromSegmentation(source_segmentation, segment_id, False):
            raise RuntimeError(f"{path}: could not import segment '{segment_id}'")
    segmentation_node.CreateClosedSurfaceRepresentation()  # shown in 3D, as the reference extensions show results
    place_in_study(segmentation_node, volume_node)
    return segment_ids


def place_in_study(node, reference_node) -> None:
    """Put ``node`` beside ``reference_node`` in the subject hierarchy (same patient/study folder)."""
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(node.GetScene())
    reference_item = hierarchy.GetItemByDataNode(reference_node)
    if not reference_item:
        return
    parent = hierarchy.GetItemParent(reference_item)
    item = hierarchy.GetItemByDataNode(node) or hierarchy.CreateItem(parent, node)
    hierarchy.SetItemParent(item, parent)


def read_summary(path: str | Path, written_after: float | None = None) -> list[dict[str, str]]:
    """The rows of the CLI's ``summary.csv`` (columns ``input, output, status, error, lesion_ml, …``); a file last
    modified before ``written_after`` (a ``time.time()`` value) counts as missing."""
    path = Path(path)
    if not path.is_file() or (written_after is not None and path.stat().st_mtime < written_after):
        raise FileNotFoundError(f"{path}: the segmentation process wrote no summary")
    with open(path, newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


def warnings_text(row: dict[str, str], work_dir: str | Path) -> str:
    """A summary row's warnings for the module's status line, the work folder left out of the file names they begin
    with ('' when the case has none)."""
    folder = os.path.join(os.fspath(Path(work_dir)), "")  # with its trailing separator
    return (row.get("warnings") or "").replace(folder, "")


def case_name(row: dict[str, str]) -> str:
    """The file or folder name of a summary row's input (``/data/p7.nii.gz`` → ``p7.nii.gz``)."""
    return Path(row["input"]).name


def measure_title(name: str) -> str:
    """The table title of a summary measure: its label and unit from ``statistics.MEASURES`` (``Lesion volume (mL)``)."""
    from COVIDLesionSegLib.statistics import MEASURES_BY_NAME  # imports SimpleITK: only when a table is made

    measure = MEASURES_BY_NAME.get(name)
    if measure is None:
        return name
    return f"{measure.label} ({measure.unit})" if measure.unit else measure.label


def update_statistics_table(table_node, rows: list[dict[str, str]], include_lung: bool = True,
                            case_names: list[str] | None = None, sources: list[str] | None = None) -> None:
    """Fill ``table_node`` with one row per summary row: the case, every measure of the summary in its order
    (titled, with unit and definition, from ``statistics.MEASURES``), then status and error, then which segmentation
    state the row was computed from (``sources``, column ``Computed from``), then the visual report's path (column
    ``Report``, only when a row has one). Without ``include_lung`` only the lesion's own measures (``lesion_*``) are shown.

    Numeric measures are numeric columns (sortable, plottable; NaN where not available, an empty cell in CSV export),
    the others (severity, input in HU) the text of ``summary.csv``. ``case_names`` overrides the names taken from the
    inputs (the module names a scene volume by its node name).
    """
    from COVIDLesionSegLib.statistics import MEASURES_BY_NAME

    names = case_names or [case_name(row) for row in rows]
    measures = [key for key in (rows[0] if rows else {}) if key in MEASURES_BY_NAME and (include_lung or key.startswith("lesion_"))]
    reports = [row.get("report") or "" for row in rows]
    with slicer.util.NodeModify(table_node):
        table_node.RemoveAllColumns()
        table_node.AddColumn(_string_column("Case", names))
        for key in measures:
            title = measure_title(key)
            cells = [row.get(key) or "" for row in rows]
            table_node.AddColumn(_double_column(title, cells) if all(map(_is_number, cells)) else _string_column(title, cells))
            table_node.SetColumnDescription(title, MEASURES_BY_NAME[key].definition)
            table_node.SetColumnUnitLabel(title, MEASURES_BY_NAME[key].unit)
        table_node.AddColumn(_string_column("Status", [row["status"] for row in rows]))
        table_node.AddColumn(_string_column("Error", [row.get("error") or "" for row in rows]))
        warnings = [row.get("warnings") or "" for row in rows]
        if any(warnings):
            table_node.AddColumn(_string_column(WARNINGS_COLUMN, warnings))
            table_node.SetColumnDescription(WARNINGS_COLUMN, "notes on the input: a conversion made, why it may not be a chest CT, "
                                            "or that it is coarser in plane than any slice the model trained on")
        table_node.AddColumn(_string_column(SOURCE_COLUMN, sources or [""] * len(rows)))
        table_node.SetColumnDescription(SOURCE_COLUMN, "the segmentation the measures were computed from: the model's output, "
                                                       "or the segments as edited when recomputed (Recompute from segments)")
        if any(reports):
            table_node.AddColumn(_string_column(REPORT_COLUMN, reports))
            table_node.SetColumnDescription(REPORT_COLUMN, "the visual report PNG of the case (Show report opens it)")
        table_node.SetUseColumnTitleAsColumnHeader(True)


def _is_number(text: str) -> bool:
    """An empty cell (not available) or a finite number."""
    try:
        return not text or math.isfinite(float(text))
    except ValueError:
        return False


def run_report(table_node, row: int | None = None) -> Path | None:
    """The visual report PNG of row ``row`` of a statistics table, by default the last run's: the last row that has
    one (the only row of a volume run, the last case of a batch). None when there is none or its file is gone."""
    column = table_node.GetColumnIndex(REPORT_COLUMN) if table_node is not None else -1
    if column < 0:
        return None
    count = table_node.GetNumberOfRows()
    candidates = range(count - 1, -1, -1) if row is None else [row] if 0 <= row < count else []
    for index in candidates:
        text = table_node.GetCellText(index, column)
        if text and Path(text).is_file():
            return Path(text)
    return None


def _double_column(title: str, cells: list[str]) -> vtk.vtkDoubleArray:
    column = vtk.vtkDoubleArray()
    column.SetName(title)
    for cell in cells:
        column.InsertNextValue(float(cell) if cell else math.nan)
    return column


def _string_column(title: str, values: list[str]) -> vtk.vtkStringArray:
    column = vtk.vtkStringArray()
    column.SetName(title)
    for value in values:
        column.InsertNextValue(value)
    return column


def write_table_csv(table_node, path: str | Path) -> Path:
    """Write ``table_node`` as CSV: a header of column titles, then one line per row; NaN becomes an empty cell."""
    table = table_node.GetTable()
    columns = [table.GetColumn(index) for index in range(table.GetNumberOfColumns())]
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow([column.GetName() for column in columns])
        for row in range(table.GetNumberOfRows()):
            writer.writerow([_csv_cell(column.GetVariantValue(row)) for column in columns])
    return path


def _csv_cell(value: vtk.vtkVariant) -> str:
    if value.IsString():
        return value.ToString()
    number = value.ToDouble()
    return "" if math.isnan(number) else format(number, ".10g")


def measures_help_html() -> str:
    """The definitions of ``COVIDLesionSegLib.statistics`` as HTML for the module's help, quoted, never re-typed:
    every measure (table title and definition, in ``MEASURES`` order), the severity categories, the left/right rule
    and the not-available rule. Imports statistics (and SimpleITK): call it when the module is opened, not at start-up."""
    from COVIDLesionSegLib.statistics import LEFT_RIGHT_RULE, MEASURES, NOT_AVAILABLE_RULE, SEVERITY_DEFINITIONS

    def text(value: str) -> str:
        return html.escape(value, quote=False)

    measures = "".join(f"<li><i>{text(measure_title(measure.name))}</i>: {text(measure.definition)}</li>" for measure in MEASURES)
    categories = "".join(f"<li>{text(category)}: {text(meaning)}</li>" for category, meaning in SEVERITY_DEFINITIONS.items())
    return (f"<p><b>Statistics</b>: the measures of the table, of summary.csv and of the visual report, with the same text "
            f"in all three (an empty cell means not available):</p><ul>{measures}</ul>"
            f"<p><b>Severity categories</b> (MosMed):</p><ul>{categories}</ul>"
            f"<p><b>Left and right</b>: {text(LEFT_RIGHT_RULE)}</p>"
            f"<p><b>Not available</b>: {text(NOT_AVAILABLE_RULE)}</p>")


def load_terminology(terminologies_logic) -> str:
    """Load the shipped terminology context (segment names and recommended colours) unless it is loaded; returns its
    name. Uses only what Slicer 5.6 has (``IsTerminologyContextLoaded`` exists from 5.10 only)."""
    names = vtk.vtkStringArray()
    terminologies_logic.GetLoadedTerminologyNames(names)
    if TERMINOLOGY_CONTEXT not in {names.GetValue(index) for index in range(names.GetNumberOfValues())}:
        path = resource_path(TERMINOLOGY_FILE)
        loaded = terminologies_logic.LoadTerminologyFromFile(str(path))
        if loaded != TERMINOLOGY_CONTEXT:
            raise RuntimeError(f"{path}: terminology context {loaded!r} loaded, expected {TERMINOLOGY_CONTEXT!r}")
    return TERMINOLOGY_CONTEXT


def _segment_id(segmentation, definition) -> str:
    """The ID of a segment of this tool in ``segmentation``: its own ID, else the first segment of its name; "" if none."""
    if segmentation.GetSegment(definition.channel):
        return definition.channel
    return segmentation.GetSegmentIdBySegmentName(definition.name) or ""


# The lesion probability map (``covidlesionseg segment --probabilities``) -------------------------------------------------

PROBABILITY_SUFFIX = ".lesion-probability.nrrd"  # io.PROBABILITY_SUFFIX, repeated: importing io loads SimpleITK (a test keeps them equal)
PROBABILITY_NAME_SUFFIX = "lesion probability"  # the probability volume is "<input volume> lesion probability"
# Slicer's Inferno colour table (Slicer 5.6 to 5.12 ship it): dark red at low, yellow at high probability.
PROBABILITY_COLOR_NODE_ID = "vtkMRMLColorTableNodeFileInferno.txt"
DEFAULT_PROBABILITY_THRESHOLD = 0.6  # the CLI's own (GuardRails.lesion_threshold): the lesion is where p >= 0.6, before the other rails
DEFAULT_OVERLAY_OPACITY = 0.5


def load_probability_result(work_dir: str | Path, volume_node, probability_node=None):
    """The lesion probability map written by a :func:`volume_run_command` process with ``CLIOptions.probabilities``, loaded
    with :func:`load_probability_map`; None when the process wrote none."""
    maps = sorted((Path(work_dir) / VOLUME_RUN_OUTPUT).glob(f"*{PROBABILITY_SUFFIX}"))
    return load_probability_map(maps[0], volume_node, probability_node) if maps else None


def load_probability_map(path: str | Path, volume_node, probability_node=None):
    """Read a probability map file (the CLI's uint8 map, or a float map of values 0…1) written on ``volume_node``'s grid into
    ``probability_node`` (created when None, as "<volume> lesion probability" under the volume's transform) in the volume's
    study; returns the node. The node keeps no link to the file, which may be temporary: saving the scene writes it anew."""
    path = Path(path)
    scene = volume_node.GetScene()
    if probability_node is None:
        probability_node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"{volume_node.GetName()} {PROBABILITY_NAME_SUFFIX}")
        probability_node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    if not path.is_file() or not storage.ReadData(probability_node):
        raise OSError(f"{path}: could not read the probability map")
    place_in_study(probability_node, volume_node)
    return probability_node


def probability_scale(probability_node) -> float:
    """The stored value of probability 1: 255 for an integer map (the CLI's uint8 map, voxel = round(255 × p)), 1 for a
    floating-point map (voxel = p)."""
    image = probability_node.GetImageData() if probability_node is not None else None
    if image is None:
        raise ValueError("the probability map has no image data; load a lesion probability map first")
    return 1.0 if image.GetScalarType() in (vtk.VTK_FLOAT, vtk.VTK_DOUBLE) else 255.0


def probability_cutoff(probability_node, threshold: float) -> float:
    """The stored value at or above which a voxel's probability is at least ``threshold`` (0 < threshold ≤ 1):
    floor(255 × threshold + 0.5) for the CLI's uint8 map, which rounds p the same way (so 0.5 → 128, exactly where the
    CLI's lesion mask ends before its guard rails), and ``threshold`` itself for a float map."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"a probability threshold is above 0 and at most 1, not {threshold}")
    scale = probability_scale(probability_node)
    return threshold if scale == 1.0 else float(math.floor(threshold * scale + 0.5))


def show_probability_overlay(probability_node, threshold: float = DEFAULT_PROBABILITY_THRESHOLD,
                             opacity: float = DEFAULT_OVERLAY_OPACITY, background_node=None) -> None:
    """Show ``probability_node`` in every slice view as the foreground layer (``opacity``) over ``background_node`` (the CT;
    the background is left as it is when None), coloured by probability (0…1 across :data:`PROBABILITY_COLOR_NODE_ID`)
    and transparent below ``threshold`` (:func:`set_overlay_threshold`): what is coloured is what
    :func:`threshold_probability_into_segment` makes the lesion at that threshold."""
    scale = probability_scale(probability_node)
    if probability_node.GetDisplayNode() is None:
        probability_node.CreateDefaultDisplayNodes()
    display = probability_node.GetDisplayNode()
    with slicer.util.NodeModify(display):
        display.SetAndObserveColorNodeID(PROBABILITY_COLOR_NODE_ID)
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(0.0, scale)
        display.AutoThresholdOff()
        display.ApplyThresholdOn()
    set_overlay_threshold(probability_node, threshold)
    scene = probability_node.GetScene()
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode")
        with slicer.util.NodeModify(composite):
            if background_node is not None:
                composite.SetBackgroundVolumeID(background_node.GetID())
            composite.SetForegroundVolumeID(probability_node.GetID())
            composite.SetForegroundOpacity(opacity)


def set_overlay_threshold(probability_node, threshold: float) -> None:
    """Make the overlay of ``probability_node`` transparent where the probability is below ``threshold``."""
    display = probability_node.GetDisplayNode()
    if display is not None:
        display.SetThreshold(probability_cutoff(probability_node, threshold), probability_scale(probability_node))


def _geometry_in_frame_of(volume_node, node) -> vtk.vtkMatrix4x4:
    """The IJK-to-RAS matrix of ``volume_node`` in the coordinate frame of ``node`` (under ``node``'s parent transform).

    Done here rather than left to ``ImportLabelmapToSegmentationNode``: given a labelmap under another linear transform,
    its import (seen with slicer-core's MRML library) cropped the segment to a shifted extent; with the labelmap in the
    segmentation's own frame nothing is transformed on import (test_slicer_overlay_export covers the case)."""
    geometry = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(geometry)
    if volume_node.GetParentTransformNode() is node.GetParentTransformNode():
        return geometry
    between = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(volume_node.GetParentTransformNode(), node.GetParentTransformNode(), between)
    if not slicer.vtkMRMLTransformNode.IsGeneralTransformLinear(between):
        raise ValueError(f"'{volume_node.GetName()}' and '{node.GetName()}' are under different non-linear transforms; "
                         "harden the transforms (Data module) first")
    matrix = vtk.vtkMatrix4x4()
    slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(volume_node.GetParentTransformNode(), node.GetParentTransformNode(), matrix)
    vtk.vtkMatrix4x4.Multiply4x4(matrix, geometry, geometry)
    return geometry


def threshold_probability_into_segment(probability_node, segmentation_node, threshold: float) -> int:
    """Replace the lesion segment of ``segmentation_node`` by the voxels of ``probability_node`` whose probability is at least
    ``threshold`` (:func:`probability_cutoff`); returns their number.

    The voxels are those of the probability map's grid, placed over the same anatomy whatever the two nodes' transforms.
    The segment keeps its name, colour and terminology, the other segments are left alone; it is created (name, colour and
    terminology of ``segments.LESION``) when missing. It is marked SEMIAUTOMATIC for a DICOM SEG (the reader chose the
    threshold). Unlike the CLI, no guard rail applies: small lesion components are kept.
    """
    cutoff = probability_cutoff(probability_node, threshold)
    mask = (slicer.util.arrayFromVolume(probability_node) >= cutoff).astype(np.uint8)
    segmentation = segmentation_node.GetSegmentation()
    segment_id = _segment_id(segmentation, LESION)
    if not segment_id:
        segment = slicer.vtkSegment()
        segment.SetName(LESION.name)
        segment.SetColor(*LESION.color)
        segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), LESION.terminology)
        segmentation.AddSegment(segment, LESION.channel)
        segment_id = LESION.channel
    scene = segmentation_node.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__COVIDLesionSeg_threshold__")
    try:
        image = vtk.vtkImageData()
        image.SetDimensions(mask.shape[2], mask.shape[1], mask.shape[0])
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        labelmap.SetAndObserveImageData(image)
        slicer.util.arrayFromVolume(labelmap)[:] = mask
        labelmap.SetIJKToRASMatrix(_geometry_in_frame_of(probability_node, segmentation_node))
        labelmap.SetAndObserveTransformNodeID(segmentation_node.GetTransformNodeID())
        segment_ids = vtk.vtkStringArray()
        segment_ids.InsertNextValue(segment_id)
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation_node, segment_ids):
            raise RuntimeError(f"could not write the thresholded lesion into '{segmentation_node.GetName()}'")
    finally:
        scene.RemoveNode(labelmap)
    segment = segmentation.GetSegment(segment_id)
    segment.SetTag(ALGORITHM_TYPE_TAG, "SEMIAUTOMATIC")
    segment.RemoveTag(MODEL_OUTPUT_DIGEST_TAG)
    if not segment.HasTag(ALGORITHM_NAME_TAG):
        segment.SetTag(ALGORITHM_NAME_TAG, "COVIDLesionSeg")
    return int(mask.sum())


# DICOM SEG export into Slicer's DICOM database ---------------------------------------------------------------------------

DICOM_SEG_PLUGIN = "DICOMSegmentationPlugin"  # its key in slicer.modules.dicomPlugins (Slicer 5.12+, or QuantitativeReporting)
DICOM_INSTANCE_UIDS_ATTRIBUTE = "DICOM.instanceUIDs"  # set by Slicer's DICOM volume plugins on a volume loaded from the database
# Segment tags the DICOM SEG plugin writes as Segment Algorithm Type and Name (without them: MANUAL).
ALGORITHM_TYPE_TAG = "DICOM.SegmentAlgorithmType"
ALGORITHM_NAME_TAG = "DICOM.SegmentAlgorithmName"
MODEL_OUTPUT_DIGEST_TAG = "COVIDLesionSeg.ModelOutputDigest"  # the voxels of a segment as the model made it (SHA-256)
NO_DICOM_SEG_PLUGIN = ("Slicer's DICOM SEG plugin is not available. Slicer 5.12 and later have it built in; in Slicer 5.6 to "
                       "5.10 install the QuantitativeReporting extension (Extensions Manager) and restart Slicer.")


def segment_digest(segmentation_node, segment_id: str, volume_node) -> str:
    """The SHA-256 of a segment's voxels on ``volume_node``'s grid: equal exactly while the segment is not edited."""
    import hashlib

    mask = segment_mask(segmentation_node, segment_id, volume_node)
    return hashlib.sha256(np.packbits(mask).tobytes() + repr(mask.shape).encode()).hexdigest()


def mark_model_output(segmentation_node, volume_node, algorithm_name: str) -> None:
    """Mark the segments of this tool in ``segmentation_node`` as the model's output: Segment Algorithm Type AUTOMATIC and
    Name ``algorithm_name`` for a DICOM SEG, and the digest of their voxels, by which :func:`update_algorithm_types` sees
    an edit."""
    segmentation = segmentation_node.GetSegmentation()
    for definition in SEGMENTS.values():
        segment_id = _segment_id(segmentation, definition)
        if segment_id:
            segment = segmentation.GetSegment(segment_id)
            segment.SetTag(ALGORITHM_TYPE_TAG, "AUTOMATIC")
            segment.SetTag(ALGORITHM_NAME_TAG, algorithm_name[:64])  # a DICOM LO value
            segment.SetTag(MODEL_OUTPUT_DIGEST_TAG, segment_digest(segmentation_node, segment_id, volume_node))


def update_algorithm_types(segmentation_node, volume_node) -> dict[str, str]:
    """A segment marked as the model's output whose voxels changed since (an edit in the Segment Editor) becomes
    SEMIAUTOMATIC: the model's result corrected by the reader. Returns ``{segment ID: algorithm type}`` of the segments
    that have one (segments without are written as MANUAL by the DICOM SEG plugin)."""
    segmentation = segmentation_node.GetSegmentation()
    types = {}
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        segment = segmentation.GetSegment(segment_id)
        digest = vtk.reference("")
        if segment.GetTag(MODEL_OUTPUT_DIGEST_TAG, digest) and str(digest) != segment_digest(segmentation_node, segment_id, volume_node):
            segment.SetTag(ALGORITHM_TYPE_TAG, "SEMIAUTOMATIC")
            segment.RemoveTag(MODEL_OUTPUT_DIGEST_TAG)
        algorithm_type = vtk.reference("")
        if segment.GetTag(ALGORITHM_TYPE_TAG, algorithm_type):
            types[segment_id] = str(algorithm_type)
    return types


def dicom_seg_export_problem(segmentation_node) -> str | None:
    """Why ``segmentation_node`` cannot become a DICOM SEG of its CT, in words for the reader; None when it can: it needs
    segments and a reference volume (the CT it was made on) loaded from Slicer's DICOM database, whose slices the SEG
    references."""
    if segmentation_node is None:
        return "Select the segmentation to export."
    if segmentation_node.GetSegmentation().GetNumberOfSegments() == 0:
        return f"'{segmentation_node.GetName()}' has no segments to export."
    volume_node = segmentation_node.GetNodeReference(segmentation_node.GetReferenceImageGeometryReferenceRole())
    if volume_node is None:
        return (f"'{segmentation_node.GetName()}' has no reference volume: segment a CT loaded from the DICOM database "
                "(DICOM module) with this module, then export.")
    if not volume_node.GetAttribute(DICOM_INSTANCE_UIDS_ATTRIBUTE):
        return (f"'{volume_node.GetName()}' was not loaded from Slicer's DICOM database, so a DICOM SEG cannot reference its "
                "slices. Import the CT series in the DICOM module, load it from there and segment it; or run "
                "covidlesionseg segment --format dicom-seg on the DICOM series.")
    return None


def export_segmentation_to_dicom_database(segmentation_node, dicom_plugins: dict, import_folder, export_dir: str | Path) -> list[Path]:
    """Export ``segmentation_node`` (every segment, as it is now) as a DICOM SEG of its reference CT into Slicer's DICOM
    database, as the DICOM module's export dialog does: the DICOM SEG plugin (``dicom_plugins[DICOM_SEG_PLUGIN]``, i.e.
    ``slicer.modules.dicomPlugins``) examines the segmentation's subject hierarchy item for export, writes its exportables
    into ``export_dir``, and ``import_folder(folder)`` (``DICOMUtils.importDicom`` copying the files) adds them to the
    database. Returns the files written (the caller removes ``export_dir``).

    The segments' algorithm types are brought up to date first (:func:`update_algorithm_types`). Raises ValueError
    (:func:`dicom_seg_export_problem`) or RuntimeError (no plugin, or the plugin's own error message)."""
    problem = dicom_seg_export_problem(segmentation_node)
    if problem:
        raise ValueError(problem)
    plugin_class = (dicom_plugins or {}).get(DICOM_SEG_PLUGIN)
    if plugin_class is None:
        raise RuntimeError(NO_DICOM_SEG_PLUGIN)
    volume_node = segmentation_node.GetNodeReference(segmentation_node.GetReferenceImageGeometryReferenceRole())
    update_algorithm_types(segmentation_node, volume_node)
    place_in_study(segmentation_node, volume_node)  # the SEG goes into the CT's study
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(segmentation_node.GetScene())
    item = hierarchy.GetItemByDataNode(segmentation_node) or hierarchy.CreateItem(hierarchy.GetSceneItemID(), segmentation_node)
    plugin = plugin_class()
    exportables = plugin.examineForExport(item)
    if not exportables:
        raise RuntimeError(f"The DICOM SEG plugin cannot export '{segmentation_node.GetName()}': the series it references are "
                           "not all in the DICOM database.")
    export_dir = Path(export_dir)
    export_dir.mkdir(parents=True, exist_ok=True)
    for exportable in exportables:
        exportable.directory = str(export_dir)
    error = plugin.export(exportables)
    if error:
        raise RuntimeError(f"DICOM SEG export of '{segmentation_node.GetName()}' failed: {error}")
    files = sorted(export_dir.glob("*.dcm"))
    if not files:
        raise RuntimeError(f"The DICOM SEG plugin wrote no file for '{segmentation_node.GetName()}'.")
    if not import_folder(str(export_dir)):
        raise RuntimeError(f"The DICOM SEG of '{segmentation_node.GetName()}' was written but could not be added to the DICOM database.")
    return files
