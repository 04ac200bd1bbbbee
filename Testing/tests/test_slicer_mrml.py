"""The Slicer module's node handling (COVIDLesionSegMRML) against the real MRML library of the slicer-core wheel."""

from __future__ import annotations

import csv
import importlib.metadata
import json
import math
import os
import shutil
import time
import types
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from slicer_support import add_volume, new_scene, segment_array, slicer, synthetic_ct, vtk

import COVIDLesionSegMRML as mrml
from COVIDLesionSegLib import io
from COVIDLesionSegLib.segments import LESION, LUNG, SEGMENTS, TERMINOLOGY_CONTEXT
from COVIDLesionSegLib.statistics import DEFAULT_HIGH_OPACITY_THRESHOLD_HU, MEASURES_BY_NAME

# An oblique, anisotropic geometry: axes rotated 30° about S, voxels 0.7 × 0.8 × 2.5 mm, off-centre origin.
ANGLE = math.radians(30)
OBLIQUE = np.array([
    [math.cos(ANGLE) * 0.7, -math.sin(ANGLE) * 0.8, 0.0, 12.5],
    [math.sin(ANGLE) * 0.7, math.cos(ANGLE) * 0.8, 0.0, -30.0],
    [0.0, 0.0, 2.5, 41.0],
    [0.0, 0.0, 0.0, 1.0],
])
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@pytest.fixture
def scene():
    return new_scene()


@pytest.fixture
def volume(scene):
    return add_volume(scene, synthetic_ct(), OBLIQUE)


def write_result(volume, folder, lesion: np.ndarray, lung: np.ndarray | None = None):
    """A ``.seg.nrrd`` written by the core (as the CLI writes it) on the grid of ``volume``'s file."""
    image = sitk.ReadImage(str(mrml.write_volume(volume, folder / "input.nrrd")))

    def on_grid(mask):
        mask_image = sitk.GetImageFromArray(mask.astype(np.uint8))
        mask_image.CopyInformation(image)
        return mask_image

    masks = {"lesion": on_grid(lesion)} | ({"lung": on_grid(lung)} if lung is not None else {})
    return io.write_segmentation(folder / "input.seg.nrrd", masks)


def test_write_volume_keeps_voxels_and_geometry_in_lps(volume, tmp_path):
    path = mrml.write_volume(volume, tmp_path / "deep" / "ct.nrrd")
    image = sitk.ReadImage(str(path))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), slicer.util.arrayFromVolume(volume))
    assert np.allclose(io.ijk_to_lps(image), RAS_TO_LPS @ OBLIQUE)


def test_write_volume_refuses_what_is_not_a_ct(scene, tmp_path):
    with pytest.raises(ValueError, match="no image data"):
        mrml.write_volume(scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty"), tmp_path / "a.nrrd")
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    labelmap.SetAndObserveImageData(add_volume(scene, synthetic_ct(), OBLIQUE).GetImageData())
    with pytest.raises(ValueError, match="not a greyscale scalar volume"):
        mrml.write_volume(labelmap, tmp_path / "b.nrrd")


def test_load_segmentation_references_the_volume_and_keeps_every_voxel(scene, volume, tmp_path):
    lesion = np.zeros(synthetic_ct().shape, np.uint8)
    lesion[2:4, 8:12, 3:7] = 1
    lung = np.zeros_like(lesion)
    lung[1:5, 4:16, 2:14] = 1
    path = write_result(volume, tmp_path, lesion, lung)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    volume.SetAndObserveTransformNodeID(transform.GetID())
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = hierarchy.CreateStudyItem(hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "Patient 7"), "Chest CT")
    hierarchy.CreateItem(study, volume)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "result")

    assert mrml.load_segmentation(path, volume, segmentation) == ["lesion", "lung"]

    assert segmentation.GetNodeReferenceID(segmentation.GetReferenceImageGeometryReferenceRole()) == volume.GetID()
    volume_geometry = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(volume_geometry)
    expected_geometry = slicer.vtkSegmentationConverter.SerializeImageGeometry(volume_geometry, volume.GetImageData())
    assert segmentation.GetSegmentation().GetConversionParameter(slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()) \
        == expected_geometry
    np.testing.assert_array_equal(segment_array(segmentation, "lesion", volume), lesion)
    np.testing.assert_array_equal(segment_array(segmentation, "lung", volume), lung)
    assert segmentation.GetTransformNodeID() is None  # a node given by the caller keeps its own transform
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(segmentation)) == study
    assert segmentation.GetDisplayNode() is not None
    assert segmentation.GetSegmentation().ContainsRepresentation(slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName())
    for segment_id in ("lesion", "lung"):
        segment, definition = segmentation.GetSegmentation().GetSegment(segment_id), SEGMENTS[segment_id]
        assert segment.GetName() == definition.name
        assert segment.GetColor() == pytest.approx(definition.color)
        assert segment.GetTerminology() == definition.terminology


def test_load_segmentation_replaces_its_own_segments_and_keeps_the_users(scene, volume, tmp_path):
    lesion = np.zeros(synthetic_ct().shape, np.uint8)
    lesion[2, 8:10, 3:5] = 1
    lung = np.ones_like(lesion)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "result")
    segmentation.GetSegmentation().AddEmptySegment("tumour", "My tumour", [0.0, 1.0, 0.0])
    (tmp_path / "first").mkdir()
    mrml.load_segmentation(write_result(volume, tmp_path / "first", np.ones_like(lesion), lung), volume, segmentation)
    (tmp_path / "second").mkdir()

    mrml.load_segmentation(write_result(volume, tmp_path / "second", lesion), volume, segmentation)  # a run without lung

    segments = segmentation.GetSegmentation()
    assert sorted(segments.GetSegmentIDs()) == ["lesion", "tumour"]  # the stale lung segment is gone
    assert segments.GetSegment("tumour").GetName() == "My tumour"
    np.testing.assert_array_equal(segment_array(segmentation, "lesion", volume), lesion)


def test_load_segmentation_of_an_unreadable_file_raises(scene, volume, tmp_path):
    broken = tmp_path / "broken.seg.nrrd"
    broken.write_text("not a segmentation")
    with pytest.raises(OSError, match="could not read"):
        mrml.load_segmentation(broken, volume, scene.AddNewNodeByClass("vtkMRMLSegmentationNode"))


def test_volume_outside_any_study_leaves_the_hierarchy_alone(scene, volume, tmp_path):
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    mrml.load_segmentation(write_result(volume, tmp_path, np.ones(synthetic_ct().shape)), volume, segmentation)
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    assert not hierarchy.GetItemByDataNode(segmentation)


# Rows as the CLI writes them: run columns, measures in statistics.MEASURES order (a subset here), trailing columns.
SUMMARY = [
    {"input": "/data/p1.nii.gz", "output": "/out/p1.seg.nrrd", "status": "ok", "error": "", "severity": "CT-1",
     "percent_opacity": "0.36", "lesion_ml": "12.35", "lung_ml": "3400.00", "lesion_slices": "7", "input_is_hu": "yes",
     "report": "", "seconds": "1.00"},
    {"input": "/data/dicom/p2", "output": "/out/p2.seg.nrrd", "status": "skipped", "error": "output exists; use --overwrite to replace it",
     "severity": "", "percent_opacity": "", "lesion_ml": "0.00", "lung_ml": "", "lesion_slices": "0", "input_is_hu": "no",
     "report": "", "seconds": ""},
    {"input": "/data/p3.nrrd", "output": "", "status": "failed", "error": "/data/p3.nrrd: constant image", "severity": "",
     "percent_opacity": "", "lesion_ml": "", "lung_ml": "", "lesion_slices": "", "input_is_hu": "", "report": "", "seconds": "0.01"},
]


def titles(table) -> list[str]:
    return [table.GetColumnName(index) for index in range(table.GetNumberOfColumns())]


def test_statistics_table_has_one_row_per_case_with_numeric_measure_columns(scene):
    table = scene.AddNewNodeByClass("vtkMRMLTableNode")
    sources = ["model output /out/p1.seg.nrrd", "model output /out/p2.seg.nrrd", ""]
    mrml.update_statistics_table(table, SUMMARY, sources=sources)
    measures = ["severity", "percent_opacity", "lesion_ml", "lung_ml", "lesion_slices", "input_is_hu"]
    assert titles(table) == ["Case", *(mrml.measure_title(name) for name in measures), "Status", "Error", mrml.SOURCE_COLUMN]
    assert mrml.measure_title("lesion_ml") == f"{MEASURES_BY_NAME['lesion_ml'].label} (mL)"
    assert [table.GetCellText(row, 0) for row in range(3)] == ["p1.nii.gz", "p2", "p3.nrrd"]
    for name in ("percent_opacity", "lesion_ml", "lung_ml", "lesion_slices"):  # numeric: sortable and plottable
        column = table.GetTable().GetColumnByName(mrml.measure_title(name))
        assert column.IsA("vtkDoubleArray"), name
        values = [column.GetValue(row) for row in range(3)]
        expected = [float(row[name]) if row[name] else math.nan for row in SUMMARY]
        np.testing.assert_array_equal(values, expected)
    for name in ("severity", "input_is_hu"):  # text as in summary.csv
        column = table.GetColumnIndex(mrml.measure_title(name))
        assert [table.GetCellText(row, column) for row in range(3)] == [row[name] for row in SUMMARY]
    assert [table.GetCellText(row, table.GetColumnIndex("Status")) for row in range(3)] == ["ok", "skipped", "failed"]
    assert table.GetCellText(2, table.GetColumnIndex("Error")) == "/data/p3.nrrd: constant image"
    assert [table.GetCellText(row, table.GetColumnIndex(mrml.SOURCE_COLUMN)) for row in range(3)] == sources
    assert table.GetColumnDescription(mrml.measure_title("lesion_ml")) == MEASURES_BY_NAME["lesion_ml"].definition
    assert table.GetColumnUnitLabel(mrml.measure_title("lesion_ml")) == "mL"
    assert table.GetUseColumnTitleAsColumnHeader()


def test_statistics_table_shows_input_warnings_only_when_a_case_has_one(scene):
    table = scene.AddNewNodeByClass("vtkMRMLTableNode")
    rows = [dict(SUMMARY[0], warnings="read as CT stored as HU + 1024; converted to HU"), SUMMARY[1]]
    mrml.update_statistics_table(table, rows)
    column = table.GetColumnIndex(mrml.WARNINGS_COLUMN)
    assert [table.GetCellText(row, column) for row in range(2)] == [rows[0]["warnings"], ""]
    mrml.update_statistics_table(table, SUMMARY)
    assert table.GetColumnIndex(mrml.WARNINGS_COLUMN) < 0


def test_statistics_table_without_lung_keeps_the_lesion_measures_and_is_refilled_in_place(scene):
    table = scene.AddNewNodeByClass("vtkMRMLTableNode")
    mrml.update_statistics_table(table, SUMMARY)
    mrml.update_statistics_table(table, SUMMARY[:1], include_lung=False, case_names=["Chest CT (scene)"])
    assert titles(table) == ["Case", mrml.measure_title("lesion_ml"), mrml.measure_title("lesion_slices"), "Status", "Error",
                             mrml.SOURCE_COLUMN]
    assert table.GetNumberOfRows() == 1 and table.GetCellText(0, 0) == "Chest CT (scene)"


def test_table_exports_to_csv_with_the_numbers_and_empty_cells_for_missing_numbers(scene, tmp_path):
    table = scene.AddNewNodeByClass("vtkMRMLTableNode")
    mrml.update_statistics_table(table, SUMMARY)
    with open(mrml.write_table_csv(table, tmp_path / "statistics.csv"), newline="", encoding="utf-8") as stream:
        lines = list(csv.reader(stream))
    assert lines[0] == titles(table)
    assert lines[1:] == [
        ["p1.nii.gz", "CT-1", "0.36", "12.35", "3400", "7", "yes", "ok", "", ""],
        ["p2", "", "", "0", "", "0", "no", "skipped", "output exists; use --overwrite to replace it", ""],
        ["p3.nrrd", "", "", "", "", "", "", "failed", "/data/p3.nrrd: constant image", ""],
    ]


def test_report_column_and_the_report_of_the_last_run(scene, tmp_path):
    reports = [tmp_path / "p1.report.png", tmp_path / "p2.report.png"]
    for path in reports:
        path.write_bytes(b"\x89PNG")
    rows = [{**SUMMARY[0], "report": str(reports[0])}, {**SUMMARY[1], "report": str(reports[1])}, SUMMARY[2]]
    table = scene.AddNewNodeByClass("vtkMRMLTableNode")
    mrml.update_statistics_table(table, rows)
    assert titles(table)[-1] == mrml.REPORT_COLUMN
    assert [table.GetCellText(row, table.GetColumnIndex(mrml.REPORT_COLUMN)) for row in range(3)] == [str(reports[0]), str(reports[1]), ""]

    assert mrml.run_report(table) == reports[1]  # the last row that has one
    assert mrml.run_report(table, 0) == reports[0]
    assert mrml.run_report(table, 2) is None and mrml.run_report(table, 7) is None
    reports[1].unlink()
    assert mrml.run_report(table) == reports[0]  # a deleted report is not offered
    assert mrml.run_report(table, 1) is None

    mrml.update_statistics_table(table, SUMMARY)  # a later run without report
    assert mrml.REPORT_COLUMN not in titles(table) and mrml.run_report(table) is None
    assert mrml.run_report(None) is None


def write_volume_run_output(volume, work_dir, report: bool, lesion: np.ndarray | None = None) -> dict:
    """What the CLI writes for a volume run (``work_dir/output``): the segmentation (default: all lesion), summary.csv,
    and the report."""
    output = work_dir / mrml.VOLUME_RUN_OUTPUT
    output.mkdir(parents=True)
    segmentation = write_result(volume, output, np.ones(synthetic_ct().shape, np.uint8) if lesion is None else lesion)
    row = {**SUMMARY[0], "input": str(work_dir / "CT.nrrd"), "output": str(segmentation), "report": ""}
    if report:
        row["report"] = str(output / "CT.report.png")
        Path(row["report"]).write_bytes(b"\x89PNG report")
    with open(output / mrml.SUMMARY_FILE, "w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(row))
        writer.writeheader()
        writer.writerow(row)
    return row


def test_a_volume_runs_report_is_moved_out_of_the_work_folder_without_replacing_an_earlier_one(scene, volume, tmp_path):
    volume.SetName("CT: day 3")
    reports = tmp_path / "reports"
    kept = []
    for run in ("first", "second"):
        write_volume_run_output(volume, tmp_path / run, report=True)
        _, table, row = mrml.load_volume_result(tmp_path / run, volume, report_dir=reports)
        shutil.rmtree(tmp_path / run)  # what the module does with the work folder
        kept.append(Path(row["report"]))
        assert table.GetCellText(0, table.GetColumnIndex(mrml.REPORT_COLUMN)) == row["report"]
        assert mrml.run_report(table) == kept[-1]
    assert kept == [reports / "CT_day_3.report.png", reports / "CT_day_3_2.report.png"]
    assert all(path.read_bytes() == b"\x89PNG report" for path in kept)

    write_volume_run_output(volume, tmp_path / "third", report=False)
    _, table, row = mrml.load_volume_result(tmp_path / "third", volume, report_dir=reports)
    assert row["report"] == "" and mrml.run_report(table) is None
    assert sorted(reports.iterdir()) == kept


def test_cli_options_pass_the_report_the_high_opacity_threshold_and_the_contrast_guard_rail(tmp_path):
    default = mrml.CLIOptions(python="python", model="resattunet").command([tmp_path / "a.nrrd"], tmp_path, False)
    assert "--report" not in default and not any(part.startswith("--high-opacity-threshold") for part in default)
    command = mrml.CLIOptions(python="python", model="resattunet", report=True, high_opacity_threshold_hu=-150.5).command(
        [tmp_path / "a.nrrd"], tmp_path, False)
    assert "--report" in command and "--high-opacity-threshold=-150.5" in command
    assert mrml.DEFAULT_HIGH_OPACITY_THRESHOLD_HU == DEFAULT_HIGH_OPACITY_THRESHOLD_HU
    assert not any(part.startswith("--lesion-min-contrast-hu") for part in default)
    for value, argument in ((0.0, "--lesion-min-contrast-hu=off"), (90.0, "--lesion-min-contrast-hu=90.0")):
        options = mrml.CLIOptions(python="python", model="resattunet", lesion_min_contrast_hu=value)
        assert argument in options.command([tmp_path / "a.nrrd"], tmp_path, False)


def test_read_summary_rejects_a_missing_or_previous_runs_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="wrote no summary"):
        mrml.read_summary(tmp_path / "summary.csv")
    path = tmp_path / "summary.csv"
    path.write_text("input,output,status,error\n/a.nrrd,/b.seg.nrrd,ok,\n", encoding="utf-8")
    assert mrml.read_summary(path) == [{"input": "/a.nrrd", "output": "/b.seg.nrrd", "status": "ok", "error": ""}]
    old = time.time() - 3600
    os.utime(path, (old, old))
    with pytest.raises(FileNotFoundError):
        mrml.read_summary(path, written_after=time.time())


def test_batch_report_counts_statuses():
    assert mrml.batch_report(SUMMARY) == "3 cases: 1 segmented, 1 skipped (already done), 1 failed."


def test_shipped_terminology_gives_segment_names_and_colours_in_slicers_logic():
    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    assert mrml.load_terminology(logic) == TERMINOLOGY_CONTEXT
    assert mrml.load_terminology(logic) == TERMINOLOGY_CONTEXT  # a second call keeps the loaded context
    for definition in (LESION, LUNG):
        entry = slicer.vtkSlicerTerminologyEntry()
        assert logic.DeserializeTerminologyEntry(definition.terminology, entry)
        assert logic.UpdateEntryFromLoadedTerminologies(entry, [TERMINOLOGY_CONTEXT], [])
        described = entry.GetTypeModifierObject() if entry.GetTypeModifierObject().GetCodeValue() else entry.GetTypeObject()
        assert described.GetSlicerLabel() == definition.name
        assert np.allclose(np.array(described.GetRecommendedDisplayRGBValue()) / 255, definition.color, atol=0.5 / 255)
        found = slicer.vtkSlicerTerminologyEntry()
        assert logic.FindTypeInTerminologyBy3dSlicerLabel(TERMINOLOGY_CONTEXT, definition.name, found)
        assert found.GetTypeObject().GetCodeValue() == entry.GetTypeObject().GetCodeValue()


def test_resources_are_found_beside_the_module_or_at_the_repository_top():
    assert mrml.resources_dir() in (mrml.MODULE_DIR / "Resources", mrml.MODULE_DIR.parent / "Resources")
    for name in (mrml.UI_FILE, mrml.ICON_FILE, mrml.TERMINOLOGY_FILE, mrml.REQUIREMENTS_FILE):
        assert mrml.resource_path(name).is_file()


def test_registered_models_come_from_the_registry_file(tmp_path):
    registry = tmp_path / "models.json"
    entries = [{"name": "resattunet", "file": "Models/a.safetensors", "sha256": "0" * 64, "description": "paper model", "default": True}]
    registry.write_text(json.dumps({"models": entries}), encoding="utf-8")
    assert [(entry.name, entry.file, entry.default) for entry in mrml.registered_models(registry)] == [
        ("resattunet", "Models/a.safetensors", True)]
    assert mrml.registered_models(tmp_path / "missing.json") == []


def test_small_helpers():
    assert mrml.safe_file_stem("CT chest: 2/3") == "CT_chest_2_3"
    assert mrml.safe_file_stem("../..") == "volume"
    assert mrml.optional_path(None) is None
    assert mrml.optional_path(mrml.Path()) is None  # Slicer's parameter node stores an unset path as "."
    assert mrml.optional_path("/data/w.safetensors") == mrml.Path("/data/w.safetensors")
    assert mrml.case_name({"input": "/data/dicom/p2"}) == "p2"


def test_cli_options_need_an_existing_weights_file_or_a_model(tmp_path):
    with pytest.raises(ValueError, match="Weights file not found"):
        mrml.CLIOptions(python="python", weights=tmp_path / "missing.safetensors").command([tmp_path / "a.nrrd"], tmp_path, False)
    with pytest.raises(ValueError, match="registered model or a weights file"):
        mrml.CLIOptions(python="python").command([tmp_path / "a.nrrd"], tmp_path, False)


def test_folder_run_needs_separate_existing_folders(tmp_path):
    options = mrml.CLIOptions(python="python", model="resattunet")
    with pytest.raises(ValueError, match="existing input folder"):
        mrml.folder_run_command(tmp_path / "missing", tmp_path / "out", options)
    with pytest.raises(ValueError, match="Select an output folder"):
        mrml.folder_run_command(tmp_path, None, options)
    with pytest.raises(ValueError, match="outside the input folder"):
        mrml.folder_run_command(tmp_path, tmp_path / "segmentations", options)
    command = mrml.folder_run_command(tmp_path / ".", tmp_path.parent / "elsewhere", options)
    assert "--overwrite" not in command and str(tmp_path) in command[4]


def test_volume_run_command_writes_the_volume_named_after_the_node(scene, volume, tmp_path):
    volume.SetName("CT: day 3")
    command = mrml.volume_run_command(volume, tmp_path, mrml.CLIOptions(python="python", model="resattunet", device="cpu"))
    assert (tmp_path / "CT_day_3.nrrd").is_file()
    assert command[4] == str(tmp_path / "CT_day_3.nrrd")
    assert command[command.index("--output-dir") + 1] == str(tmp_path / mrml.VOLUME_RUN_OUTPUT)
    assert "--overwrite" in command


def rigid_transform(scene, degrees: float = 20.0, shift=(15.0, -8.0, 30.0)):
    """A linear transform node: a rotation about the A axis and a shift (mm)."""
    angle = math.radians(degrees)
    matrix = np.eye(4)
    matrix[[0, 0, 2, 2], [0, 2, 0, 2]] = [math.cos(angle), math.sin(angle), -math.sin(angle), math.cos(angle)]
    matrix[:3, 3] = shift
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix))
    return transform, matrix


def world_center(volume, box: tuple[slice, slice, slice], to_world: np.ndarray) -> np.ndarray:
    """World RAS of the centre of the voxel box ``[z, y, x]`` of ``volume`` under the transform ``to_world``."""
    center_ijk = [(part.start + part.stop - 1) / 2 for part in reversed(box)] + [1.0]
    return (to_world @ OBLIQUE @ center_ijk)[:3]


def segment_world_center(segmentation, segment_id: str) -> np.ndarray:
    """World RAS of the mean voxel centre of a segment: its labelmap's voxels through the labelmap's geometry and the
    node's parent transform."""
    from vtk.util.numpy_support import vtk_to_numpy

    labelmap = segmentation.GetSegmentation().GetSegment(segment_id).GetRepresentation("Binary labelmap")
    voxels = vtk_to_numpy(labelmap.GetPointData().GetScalars()).reshape(labelmap.GetDimensions()[::-1])
    extent = labelmap.GetExtent()
    kji = np.argwhere(voxels > 0).mean(axis=0)
    ijk = [kji[2] + extent[0], kji[1] + extent[2], kji[0] + extent[4], 1.0]
    geometry = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(geometry)
    to_world = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(segmentation.GetParentTransformNode(), None, to_world)
    return np.array(to_world.TransformPoint((slicer.util.arrayFromVTKMatrix(geometry) @ ijk)[:3]))


LESION_BOX = (slice(2, 4), slice(8, 12), slice(3, 7))


@pytest.mark.parametrize("existing", [False, True], ids=["new segmentation", "chosen segmentation outside the transform"])
def test_a_volume_under_a_transform_gets_its_segments_over_the_same_anatomy(scene, volume, tmp_path, existing):
    """Regression: the reference geometry was set before the node was put under the volume's transform (transformed
    twice), and a segmentation chosen by the user was moved under the volume's transform."""
    transform, matrix = rigid_transform(scene)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    lesion = np.zeros(synthetic_ct().shape, np.uint8)
    lesion[LESION_BOX] = 1
    write_volume_run_output(volume, tmp_path, report=False, lesion=lesion)
    chosen = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my segmentation") if existing else None

    segmentation, _, _ = mrml.load_volume_result(tmp_path, volume, chosen)

    assert segmentation.GetTransformNodeID() == (None if existing else transform.GetID())
    assert np.allclose(segment_world_center(segmentation, "lesion"), world_center(volume, LESION_BOX, matrix), atol=1e-6)
    np.testing.assert_array_equal(segment_array(segmentation, "lesion", volume), lesion)
    reference = slicer.vtkOrientedImageData()
    slicer.vtkSegmentationConverter.DeserializeImageGeometry(segmentation.GetSegmentation().GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()), reference, False)
    geometry = vtk.vtkMatrix4x4()
    reference.GetImageToWorldMatrix(geometry)
    to_node = matrix if existing else np.eye(4)  # the reference geometry is in the node's own frame
    assert np.allclose(slicer.util.arrayFromVTKMatrix(geometry), to_node @ OBLIQUE, atol=1e-6)


def test_terminology_loads_once_with_the_api_of_slicer_5_6():
    """Regression: IsTerminologyContextLoaded exists from Slicer 5.10 only; 5.6 and 5.8 have GetLoadedTerminologyNames."""
    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    loads = []

    def load(path: str) -> str:
        loads.append(path)
        return logic.LoadTerminologyFromFile(path)

    slicer_5_6 = types.SimpleNamespace(GetLoadedTerminologyNames=logic.GetLoadedTerminologyNames, LoadTerminologyFromFile=load)
    assert mrml.load_terminology(slicer_5_6) == TERMINOLOGY_CONTEXT
    assert mrml.load_terminology(slicer_5_6) == TERMINOLOGY_CONTEXT
    assert loads == [str(mrml.resource_path(mrml.TERMINOLOGY_FILE))]
    assert logic.IsTerminologyContextLoaded(TERMINOLOGY_CONTEXT)


def test_missing_requirements_follow_markers_and_installed_versions():
    pytest_version = importlib.metadata.version("pytest")
    requirements = [f"pytest=={pytest_version}", "pytest<1", "no-such-package-covidlesionseg>=1", 'pytest<1; python_version < "3.0"']
    assert mrml.missing_requirements(requirements) == ["pytest<1", "no-such-package-covidlesionseg>=1"]
    assert mrml.requirement_lines(mrml.resource_path(mrml.REQUIREMENTS_FILE))  # the shipped file parses


def test_constraints_pin_the_packages_slicer_ships_at_their_installed_versions(tmp_path):
    pins = mrml.write_constraints(tmp_path / "constraints.txt").read_text(encoding="utf-8").splitlines()
    assert f"numpy=={importlib.metadata.version('numpy')}" in pins
    assert f"SimpleITK=={importlib.metadata.version('SimpleITK')}" in pins
    assert all(pin.split("==")[0] in mrml.SLICER_PACKAGES for pin in pins)


def test_warnings_for_the_status_line_leave_out_the_work_folder(tmp_path):
    work = tmp_path / "COVIDLesionSeg"
    row = dict(SUMMARY[0], warnings=f"{work / 'CT.nrrd'}: coarse in plane: the 138 pixels …; {work / 'CT.nrrd'}: converted to HU")
    assert mrml.warnings_text(row, work) == "CT.nrrd: coarse in plane: the 138 pixels …; CT.nrrd: converted to HU"
    assert mrml.warnings_text(SUMMARY[0], work) == "" and mrml.warnings_text(dict(SUMMARY[0], warnings=""), work) == ""
