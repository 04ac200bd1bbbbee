"""Fault injection: hostile inputs and faults (issue 10), each asserting the exit status or row status, the message,
the files left, and that earlier results are untouched. Fault classes and what the user sees: Testing/README.md.

Most cases run ``cli.segment_cases`` with :class:`ThresholdPredictor`, a model stand-in that marks lung and lesion by
HU thresholds, so every volume is known exactly; ``cli.main`` runs with the real tiny checkpoint where the command
line itself is under test."""

from __future__ import annotations

import csv
import errno
import gzip
import json
import math
import multiprocessing
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk

from COVIDLesionSegLib import cli, io
from COVIDLesionSegLib.checkpoints import sha256_of, sweep_stale_temporaries
from COVIDLesionSegLib.predictor import GuardRails, SegmentationResult
from COVIDLesionSegLib.preprocessing import PreprocessingConfig, is_hounsfield
from COVIDLesionSegLib.statistics import VoxelGrid, lesion_statistics

SPACING = (0.8, 0.8, 2.5)
VOXEL_ML = math.prod(SPACING) / 1000


def chest(depth: int = 8) -> np.ndarray:
    """A synthetic chest CT in HU ``[z, y, x]``: air, body, two lungs (−850) and a lesion (−500) in one lung."""
    ct = np.full((depth, 48, 48), -1000, np.int16)
    ct[:, 6:42, 4:44] = 40
    ct[:, 12:36, 8:22] = -850
    ct[:, 12:36, 26:40] = -850
    ct[2:5, 16:22, 10:16] = -500
    return ct


LUNG_ML = 2 * 8 * 24 * 14 * VOXEL_ML
LESION_ML = 3 * 6 * 6 * VOXEL_ML


def image_of(array: np.ndarray, spacing=SPACING, direction=None) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    if direction is not None:
        image.SetDirection(direction)
    return image


def write(path: Path, image: sitk.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


class ThresholdPredictor:
    """Stands in for ``Predictor``: lung = −900…−400 HU, lesion = −600…−400 HU, with the real statistics."""

    name, sha256, channels = "threshold", "0" * 64, ["lesion", "lung"]
    preprocessing = PreprocessingConfig()
    guard_rails = GuardRails()  # recorded in summary.json like the real predictor's
    backend, device = SimpleNamespace(name="threshold"), "cpu"  # likewise

    def segment_image(self, image, on_progress=None, high_opacity_threshold_hu=-200.0, **_):
        oriented = io.to_radiological(image)
        ct = sitk.GetArrayFromImage(oriented)
        masks = {"lesion": ((ct >= -600) & (ct <= -400)).astype(np.uint8), "lung": ((ct >= -900) & (ct <= -400)).astype(np.uint8)}
        hu = ct if is_hounsfield(ct, self.preprocessing) else None
        statistics = lesion_statistics(masks["lesion"], VoxelGrid.of_image(oriented), masks["lung"], hu, high_opacity_threshold_hu)
        return SegmentationResult({c: io.from_radiological(m, image) for c, m in masks.items()}, statistics)


def run(inputs, out: Path, **options) -> dict[str, dict]:
    """``segment_cases`` with the threshold model; returns the rows of summary.csv by input file name."""
    cli.segment_cases(cli.find_cases(inputs, exclude=out), ThresholdPredictor(), out, progress="none", **options)
    return summary(out)


def summary(out: Path) -> dict[str, dict]:
    with open(out / "summary.csv", newline="", encoding="utf-8") as stream:
        return {Path(row["input"]).name: row for row in csv.DictReader(stream)}


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every non-hidden file of ``folder`` except summary.csv, by name, with its bytes."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.name != "summary.csv"}


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock"))


# ---------------------------------------------------------------- input integrity: never a silent wrong result


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_truncated_nifti_is_refused_not_zero_filled(tmp_path, suffix):
    good = write(tmp_path / "in" / f"good{suffix}", image_of(chest()))
    cut = tmp_path / "in" / f"cut{suffix}"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    out = tmp_path / "out"
    rows = run([good, cut], out)
    assert rows[good.name]["status"] == "ok" and float(rows[good.name]["lung_ml"]) == pytest.approx(LUNG_ML, abs=1e-3)
    assert rows[cut.name]["status"] == "failed" and rows[cut.name]["output"] == ""
    assert rows[cut.name]["error"].startswith(str(cut)) and "truncated" in rows[cut.name]["error"]
    assert not (out / "cut.seg.nrrd").exists() and not (out / "cut.case.json").exists()


def test_a_truncated_first_case_read_while_the_model_loads_writes_nothing(tmp_path, tiny_checkpoint, capsys):
    """The CLI reads its first case in a thread while the model loads: a truncated .nii.gz still fails its case with
    the file named, and none of its outputs (report, probability map, segmentation, record) is written."""
    good = write(tmp_path / "good.nii.gz", image_of(chest()))
    cut = tmp_path / "in" / "cut.nii.gz"
    cut.parent.mkdir()
    cut.write_bytes(good.read_bytes()[: good.stat().st_size * 3 // 4])
    out = tmp_path / "out"
    command = ["segment", str(cut), "-o", str(out), "--weights", str(tiny_checkpoint), "--device", "cpu", "--progress", "none",
               "--report", "--probabilities"]
    assert cli.main(command) == 1
    assert f"ERROR {cut}: truncated" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["summary.csv", "summary.json"]
    assert summary(out)[cut.name]["status"] == "failed"


def test_corrupt_compressed_nifti_is_refused_and_a_multi_member_one_is_read(tmp_path):
    """Flipped bytes inside a .nii.gz (which ITK may read without a word, zero-filling or garbling voxels) fail on the
    gzip CRC; a file of two gzip members (what concatenating or some streaming writers make) is one valid NIfTI."""
    good = write(tmp_path / "in" / "good.nii.gz", image_of(chest()))
    data = bytearray(good.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(byte ^ 0x5A for byte in data[middle : middle + 64])
    corrupt = tmp_path / "in" / "corrupt.nii.gz"
    corrupt.write_bytes(bytes(data))
    content = gzip.decompress(good.read_bytes())
    two_members = tmp_path / "in" / "two-members.nii.gz"
    two_members.write_bytes(gzip.compress(content[:1000]) + gzip.compress(content[1000:]))
    rows = run([corrupt, two_members], tmp_path / "out")
    assert rows[corrupt.name]["status"] == "failed" and "corrupt compressed data" in rows[corrupt.name]["error"]
    assert rows[two_members.name]["status"] == "ok" and float(rows[two_members.name]["lung_ml"]) == pytest.approx(LUNG_ML, abs=1e-3)


@pytest.mark.parametrize(("spacing", "shown"), [(0.0, "(0.0, 0.8, 2.5)"), (float("nan"), "(nan, 0.8, 2.5)"), (-0.8, "(-0.8, 0.8, 2.5)")])
def test_nifti_pixdim_zero_negative_or_nan_is_refused(tmp_path, spacing, shown):
    path = write(tmp_path / "p.nii", image_of(chest()))
    header = bytearray(path.read_bytes())
    header[80:84] = struct.pack("<f", spacing)  # pixdim[1]
    path.write_bytes(bytes(header))
    with pytest.raises(io.InputError, match=r"voxel spacing \(pixdim\)") as error:
        io.read_image(path)
    assert str(error.value).startswith(str(path)) and shown in str(error.value)


def test_sheared_nifti_sform_is_refused(tmp_path):
    path = write(tmp_path / "s.nii", image_of(chest()))
    header = bytearray(path.read_bytes())
    srow_y = list(struct.unpack("<4f", header[296:312]))
    srow_y[2] = 0.5 * SPACING[2]  # the z axis leans 30° into y
    header[296:312] = struct.pack("<4f", *srow_y)
    path.write_bytes(bytes(header))
    with pytest.raises(io.InputError, match="sheared sform"):
        io.read_image(path)


def test_non_orthogonal_direction_gives_the_exact_volume(tmp_path):
    """The z axis leans 30°: each voxel holds cos 30° of its spacing product; before, volumes came out 15 % too large."""
    cos, sin = math.cos(math.radians(30)), math.sin(math.radians(30))
    path = write(tmp_path / "in" / "sheared.nrrd", image_of(chest(), direction=(1, 0, 0, 0, 1, sin, 0, 0, cos)))
    row = run([path], tmp_path / "out")["sheared.nrrd"]
    assert row["status"] == "ok"
    assert float(row["lung_ml"]) == pytest.approx(LUNG_ML * cos, abs=1e-3)
    assert float(row["lesion_ml"]) == pytest.approx(LESION_ML * cos, abs=1e-3)
    assert VoxelGrid((1, 2, 3), direction=(1, 0, 0, 0, 1, sin, 0, 0, cos)).voxel_ml == pytest.approx(6e-3 * cos)


@pytest.mark.parametrize(("name", "header"), [
    ("nan.nrrd", "NRRD0004\ntype: short\ndimension: 3\nsizes: 48 48 8\nspacings: 0.8 nan 2.5\nencoding: raw\nendian: little\n\n"),
    ("inf.mha", "ObjectType = Image\nNDims = 3\nDimSize = 48 48 8\nElementSpacing = 0.8 inf 2.5\nElementType = MET_SHORT\n"
                "ElementDataFile = LOCAL\n"),
])
def test_header_spacing_that_is_not_a_number_is_refused(tmp_path, name, header):
    """ITK reads a NaN spacing as 1 mm without a word."""
    path = tmp_path / name
    path.write_bytes(header.encode() + chest().astype("<i2").tobytes())
    with pytest.raises(io.InputError, match="voxel spacing is not a number in the header"):
        io.read_image(path)


def test_unsigned_ct_plus_1024_is_converted_to_hu_with_a_warning(tmp_path):
    hu = write(tmp_path / "in" / "hu.nrrd", image_of(chest()))
    unsigned = write(tmp_path / "in" / "unsigned.nrrd", image_of((chest() + 1024).astype(np.uint16)))
    rows = run([hu, unsigned], tmp_path / "out")
    assert rows["unsigned.nrrd"]["status"] == "ok" and rows["unsigned.nrrd"]["input_is_hu"] == "yes"
    for measure in ("lung_ml", "lesion_ml", "percent_opacity", "lung_mean_hu"):
        assert rows["unsigned.nrrd"][measure] == rows["hu.nrrd"][measure]
    assert float(rows["unsigned.nrrd"]["lung_ml"]) == pytest.approx(LUNG_ML, abs=1e-3)
    assert "HU + 1024; converted to HU" in rows["unsigned.nrrd"]["warnings"] and rows["hu.nrrd"]["warnings"] == ""
    np.testing.assert_array_equal(sitk.GetArrayFromImage(io.read_image(unsigned)), chest())


def test_unsigned_data_that_is_neither_8_bit_nor_ct_is_refused(tmp_path):
    path = write(tmp_path / "u.nrrd", image_of(np.random.default_rng(0).integers(2000, 4000, (4, 48, 48)).astype(np.uint16)))
    with pytest.raises(io.InputError, match=r"neither 8-bit .* nor CT stored as HU \+ 1024"):
        io.read_image(path)


def test_implausible_volumes_get_warnings_in_the_log_and_the_csv(tmp_path, caplog):
    no_body = np.full((8, 48, 48), -1000, np.int16)
    no_body[:, 10:20, 10:20] = -850
    tiny = chest()[:1, 20:28, 20:28]
    paths = [write(tmp_path / "in" / "nobody.nrrd", image_of(no_body)), write(tmp_path / "in" / "tiny.nrrd", image_of(tiny))]
    rows = run(paths, tmp_path / "out")
    assert "almost no body" in rows["nobody.nrrd"]["warnings"] and "only 64 voxels" in rows["tiny.nrrd"]["warnings"]
    assert {row["status"] for row in rows.values()} == {"ok"}
    assert "almost no body" in caplog.text


def write_dicom(folder: Path, ct: np.ndarray, z_mm: list[float]) -> list[Path]:
    """One DICOM file per slice of ``ct``, slice ``k`` at ``z_mm[k]`` (HU through rescale 1/0)."""
    folder.mkdir(parents=True)
    writer, files = sitk.ImageFileWriter(), []
    writer.KeepOriginalImageUIDOn()
    for index, z in enumerate(z_mm):
        piece = image_of(ct[index][None])[:, :, 0]
        for tag, value in [("0020|000e", "1.2.826.0.1.3680043.2.1125.7"), ("0008|0060", "CT"), ("0020|0037", "1\\0\\0\\0\\1\\0"),
                           ("0020|0032", f"0\\0\\{z:.3f}"), ("0020|0013", str(index + 1)), ("0028|1052", "0"), ("0028|1053", "1"),
                           ("0008|0018", f"1.2.826.0.1.3680043.2.1125.7.{index + 1}")]:
            piece.SetMetaData(tag, value)
        files.append(folder / f"slice{index:03d}.dcm")
        writer.SetFileName(str(files[-1]))
        with io.preserved_locale():
            writer.Execute(piece)
    return files


def test_complete_dicom_series_is_read(tmp_path):
    write_dicom(tmp_path / "s", chest(12), [5.0 * k for k in range(12)])
    image = io.read_image(tmp_path / "s")
    assert image.GetSize() == (48, 48, 12) and image.GetSpacing()[2] == pytest.approx(5.0)


def corrupt_slice(files):
    files[5].write_bytes(files[5].read_bytes()[:300])


def missing_slice(files):
    files[5].unlink()


def duplicate_slice(files):
    shutil.copy(files[4], files[4].with_name("slice004-copy.dcm"))


DICOM_FAULTS = {
    "corrupt slice": (corrupt_slice, [5.0 * k for k in range(12)],
                      r"1 DICOM file\(s\) unreadable or not part of the series \(slice005.dcm\)"),
    "missing slice": (missing_slice, [5.0 * k for k in range(12)],
                      r"slice gap of 10.00 mm between slice004.dcm and slice006.dcm \(z 20.00 → 30.00 mm\) where the other slices are "
                      r"5.00 mm apart: missing or unreadable slice"),
    "duplicate slice": (duplicate_slice, [5.0 * k for k in range(12)], r"duplicate slice position 20.00 mm \(slice004"),
    "uneven positions": (lambda files: None, [5.0 * k for k in range(5)] + [26.0 + 5.0 * k for k in range(7)],
                         r"slice gap of 6.00 mm between slice004.dcm and slice005.dcm .*: uneven slice positions"),
}


@pytest.mark.parametrize("fault", DICOM_FAULTS)
def test_incomplete_or_uneven_dicom_series_is_refused_naming_the_gap(tmp_path, fault):
    damage, z_mm, message = DICOM_FAULTS[fault]
    damage(write_dicom(tmp_path / "s", chest(12), z_mm))
    with pytest.raises(io.InputError, match=message) as error:
        io.read_image(tmp_path / "s")
    assert str(error.value).startswith(str(tmp_path / "s")) and "\n" not in str(error.value)


def test_corrupt_dicom_slice_fails_its_case_and_the_batch_goes_on(tmp_path):
    corrupt_slice(write_dicom(tmp_path / "in" / "series", chest(12), [5.0 * k for k in range(12)]))
    good = write(tmp_path / "in" / "good.nrrd", image_of(chest()))
    rows = run([tmp_path / "in"], tmp_path / "out")
    assert rows["series"]["status"] == "failed" and "slice005.dcm" in rows["series"]["error"]
    assert rows[good.name]["status"] == "ok" and not (tmp_path / "out" / "series.seg.nrrd").exists()


# ---------------------------------------------------------------- records that cannot go wrong


class Killed(BaseException):
    """A simulated kill: not an Exception, so nothing catches it on the way out."""


STEPS = ["report written", "segmentation written", "record written", "case committed", "summary written"]


@pytest.mark.parametrize("step", STEPS)
def test_kill_at_each_write_step_leaves_a_case_done_or_redone(tmp_path, monkeypatch, step):
    first = write(tmp_path / "in" / "first.nrrd", image_of(chest()))
    second = write(tmp_path / "in" / "second.nrrd", image_of(chest(6)))
    out = tmp_path / "out"
    run([first], out, report=True)
    before = snapshot(out)

    calls = []

    def kill_second(at):  # the first case is skipped: its only step is its summary row
        calls.append(at)
        if at == step and (step != "summary written" or calls.count(at) == 2):
            raise Killed(at)

    monkeypatch.setattr(cli, "fault_point", kill_second)
    with pytest.raises(Killed):
        run([first, second], out, report=True)
    monkeypatch.undo()
    after_kill = snapshot(out)
    assert {name: after_kill[name] for name in before} == before  # the earlier case's files are untouched
    committed = STEPS.index(step) >= STEPS.index("case committed")
    recorded = STEPS.index(step) >= STEPS.index("record written")
    assert (out / "second.seg.nrrd").exists() == committed and (out / "second.case.json").exists() == recorded

    rows = run([first, second], out, report=True)
    assert rows["second.nrrd"]["status"] == ("skipped" if committed else "ok")
    assert float(rows["second.nrrd"]["lung_ml"]) == pytest.approx(2 * 6 * 24 * 14 * VOXEL_ML, abs=1e-3)
    assert Path(rows["second.nrrd"]["report"]).is_file() and rows["first.nrrd"]["lesion_ml"] != ""
    record = json.loads((out / "second.case.json").read_text())
    assert record["output_sha256"] == sha256_of(out / "second.seg.nrrd") and hidden(out) == []


def test_a_real_kill_before_the_final_rename_leaves_a_temporary_that_the_next_run_sweeps(tmp_path, tiny_checkpoint):
    case = write(tmp_path / "in" / "ct.nrrd", image_of(chest()))
    out = tmp_path / "out"
    command = ["segment", str(case), "-o", str(out), "--weights", str(tiny_checkpoint), "--device", "cpu", "--progress", "none"]
    script = textwrap.dedent(f"""
        import os
        from COVIDLesionSegLib import cli
        cli.fault_point = lambda step: os._exit(137) if step == "record written" else None
        cli.main({command!r})
    """)
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert killed.returncode == 137
    assert [name.split(".")[1:3] for name in hidden(out)] == [["ct", "seg"]]  # the segmentation's temporary file
    assert (out / "ct.case.json").exists() and not (out / "ct.seg.nrrd").exists()
    assert cli.main(command) == 0
    assert hidden(out) == [] and summary(out)["ct.nrrd"]["status"] == "ok"
    assert json.loads((out / "ct.case.json").read_text())["output_sha256"] == sha256_of(out / "ct.seg.nrrd")


def test_stale_temporaries_are_swept_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f".x.seg.nrrd.{dead}-0123abcd.part.seg.nrrd"
    live = tmp_path / f".y.seg.nrrd.{os.getpid()}-0123abcd.part.seg.nrrd"
    old = tmp_path / f".z.case.json.{os.getpid()}-4567abcd.part.json"
    for path in (stale, live, old):
        path.write_bytes(b"partial")
    os.utime(old, (0, 0))
    assert sorted(sweep_stale_temporaries(tmp_path)) == sorted([stale, old]) and live.exists()


def test_same_names_in_different_folders_get_unique_stable_outputs(tmp_path):
    depths = {"a/x.nii.gz": 4, "b/x.nii.gz": 5, "c/x_2.nii.gz": 6}
    inputs = {name: write(tmp_path / name, image_of(chest(depth))).resolve() for name, depth in depths.items()}
    one, two = tmp_path / "one", tmp_path / "two"
    for out, order in ((one, list(inputs.values())), (two, list(inputs.values())[::-1])):
        cli.segment_cases(cli.find_cases(order), ThresholdPredictor(), out, output_format="nii.gz", progress="none")
        with open(out / "summary.csv", newline="") as stream:
            rows = {row["input"]: row for row in csv.DictReader(stream)}
        assert len(rows) == 3 and {row["status"] for row in rows.values()} == {"ok"}
        for name, path in inputs.items():  # every row points at its own input's segmentation and record
            output = Path(rows[str(path)]["output"])
            assert sitk.ReadImage(str(output)).GetSize()[2] == depths[name]
            assert json.loads((out / f"{io.case_name(output)}.case.json").read_text())["input"] == str(path)
    assert sorted(p.name for p in one.glob("*.nii.gz")) == sorted(p.name for p in two.glob("*.nii.gz"))
    assert (one / "x.nii.gz").exists() and (one / "x_2.nii.gz").exists()  # a's and c's own names, no counter
    before = snapshot(one)  # b alone with --overwrite: it keeps its own name and leaves a's files alone
    cli.segment_cases(cli.find_cases([inputs["b/x.nii.gz"]]), ThresholdPredictor(), one, output_format="nii.gz",
                      progress="none", overwrite=True)
    assert snapshot(one)["x.nii.gz"] == before["x.nii.gz"] and snapshot(one)["x_2.nii.gz"] == before["x_2.nii.gz"]


def test_a_second_batch_merges_its_rows_into_the_summary(tmp_path):
    first = write(tmp_path / "in1" / "first.nrrd", image_of(chest()))
    second = write(tmp_path / "in2" / "second.nrrd", image_of(chest()))
    out = tmp_path / "out"
    earlier = run([first], out)["first.nrrd"]
    rows = run([second], out)
    assert set(rows) == {"first.nrrd", "second.nrrd"} and rows["first.nrrd"] == earlier


def merge_many(path: str, worker: int) -> None:
    for index in range(25):
        cli.merge_summary(Path(path), {"input": f"/w/{worker}-case{index}.nrrd", "status": "ok", "lesion_ml": str(index)})


def test_concurrent_runs_lose_no_row(tmp_path):
    path = tmp_path / "summary.csv"
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=merge_many, args=(str(path), worker)) for worker in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert [worker.exitcode for worker in workers] == [0] * 4
    rows = summary(tmp_path)
    assert len(rows) == 100 and all(row["lesion_ml"] for row in rows.values())


def test_output_folder_inside_the_input_folder_is_not_read_as_input(tmp_path):
    case = write(tmp_path / "in" / "ct.nrrd", image_of(chest()))
    out = tmp_path / "in" / "out"
    run([tmp_path / "in"], out, output_format="nii.gz")
    rows = run([tmp_path / "in"], out, output_format="nii.gz")
    assert list(rows) == [case.name] and rows[case.name]["status"] == "skipped"


def test_corrupt_summary_csv_is_kept_aside_and_rebuilt(tmp_path, capsys):
    first = write(tmp_path / "in" / "first.nrrd", image_of(chest()))
    second = write(tmp_path / "in" / "second.nrrd", image_of(chest()))
    out = tmp_path / "out"
    earlier = run([first], out)["first.nrrd"]
    (out / "summary.csv").write_bytes(b"\x00\xff\xfe garbage")
    rows = run([second], out)
    assert rows["first.nrrd"]["lesion_ml"] == earlier["lesion_ml"] and rows["second.nrrd"]["status"] == "ok"
    [kept] = out.glob("summary.csv.unreadable-*")
    assert kept.read_bytes() == b"\x00\xff\xfe garbage" and "unreadable" in capsys.readouterr().err


def test_corrupt_summary_json_is_a_clear_error_and_overwrite_recovers(tmp_path, tiny_checkpoint, capsys):
    case = write(tmp_path / "in" / "ct.nrrd", image_of(chest()))
    out = tmp_path / "out"
    command = ["segment", str(case), "-o", str(out), "--weights", str(tiny_checkpoint), "--progress", "none"]
    assert cli.main(command) == 0
    (out / "summary.json").write_text("{not json")
    before = snapshot(out)
    assert cli.main(command) == 1
    err = capsys.readouterr().err
    assert "summary.json: unreadable" in err and "--overwrite" in err and "Traceback" not in err
    assert snapshot(out) == before
    assert cli.main([*command, "--overwrite"]) == 0 and json.loads((out / "summary.json").read_text())["model"]


def test_existing_output_without_a_record_is_never_overwritten(tmp_path):
    case = write(tmp_path / "in" / "ct.nrrd", image_of(chest()))
    out = tmp_path / "out"
    out.mkdir()
    (out / "ct.seg.nrrd").write_bytes(b"someone else's file")
    row = run([case], out)["ct.nrrd"]
    assert row["status"] == "skipped" and "without its record" in row["error"]
    assert (out / "ct.seg.nrrd").read_bytes() == b"someone else's file"


# ---------------------------------------------------------------- clear errors only


def full_disk(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("problem", ["a file", "under a file", "full disk"])
def test_output_folder_problems_are_reported_before_the_model_loads(tmp_path, monkeypatch, capsys, problem):
    case = write(tmp_path / "ct.nrrd", image_of(chest()))
    out = {"a file": tmp_path / "taken", "under a file": tmp_path / "taken" / "out", "full disk": tmp_path / "out"}[problem]
    (tmp_path / "taken").write_text("a file")
    if problem == "full disk":
        monkeypatch.setattr(os, "fsync", full_disk)
    # a missing weights file: had the model been loaded first, the message would be about it
    assert cli.main(["segment", str(case), "-o", str(out), "--weights", str(tmp_path / "absent.safetensors")]) == 1
    err = capsys.readouterr().err.strip()
    expected = {"a file": "is a file, not a folder", "under a file": "cannot be written", "full disk": "No space left on device"}
    assert err.startswith(f"ERROR output folder {out}") and expected[problem] in err and "\n" not in err
    assert (tmp_path / "taken").read_text() == "a file" and not [p for p in tmp_path.glob("out/*")]


def test_full_disk_while_writing_a_case_fails_that_case_only(tmp_path, monkeypatch, capsys):
    first = write(tmp_path / "in" / "first.nrrd", image_of(chest()))
    second = write(tmp_path / "in" / "second.nrrd", image_of(chest()))
    out = tmp_path / "out"
    run([first], out)
    before = snapshot(out)
    import slicerio

    monkeypatch.setattr(slicerio, "write_segmentation", full_disk)
    rows = run([first, second], out)
    assert rows["second.nrrd"]["status"] == "failed" and "No space left on device" in rows["second.nrrd"]["error"]
    assert rows["first.nrrd"]["status"] == "skipped" and {k: v for k, v in snapshot(out).items() if k != "summary.json"} == {
        k: v for k, v in before.items() if k != "summary.json"}
    assert hidden(out) == [] and "ERROR" in capsys.readouterr().err
    monkeypatch.undo()
    assert run([first, second], out)["second.nrrd"]["status"] == "ok"


@pytest.mark.parametrize("error", [KeyError("lesion"), TypeError("unsupported operand"), MemoryError()])
def test_any_exception_of_a_case_is_its_one_line_error(tmp_path, monkeypatch, capsys, error):
    bad = write(tmp_path / "in" / "bad.nrrd", image_of(chest()))
    good = write(tmp_path / "in" / "good.nrrd", image_of(chest()))
    original, calls = ThresholdPredictor.segment_image, []

    def fail_on_bad(self, image, **options):  # the first case (bad) fails
        calls.append(image)
        if len(calls) == 1:
            raise error
        return original(self, image, **options)

    monkeypatch.setattr(ThresholdPredictor, "segment_image", fail_on_bad)
    rows = run([bad, good], tmp_path / "out")
    assert rows["bad.nrrd"]["status"] == "failed" and rows["bad.nrrd"]["error"].startswith(f"{bad}: {type(error).__name__}")
    assert rows["good.nrrd"]["status"] == "ok" and "Traceback" not in capsys.readouterr().err


def test_debug_flag_shows_the_traceback(tmp_path, tiny_checkpoint, monkeypatch, capsys, caplog):
    from COVIDLesionSegLib.predictor import Predictor

    monkeypatch.setattr(Predictor, "segment_image", lambda self, image, **_: {}["lesion"])
    case = write(tmp_path / "ct.nrrd", image_of(chest()))
    command = ["segment", str(case), "-o", str(tmp_path / "out"), "--weights", str(tiny_checkpoint), "--progress", "none"]
    assert cli.main(command) == 1
    assert f"ERROR {case}: KeyError: 'lesion'" in capsys.readouterr().err and "Traceback" not in caplog.text
    assert cli.main([*command, "--debug"]) == 1
    assert "Traceback" in caplog.text and "KeyError" in caplog.text


def checkpoint_with(tmp_path: Path, tiny_checkpoint: Path, field: str, value) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(tiny_checkpoint), framework="pt") as reader:
        metadata, tensors = reader.metadata(), {name: reader.get_tensor(name) for name in reader.keys()}
    section, _, key = field.partition(".")
    content = json.loads(metadata[section])
    if key:
        content[key] = value
    else:
        content = value
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata={**metadata, section: json.dumps(content)})
    return path


BAD_METADATA = {
    "unknown model argument": ("model.kwargs", {"widths": [4, 8, 16, 32, 64], "out_channels": 2, "depth": 5}, "'model.kwargs.depth'"),
    "non-string name": ("model.name", 5, "'model.name' must be one of"),
    "no lesion channel": ("channels", ["lung", "other"], "'channels' must be a list of distinct channel names including 'lesion'"),
    "channel count": ("channels", ["lesion"], "'model.kwargs.out_channels' must be the number of channels (1)"),
    "size 0": ("preprocessing.size", 0, "'preprocessing.size' must be a positive integer"),
    "unknown preprocessing field": ("preprocessing.colour", "red", "'preprocessing.colour' must be absent: unknown field"),
    "non-finite window": ("preprocessing.hu_window", [-1250, "inf"], "'preprocessing.hu_window'"),
}


@pytest.mark.parametrize("fault", BAD_METADATA)
def test_bad_checkpoint_metadata_names_the_field(tmp_path, tiny_checkpoint, capsys, fault):
    field, value, message = BAD_METADATA[fault]
    weights = checkpoint_with(tmp_path, tiny_checkpoint, field, value)
    case = write(tmp_path / "ct.nrrd", image_of(chest()))
    assert cli.main(["segment", str(case), "-o", str(tmp_path / "out"), "--weights", str(weights)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"ERROR model: {weights}: checkpoint metadata field") and message in err and "\n" not in err
    assert not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_threshold_is_refused(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_status:
        cli.main(["segment", "ct.nrrd", "-o", str(tmp_path / "out"), f"--high-opacity-threshold={value}"])
    assert exit_status.value.code == 2 and "not a finite number" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_inputs_may_follow_a_double_dash(tmp_path, tiny_checkpoint, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "-x.nii.gz", image_of(chest()))
    write(tmp_path / "y.nrrd", image_of(chest()))
    assert cli.main(["segment", "y.nrrd", "-o", "out", "--weights", str(tiny_checkpoint), "--progress", "none", "--", "-x.nii.gz"]) == 0
    assert {row["status"] for row in summary(tmp_path / "out").values()} == {"ok"} and len(summary(tmp_path / "out")) == 2
    assert (tmp_path / "out" / "-x.seg.nrrd").exists()



def test_parts_of_one_batch_never_share_an_output_name(tmp_path, tiny_checkpoint):
    inputs = [str(write(tmp_path / folder / "x.nrrd", image_of(chest()))) for folder in ("a", "b")]
    out = tmp_path / "out"
    for part in ("0", "1"):
        assert cli.main(["segment", *inputs, "-o", str(out), "--weights", str(tiny_checkpoint), "--progress", "none",
                         "--num-parts", "2", "--part-id", part]) == 0
    records = [json.loads(path.read_text())["input"] for path in sorted(out.glob("*.case.json"))]
    assert sorted(records) == sorted(str(Path(path).resolve()) for path in inputs) and len(list(out.glob("*.seg.nrrd"))) == 2
