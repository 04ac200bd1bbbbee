"""The reader's edits count: ``covidlesionseg measure CT SEG`` and the module's recompute (the same CLI in a child process,
fed from the scene's current segments) measure an edited segmentation with the statistics code of ``segment``.
Real MRML scene (slicer-core), real CLI, real files."""

from __future__ import annotations

import csv
import sys

import numpy as np
import pytest
from slicer_support import add_volume, new_scene, save_saturated_checkpoint, slicer, synthetic_ct, update_segment

import COVIDLesionSegMRML as mrml
from COVIDLesionSegLib import cli, io
from COVIDLesionSegLib.child_process import ChildProcess, child_environment
from COVIDLesionSegLib.measure import measure_files
from COVIDLesionSegLib.statistics import MEASURES

GEOMETRY = np.array([[-0.7, 0.0, 0.0, 20.0], [0.0, -0.8, 0.0, -15.0], [0.0, 0.0, 2.5, 100.0], [0.0, 0.0, 0.0, 1.0]])
VOXEL_ML = 0.7 * 0.8 * 2.5 / 1000
MEASURE_NAMES = [measure.name for measure in MEASURES]


def read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


def run_child(command: list[str]) -> None:
    log = []
    assert ChildProcess(command, env=child_environment("cpu")).wait(None, log.append) == 0, log


def test_measure_of_an_unedited_segmentation_repeats_the_segment_runs_numbers(tmp_path):
    """segment → summary.csv; measure on the same CT and its .seg.nrrd → the same text for every measure."""
    scene = new_scene()
    ct_path = mrml.write_volume(add_volume(scene, synthetic_ct(), GEOMETRY), tmp_path / "ct.nrrd")
    weights = save_saturated_checkpoint(tmp_path / "saturated.safetensors")
    assert cli.main(["segment", str(ct_path), "--output-dir", str(tmp_path / "out"), "--weights", str(weights),
                     "--device", "cpu", "--progress", "none"]) == 0
    summary = read_csv(tmp_path / "out" / "summary.csv")[0]

    assert cli.main(["measure", str(ct_path), summary["output"], "--output", str(tmp_path / "measures.csv")]) == 0

    measured = read_csv(tmp_path / "measures.csv")[0]
    assert {name: measured[name] for name in MEASURE_NAMES} == {name: summary[name] for name in MEASURE_NAMES}
    assert (measured["input"], measured["segmentation"]) == (str(ct_path), summary["output"])


def test_measure_without_a_lung_segment_leaves_the_lung_measures_unavailable_and_reports_a_missing_file(tmp_path, capsys):
    volume = add_volume(new_scene(), synthetic_ct(), GEOMETRY)
    ct_path = mrml.write_volume(volume, tmp_path / "ct.nrrd")
    lesion_only = io.write_segmentation(tmp_path / "lesion.seg.nrrd", masks_on_file_grid(volume, tmp_path, np.ones(synthetic_ct().shape)))
    assert cli.main(["measure", str(ct_path), str(tmp_path / "missing.seg.nrrd")]) == 1
    assert "no such file" in capsys.readouterr().err

    assert cli.main(["measure", str(ct_path), str(lesion_only)]) == 0

    row = list(csv.DictReader(capsys.readouterr().out.splitlines()))[0]
    assert float(row["lesion_ml"]) == pytest.approx(synthetic_ct().size * VOXEL_ML, abs=1e-3)
    assert row["percent_opacity"] == row["lung_ml"] == row["severity"] == ""


def test_an_edited_lesion_is_remeasured_by_the_module_and_by_the_cli_with_the_same_numbers(tmp_path):
    scene = new_scene()
    ct = synthetic_ct()
    volume = add_volume(scene, ct, GEOMETRY, name="Chest CT")
    lung = np.zeros(ct.shape, np.uint8)
    lung[:, 4:16, 2:14] = 1
    lesion = np.zeros(ct.shape, np.uint8)
    lesion[1:5, 8:12, 3:7] = 1  # 64 voxels, inside the lung
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Chest CT lesion")
    (tmp_path / "model").mkdir()
    seg_file = io.write_segmentation(tmp_path / "model" / "ct.seg.nrrd", masks_on_file_grid(volume, tmp_path / "model", lesion, lung))
    mrml.load_segmentation(seg_file, volume, segmentation)
    before = measure_in_module(volume, segmentation, tmp_path / "before")

    edited = lesion.copy()
    edited[1:3] = 0  # the reader erases the lesion from two of its four slices
    update_segment(segmentation, "lesion", edited, volume)
    table, after = measure_in_module(volume, segmentation, tmp_path / "after", table=before[0])

    lung_ml = lung.sum() * VOXEL_ML
    assert float(before[1]["percent_opacity"]) == pytest.approx(100 * 64 * VOXEL_ML / lung_ml, abs=0.005)
    assert float(after["percent_opacity"]) - float(before[1]["percent_opacity"]) == pytest.approx(-100 * 32 * VOXEL_ML / lung_ml, abs=0.01)
    assert float(after["lesion_ml"]) == pytest.approx(32 * VOXEL_ML, abs=5e-4) and after["lesion_slices"] == "2"
    assert table.GetNumberOfRows() == 1 and table.GetCellText(0, 0) == "Chest CT"
    assert table.GetCellText(0, table.GetColumnIndex(mrml.SOURCE_COLUMN)).startswith("segments of 'Chest CT lesion' as edited, ")
    percent_column = table.GetTable().GetColumnByName(mrml.measure_title("percent_opacity"))
    assert percent_column.IsA("vtkDoubleArray") and percent_column.GetValue(0) == float(after["percent_opacity"])

    # The reader saves the edited segmentation from Slicer and measures it with the CLI: the same numbers.
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(tmp_path / "edited.seg.nrrd"))
    assert storage.WriteData(segmentation)
    ct_file = next((tmp_path / "after").glob("Chest_CT.nrrd"))
    from_file = measure_files(ct_file, tmp_path / "edited.seg.nrrd")
    assert {name: from_file[name] for name in MEASURE_NAMES} == {name: after[name] for name in MEASURE_NAMES}


def masks_on_file_grid(volume, folder, lesion, lung=None) -> dict:
    """``lesion`` (and ``lung``) as images on the grid of the volume's file, as the CLI writes them."""
    import SimpleITK as sitk

    image = io.read_image(mrml.write_volume(volume, folder / "ct.nrrd"))
    masks = {}
    for channel, mask in (("lesion", lesion), ("lung", lung)):
        if mask is not None:
            masks[channel] = sitk.GetImageFromArray(np.asarray(mask, np.uint8))
            masks[channel].CopyInformation(image)
    return masks


def measure_in_module(volume, segmentation, work_dir, table=None):
    """What the module's Recompute button does: the CLI's measure on the current segments in a child process, then the table."""
    run_child(mrml.measure_run_command(volume, segmentation, work_dir, sys.executable))
    return mrml.load_measure_result(work_dir, volume, segmentation, table)
