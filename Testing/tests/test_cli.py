"""The CLI end to end on real files: real slices from the shared data stacked into volumes, a real checkpoint."""

import csv
import pickle
import subprocess
import sys

import cv2
import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from COVIDLesionSegLib import cli


@pytest.fixture()
def cases(tmp_path, shared_data):
    """Two real 3-slice volumes (NIfTI, NRRD), one PNG slice, and one corrupt file in an input folder."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name, volume_id, suffix in [("patientA", "coronacases_002", ".nii.gz"), ("patientB", "radiopaedia_4_85506_1", ".nrrd")]:
        slices = [cv2.imread(str(shared_data / "images" / f"{volume_id}_{pos:03d}.png"), cv2.IMREAD_UNCHANGED) for pos in range(3)]
        image = sitk.GetImageFromArray(np.stack(slices))
        image.SetSpacing((1.4, 1.4, 5.0))
        sitk.WriteImage(image, str(folder / f"{name}{suffix}"))
    cv2.imwrite(str(folder / "slice.png"), slices[0])
    (folder / "broken.mha").write_bytes(b"ObjectType = Image\nNDims = 3\n")
    return folder


def read_rows(path):
    with open(path, newline="") as stream:
        return {row["input"].rsplit("/", 1)[-1]: row for row in csv.DictReader(stream)}


def test_batch_segments_good_cases_reports_bad_one_and_resumes(tmp_path, cases, tiny_checkpoint, capsys):
    out = tmp_path / "out"
    arguments = ["segment", str(cases), "-o", str(out), "--weights", str(tiny_checkpoint), "--device", "cpu", "--progress", "none"]
    assert cli.main(arguments) == 1  # one case failed
    rows = read_rows(out / "summary.csv")
    assert {name: row["status"] for name, row in rows.items()} == {
        "broken.mha": "failed", "patientA.nii.gz": "ok", "patientB.nrrd": "ok", "slice.png": "ok"}
    assert "broken.mha" in rows["broken.mha"]["error"] and rows["broken.mha"]["output"] == ""
    assert sorted(p.name for p in out.iterdir()) == [".summary.csv.lock", "patientA.case.json", "patientA.seg.nrrd", "patientB.case.json",
                                                   "patientB.seg.nrrd", "slice.case.json", "slice.seg.nrrd", "summary.csv", "summary.json"]
    segmentation = slicerio.read_segmentation(str(out / "patientA.seg.nrrd"))
    assert segmentation["voxels"].shape[-3:] == (256, 256, 3)
    assert float(rows["patientA.nii.gz"]["lung_ml"]) >= float(rows["patientA.nii.gz"]["lesion_ml"]) >= 0
    assert "ERROR" in capsys.readouterr().err

    before = (out / "patientA.seg.nrrd").stat().st_mtime_ns
    assert cli.main(arguments) == 1
    rerun = read_rows(out / "summary.csv")
    assert rerun["patientA.nii.gz"]["status"] == "skipped"
    assert rerun["patientA.nii.gz"]["lesion_ml"] == rows["patientA.nii.gz"]["lesion_ml"]  # kept from the first run
    assert (out / "patientA.seg.nrrd").stat().st_mtime_ns == before

    assert cli.main([*arguments, "--overwrite"]) == 1
    assert read_rows(out / "summary.csv")["patientA.nii.gz"]["status"] == "ok"


def test_nifti_labelmap_output_and_parts(tmp_path, cases, tiny_checkpoint):
    out = tmp_path / "out"
    common = [str(cases / "patientA.nii.gz"), str(cases / "patientB.nrrd"), "-o", str(out), "--weights", str(tiny_checkpoint),
              "--format", "nii.gz", "--num-parts", "2", "--progress", "none"]
    assert cli.main(["segment", *common, "--part-id", "0"]) == 0
    assert cli.main(["segment", *common, "--part-id", "1"]) == 0
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "patientA.case.json", "patientA.nii.gz", "patientB.case.json", "patientB.nii.gz", "summary.part0.csv", "summary.part0.json",
        "summary.part1.csv", "summary.part1.json"]
    labels = sitk.ReadImage(str(out / "patientA.nii.gz"))
    source = sitk.ReadImage(str(cases / "patientA.nii.gz"))
    assert labels.GetSize() == source.GetSize() and labels.GetSpacing() == source.GetSpacing()


def test_progress_lines_for_a_parent_process(tmp_path, cases, tiny_checkpoint, capsys):
    assert cli.main(["segment", str(cases / "patientA.nii.gz"), "-o", str(tmp_path / "o"), "--weights", str(tiny_checkpoint),
                     "--progress", "lines"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2].startswith("PROGRESS 100.0 patientA") and lines[-1] == "OK patientA"


@pytest.mark.parametrize("payload", ["pickle", "garbage"])
def test_unsafe_or_corrupt_checkpoint_stops_before_writing_anything(tmp_path, cases, payload, capsys):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(pickle.dumps({"w": 1}) if payload == "pickle" else b"garbage")
    out = tmp_path / "out"
    assert cli.main(["segment", str(cases / "patientA.nii.gz"), "-o", str(out), "--weights", str(weights)]) == 1
    assert "model.safetensors" in capsys.readouterr().err and not list(out.iterdir())  # checked writable, left empty


def test_unknown_model_name_lists_the_registered_ones(tmp_path, cases, capsys):
    assert cli.main(["segment", str(cases / "patientA.nii.gz"), "-o", str(tmp_path / "o"), "--model", "nope"]) == 1
    assert "neither a checkpoint file nor a registered model" in capsys.readouterr().err


def test_guard_rails_given_on_the_command_line_are_used_and_recorded(tmp_path, cases, tiny_checkpoint, capsys):
    import json

    out = tmp_path / "out"
    arguments = ["segment", str(cases / "patientA.nii.gz"), "-o", str(out), "--weights", str(tiny_checkpoint), "--device", "cpu",
                 "--progress", "none"]
    assert cli.main([*arguments, "--lesion-threshold", "0.8", "--lesion-min-hu", "off", "--lesion-min-ml", "0",
                     "--lesion-min-contrast-hu", "40"]) == 0
    recorded = json.loads((out / "summary.json").read_text(encoding="utf-8"))["parameters"]["guard_rails"]
    assert (recorded["lesion_threshold"], recorded["lesion_min_hu"], recorded["lesion_min_ml"]) == (0.8, None, 0.0)
    assert recorded["lesion_min_contrast_hu"] == 40.0
    assert cli.main([*arguments, "--overwrite", "--lesion-min-contrast-hu", "off"]) == 0
    recorded = json.loads((out / "summary.json").read_text(encoding="utf-8"))["parameters"]["guard_rails"]
    assert recorded["lesion_min_contrast_hu"] is None and recorded["lesion_threshold"] == 0.6  # the others at their defaults
    assert cli.main([*arguments, "--overwrite", "--lesion-threshold", "1.5"]) == 2
    assert "ERROR guard rails: lesion_threshold" in capsys.readouterr().err


def test_usage_errors(tmp_path):
    with pytest.raises(SystemExit):
        cli.main(["segment", "x", "-o", str(tmp_path), "--num-parts", "2", "--part-id", "2"])
    with pytest.raises(SystemExit):
        cli.main(["segment", "x", "-o", str(tmp_path), "--batch-size", "0"])


def test_cli_io_and_measure_import_without_torch():
    """torch (about 0.5 GiB and most of the start-up) is imported where a network is loaded, not to parse arguments,
    read or write images, or run ``covidlesionseg measure``."""
    code = "import sys; from COVIDLesionSegLib import cli, io, measure; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_the_first_case_read_while_the_model_loads_keeps_its_warnings_and_is_taken_once(tmp_path, tiny_checkpoint):
    folder = tmp_path / "in"
    folder.mkdir()
    chest = np.full((3, 64, 64), -1000, np.int16)
    chest[:, 8:56, 8:56] = 40
    chest[:, 16:48, 12:30] = chest[:, 16:48, 34:52] = -850
    for name, values in [("a_unsigned.nrrd", (chest + 1024).astype(np.uint16)), ("b_hu.nrrd", chest)]:
        sitk.WriteImage(sitk.GetImageFromArray(values), str(folder / name))
    out = tmp_path / "out"
    arguments = ["segment", str(folder), "-o", str(out), "--weights", str(tiny_checkpoint), "--device", "cpu", "--progress", "none"]
    assert cli.main(arguments) == 0
    rows = read_rows(out / "summary.csv")
    assert "converted to HU" in rows["a_unsigned.nrrd"]["warnings"] and "converted to HU" not in rows["b_hu.nrrd"]["warnings"]
    assert all("coarse in plane: the 64 pixels" in row["warnings"] for row in rows.values())  # 64² slices: coarser than training
    assert rows["a_unsigned.nrrd"]["lung_ml"] == rows["b_hu.nrrd"]["lung_ml"]  # the same CT once converted

    first, second = cli.find_cases([folder])
    with cli.ThreadPoolExecutor(max_workers=1) as pool:
        prefetched = cli.PrefetchedRead(pool, first)
        notes = []
        assert prefetched.take(second, notes) is None  # another case's image is never handed over
        image = prefetched.take(first, notes)
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(image), chest)
        assert len(notes) == 1 and "converted to HU" in notes[0]
        assert prefetched.take(first, notes) is None and prefetched.future is None  # taken once, then let go
