"""The Slicer module's child-process path end to end, as the Logic runs it: a scene volume (or a folder of cases)
→ the core CLI in a child process (``python -m COVIDLesionSegLib.cli``, progress lines streamed) → scene nodes.
Real MRML scene (slicer-core), real CLI, real files; the model is tiny and saturated, so the expected result is exact."""

from __future__ import annotations

import csv
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import SimpleITK as sitk
from slicer_support import add_volume, new_scene, save_saturated_checkpoint, segment_array, slicer, synthetic_ct

import COVIDLesionSegMRML as mrml
from COVIDLesionSegLib.child_process import ChildProcess, child_environment
from COVIDLesionSegLib.report import PNG_TEXT_KEY
from COVIDLesionSegLib.segments import LESION, LUNG
from COVIDLesionSegLib.statistics import MEASURES

GEOMETRY = np.array([[-0.7, 0.0, 0.0, 20.0], [0.0, -0.8, 0.0, -15.0], [0.0, 0.0, 2.5, 100.0], [0.0, 0.0, 0.0, 1.0]])
VOXEL_ML = 0.7 * 0.8 * 2.5 / 1000
# What Slicer's launcher PythonSlicer does: start the real interpreter as its own child and wait for it.
LAUNCHER = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_saturated_checkpoint(tmp_path_factory.mktemp("weights") / "saturated.safetensors")


def cli_options(weights, include_lung: bool = True, **options) -> mrml.CLIOptions:
    return mrml.CLIOptions(python=sys.executable, weights=weights, device="cpu", batch_size=4, include_lung=include_lung, **options)


def summary_csv(folder) -> list[dict[str, str]]:
    """summary.csv as the CLI wrote it, read without the module's code."""
    with open(folder / mrml.SUMMARY_FILE, newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


def report_measures(path) -> dict[str, str]:
    """The measures the visual report shows, from the text the CLI stores in the PNG."""
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG"
        return json.loads(image.text[PNG_TEXT_KEY])["measures"]


def assert_table_shows_the_summary_text(table, written: list[dict[str, str]]):
    """Each row of the statistics table has, for every measure, the number (numeric columns) or the very text of
    summary.csv for the same case."""
    assert table.GetNumberOfRows() == len(written)
    for index, row in enumerate(written):
        for measure in MEASURES:
            column = table.GetTable().GetColumnByName(mrml.measure_title(measure.name))
            if column.IsA("vtkDoubleArray"):
                expected = float(row[measure.name]) if row[measure.name] else math.nan
                np.testing.assert_equal(column.GetValue(index), expected, err_msg=f"{index} {measure.name}")
            else:
                assert column.GetValue(index) == row[measure.name], (index, measure.name)


def run(command: list[str]):
    progress, log = [], []
    returncode = ChildProcess(command, env=child_environment("cpu")).wait(progress.append, log.append)
    return returncode, progress, log


def column(table, title: str, row: int = 0) -> str:
    return table.GetCellText(row, table.GetColumnIndex(title))


def number(table, measure: str, row: int = 0) -> float:
    return table.GetTable().GetValue(row, table.GetColumnIndex(mrml.measure_title(measure))).ToDouble()


def test_scene_volume_is_segmented_into_a_segmentation_node_and_a_statistics_table(tmp_path, weights):
    scene = new_scene()
    ct = synthetic_ct()
    volume = add_volume(scene, ct, GEOMETRY, name="Chest CT")
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = hierarchy.CreateStudyItem(hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "Patient"), "CT study")
    hierarchy.CreateItem(study, volume)

    returncode, progress, log = run(mrml.volume_run_command(volume, tmp_path, cli_options(weights)))

    assert returncode == 0, log
    assert progress and progress[-1].percent == 100 and "slice" in progress[-1].message
    segmentation, table, row = mrml.load_volume_result(tmp_path, volume)
    assert segmentation.GetScene() is scene and segmentation.GetName() == f"Chest CT {LESION.name}"
    assert sorted(segmentation.GetSegmentation().GetSegmentIDs()) == ["lesion", "lung"]
    for definition in (LESION, LUNG):
        segment = segmentation.GetSegmentation().GetSegment(definition.channel)
        assert (segment.GetName(), segment.GetTerminology()) == (definition.name, definition.terminology)
        np.testing.assert_array_equal(segment_array(segmentation, definition.channel, volume), np.ones_like(ct, dtype=np.uint8))
    assert segmentation.GetNodeReferenceID(segmentation.GetReferenceImageGeometryReferenceRole()) == volume.GetID()
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(segmentation)) == study
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(table)) == study

    assert table.GetName() == mrml.STATISTICS_TABLE_NAME and table.GetNumberOfRows() == 1
    assert column(table, "Case") == "Chest CT" and column(table, "Status") == "ok"
    assert number(table, "lesion_ml") == pytest.approx(ct.size * VOXEL_ML, abs=1e-3)
    assert number(table, "lesion_slices") == ct.shape[0]
    assert number(table, "lung_ml") == pytest.approx(ct.size * VOXEL_ML, abs=1e-3)
    assert number(table, "percent_opacity") == pytest.approx(100.0)
    assert float(row["lesion_ml"]) == number(table, "lesion_ml")


def test_a_rerun_without_lung_updates_the_same_nodes(tmp_path, weights):
    scene = new_scene()
    volume = add_volume(scene, synthetic_ct(), GEOMETRY)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my result")
    segmentation.GetSegmentation().AddEmptySegment("note", "Radiologist's note", [0.0, 0.0, 1.0])
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", "my statistics")

    returncode, _, log = run(mrml.volume_run_command(volume, tmp_path, cli_options(weights, include_lung=False)))

    assert returncode == 0, log
    assert mrml.load_volume_result(tmp_path, volume, segmentation, table, include_lung=False)[:2] == (segmentation, table)
    assert sorted(segmentation.GetSegmentation().GetSegmentIDs()) == ["lesion", "note"]
    assert table.GetColumnIndex(mrml.measure_title("lung_ml")) == -1 and table.GetNumberOfRows() == 1
    assert table.GetColumnIndex(mrml.measure_title("lesion_ml")) > 0


def test_batch_reports_each_failure_writes_the_csv_and_resumes(tmp_path, weights):
    cases = tmp_path / "cases"
    cases.mkdir()
    for name, shape in (("p1", (5, 20, 16)), ("p2", (3, 24, 20))):
        image = sitk.GetImageFromArray(synthetic_ct(shape))
        image.SetSpacing((0.7, 0.8, 2.5))
        sitk.WriteImage(image, str(cases / f"{name}.nrrd"))
    (cases / "p3.nrrd").write_text("not an image")
    output = tmp_path / "segmentations"
    scene = new_scene()

    started = time.time()
    returncode, progress, log = run(mrml.folder_run_command(cases, output, cli_options(weights)))

    assert returncode == 1  # a case failed; the batch went on
    assert [update.message for update in progress if update.message.endswith("slice 3/3")] == ["p2: slice 3/3"]
    table, rows = mrml.load_folder_results(output, scene, written_after=started)
    assert {mrml.case_name(row): row["status"] for row in rows} == {"p1.nrrd": "ok", "p2.nrrd": "ok", "p3.nrrd": "failed"}
    assert [table.GetCellText(index, 0) for index in range(table.GetNumberOfRows())] == [mrml.case_name(row) for row in rows]
    failed = next(row for row in rows if row["status"] == "failed")
    assert "p3.nrrd" in failed["error"] and any("p3.nrrd" in line for line in log)
    assert number(table, "lesion_ml") == pytest.approx(5 * 20 * 16 * VOXEL_ML, abs=1e-3)
    assert mrml.batch_report(rows) == "3 cases: 2 segmented, 0 skipped (already done), 1 failed."

    # A batch output loads into Slicer with the case volume as reference geometry.
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "p1")
    reader = slicer.vtkMRMLVolumeArchetypeStorageNode()
    reader.SetFileName(str(cases / "p1.nrrd"))
    assert reader.ReadData(volume)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    mrml.load_segmentation(output / "p1.seg.nrrd", volume, segmentation)
    assert segment_array(segmentation, "lesion", volume).sum() == 5 * 20 * 16

    started = time.time()
    returncode, _, _ = run(mrml.folder_run_command(cases, output, cli_options(weights)))

    assert returncode == 1
    table, rerun = mrml.load_folder_results(output, scene, table, written_after=started)
    assert [row["status"] for row in rerun] == ["skipped", "skipped", "failed"]
    assert [row["lesion_ml"] for row in rerun] == [row["lesion_ml"] for row in rows]  # earlier results are kept
    assert mrml.batch_report(rerun) == "3 cases: 0 segmented, 2 skipped (already done), 1 failed."


def test_a_cli_that_cannot_start_writes_no_summary(tmp_path, weights):
    volume = add_volume(new_scene(), synthetic_ct(), GEOMETRY)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x80not a checkpoint")
    returncode, _, log = run(mrml.volume_run_command(volume, tmp_path / "work", cli_options(broken)))
    assert returncode != 0 and any("ERROR model" in line for line in log)
    with pytest.raises(FileNotFoundError):
        mrml.load_volume_result(tmp_path / "work", volume)


def test_cancel_ends_the_launcher_and_the_cli_it_started(tmp_path, weights):
    volume = add_volume(new_scene(), synthetic_ct(), GEOMETRY)
    command = mrml.volume_run_command(volume, tmp_path, cli_options(weights))
    process = ChildProcess([sys.executable, "-c", LAUNCHER, *command], env=child_environment("cpu"))
    deadline = time.monotonic() + 20
    while not (cli := psutil.Process(process.pid).children()):
        assert time.monotonic() < deadline, "the launcher did not start the CLI"
        time.sleep(0.005)
    cli_pid = cli[0].pid

    process.cancel()

    assert process.cancelled
    for pid in (process.pid, cli_pid):
        if psutil.pid_exists(pid):
            assert psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert process.wait() != 0
    assert not (tmp_path / mrml.VOLUME_RUN_OUTPUT / mrml.SUMMARY_FILE).exists()
    with pytest.raises(FileNotFoundError):
        mrml.load_volume_result(tmp_path, volume)


def test_a_volume_run_with_the_visual_report_keeps_its_png_and_shows_the_summary_text(tmp_path, weights):
    scene = new_scene()
    ct = synthetic_ct()
    volume = add_volume(scene, ct, GEOMETRY, name="Chest CT")
    work, reports = tmp_path / "work", tmp_path / "reports"
    options = cli_options(weights, report=True, high_opacity_threshold_hu=-400.0)

    returncode, _, log = run(mrml.volume_run_command(volume, work, options))

    assert returncode == 0, log
    written = summary_csv(work / mrml.VOLUME_RUN_OUTPUT)
    description = json.loads((work / mrml.VOLUME_RUN_OUTPUT / "summary.json").read_text(encoding="utf-8"))
    assert description["parameters"]["high_opacity_threshold_hu"] == -400.0
    _, table, row = mrml.load_volume_result(work, volume, report_dir=reports)
    shutil.rmtree(work)  # as the module does: the report outlives the work folder

    report = mrml.run_report(table)
    assert report == reports / "Chest_CT.report.png" and report.is_file()
    assert row["report"] == str(report) == column(table, mrml.REPORT_COLUMN)
    assert_table_shows_the_summary_text(table, written)
    assert report_measures(report) == {measure.name: written[0][measure.name] for measure in MEASURES}
    # Every voxel is lesion; at or above -400 HU are the body (40) and the lesion (-300), not the lungs (-850) or air.
    assert float(written[0]["high_opacity_ml"]) == pytest.approx(np.count_nonzero(ct >= -400) * VOXEL_ML, abs=1e-3)


def test_a_batch_with_the_visual_report_lists_every_cases_png_and_shows_the_summary_text(tmp_path, weights):
    cases = tmp_path / "cases"
    cases.mkdir()
    for name, shape in (("p1", (4, 20, 16)), ("p2", (3, 24, 20))):
        image = sitk.GetImageFromArray(synthetic_ct(shape))
        image.SetSpacing((0.7, 0.8, 2.5))
        sitk.WriteImage(image, str(cases / f"{name}.nrrd"))
    output = tmp_path / "segmentations"

    started = time.time()
    returncode, _, log = run(mrml.folder_run_command(cases, output, cli_options(weights, report=True)))

    assert returncode == 0, log
    table, rows = mrml.load_folder_results(output, new_scene(), written_after=started)
    written = summary_csv(output)
    assert [Path(row["report"]) for row in written] == [output / "p1.report.png", output / "p2.report.png"]
    assert [table.GetCellText(index, table.GetColumnIndex(mrml.REPORT_COLUMN)) for index in range(2)] == [row["report"] for row in written]
    assert_table_shows_the_summary_text(table, written)
    for row in written:
        assert report_measures(row["report"]) == {measure.name: row[measure.name] for measure in MEASURES}
    assert mrml.run_report(table) == output / "p2.report.png"  # the batch's last case
    assert mrml.run_report(table, 0) == output / "p1.report.png"
