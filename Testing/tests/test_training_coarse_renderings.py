"""``covidlesionseg-coarse-renderings``: the coarse re-rendering keeps the field of view, and the command measures real volumes."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk

from COVIDLesionSegLib.resources import default_model_name
from COVIDLesionSegTraining import coarse_renderings, model_card

NEGATIVES = Path(__file__).resolve().parents[3] / "shared" / "data" / "chest-ct-hu-no-covid"


def corner(image: sitk.Image, far: bool) -> tuple[float, ...]:
    """The physical point of the outer edge of the first (or last) voxel, in plane."""
    size = image.GetSize()
    index = [size[0] - 0.5, size[1] - 0.5, 0.0] if far else [-0.5, -0.5, 0.0]
    return image.TransformContinuousIndexToPhysicalPoint(index)


def test_coarse_rendering_keeps_the_field_of_view_slices_direction_and_voxel_type():
    values = np.full((5, 77, 101), -800, dtype=np.int16)  # z, y, x: odd, non-square, anisotropic, oblique
    values[:, 30:50, 40:60] = 40
    image = sitk.GetImageFromArray(values)
    image.SetSpacing((0.7, 0.9, 2.5))
    image.SetOrigin((-12.0, 30.0, 7.5))
    angle = np.deg2rad(20)
    image.SetDirection((np.cos(angle), -np.sin(angle), 0, np.sin(angle), np.cos(angle), 0, 0, 0, -1))
    coarse = model_card.coarse_rendering(image, 32)
    assert coarse.GetSize() == (32, 32, 5) and coarse.GetPixelID() == sitk.sitkInt16
    assert coarse.GetDirection() == pytest.approx(image.GetDirection())
    assert coarse.GetSpacing() == pytest.approx((0.7 * 101 / 32, 0.9 * 77 / 32, 2.5))
    for far in (False, True):
        assert corner(coarse, far) == pytest.approx(corner(image, far), abs=1e-6)
    array = sitk.GetArrayFromImage(coarse)
    assert array[:, 2, 2].tolist() == [-800] * 5  # far from the block: the value kept
    assert array.max() > 0 and array.min() == -800  # the block survives, blurred


def test_thick_rendering_averages_runs_of_slices_into_slabs_centred_between_them():
    values = np.arange(7 * 3 * 4, dtype=np.int16).reshape(7, 3, 4) * 3  # z, y, x
    image = sitk.GetImageFromArray(values)
    image.SetSpacing((0.8, 0.6, 2.5))
    image.SetOrigin((5.0, -3.0, 40.0))
    image.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, -1))  # rows and columns swapped, feet first
    thick = model_card.thick_rendering(image, 7.0)  # round(7 / 2.5) = 3 slices per slab; the 7th slice dropped
    assert thick.GetSize() == (4, 3, 2) and thick.GetPixelID() == sitk.sitkInt16
    assert thick.GetSpacing() == pytest.approx((0.8, 0.6, 7.5)) and thick.GetDirection() == image.GetDirection()
    assert thick.GetOrigin() == pytest.approx(image.TransformIndexToPhysicalPoint((0, 0, 1)))  # the centre of the first three
    expected = np.rint(values[:6].reshape(2, 3, 3, 4).mean(axis=1))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(thick), expected)
    assert model_card.thick_rendering(image, 3.0) is image  # a slice already that thick
    with pytest.raises(ValueError, match="needs 20 slices"):
        model_card.thick_rendering(image, 50.0)


class MarksEveryDenseVoxel:
    """A stand-in predictor: lesion wherever the CT is above -500 HU, on the image's own grid."""

    def segment_image(self, image: sitk.Image) -> SimpleNamespace:
        lesion = sitk.Cast(image > -500, sitk.sitkUInt8)
        voxels = int(sitk.GetArrayViewFromImage(lesion).sum())
        ml = voxels * float(np.prod(image.GetSpacing())) / 1000
        statistics = SimpleNamespace(lesion_ml=ml, lesion_slices=int(sitk.GetArrayViewFromImage(lesion).any(axis=(1, 2)).sum()),
                                     lung_ml=1000.0, percent_opacity=ml / 10)
        return SimpleNamespace(masks={"lesion": lesion}, statistics=statistics)


@pytest.mark.parametrize(("tumour_free", "off_tumour_slabs"), [([1, 1, 1, 1, 0, 1, 1], 0), ([0, 1, 1, 1, 1, 1, 1], 1)])
def test_coarse_check_counts_false_lesion_off_the_tumour_on_slabs_of_tumour_free_slices_only(tumour_free, off_tumour_slabs):
    values = np.full((7, 8, 8), -900, dtype=np.int16)
    values[:2] = 0  # dense in the first two stored slices: the last two of the radiological order (the z axis runs feet to head)
    image = sitk.GetImageFromArray(values)
    image.SetSpacing((1.0, 1.0, 2.5))
    image.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, -1))
    check = model_card.coarse_check(MarksEveryDenseVoxel(), image, side=8, slab_mm=5.0, tumour_free=np.array(tumour_free, dtype=bool))
    assert check["size"] == [8, 8, 3]  # radiological slices (0, 1), (2, 3), (4, 5); the 7th dropped
    assert check["false_lesion_ml"] == pytest.approx(64 * 5.0 / 1000)  # slab (4, 5): half dense, above -500 HU
    assert check["false_lesion_ml_off_tumour"] == pytest.approx(off_tumour_slabs * 64 * 5.0 / 1000)
    assert model_card.coarse_check(MarksEveryDenseVoxel(), image, side=8) is None  # nothing to re-render


def test_command_measures_a_real_lesion_free_volume_as_reconstructed_and_coarser(tmp_path, capsys):
    if not (NEGATIVES / "manifest.csv").is_file():
        pytest.skip(f"lesion-free data not present at {NEGATIVES}")
    argv = ["--model", default_model_name(), "--lesion-free", str(NEGATIVES), "--patients", "totalsegmentator_example",
            "--side", "48", "--slab-mm", "10", "--output", str(tmp_path)]
    assert coarse_renderings.main(argv) == 0
    result = json.loads((tmp_path / "coarse_renderings.json").read_text(encoding="utf-8"))
    text = (tmp_path / "coarse_renderings.md").read_text(encoding="utf-8")
    assert text == capsys.readouterr().out
    (row,) = result["volumes"]
    assert row["file"] == "totalsegmentator_example_ct.nii.gz" and (result["side"], result["slab_mm"]) == (48, 10)
    assert row["coarse"]["size"] == [48, 48, row["size"][2] // 3]  # 3 mm slices, three to a slab
    assert row["coarse"]["spacing_mm"][2] == pytest.approx(9.0) and "at 48², 10 mm slabs (mL)" in text
    for check in (row, row["coarse"]):
        assert check["false_lesion_ml"] >= 0 and check["lung_ml"] > 10  # its lung bases found at both resolutions
    assert f"`{row['file']}`" in text and "covidlesionseg-coarse-renderings --model" in text
    assert coarse_renderings.main([*argv[:5], "nobody", *argv[6:]]) == 1
    assert "patients ['nobody'] are not in" in capsys.readouterr().err
    assert coarse_renderings.main([*argv[:9], "0", *argv[10:]]) == 1
    assert "--slab-mm 0.0: a slab between 0 and 50 mm thick" in capsys.readouterr().err
    too_thin = tmp_path / "too_thin"  # 20 slices of 2 mm cannot make one 50 mm slab
    assert coarse_renderings.main([*argv[:5], "totalsegmentator_example_dicom", *argv[6:9], "50", "--output", str(too_thin)]) == 1
    assert "totalsegmentator_example_ct_dicom.nii.gz: a 50 mm slab needs 25 slices; the volume has 20" in capsys.readouterr().err
    assert not too_thin.exists()
