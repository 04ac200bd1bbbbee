"""``covidlesionseg-coarse-renderings``: the coarse re-rendering keeps the field of view, and the command measures real volumes."""

from __future__ import annotations

import json
from pathlib import Path

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
    assert row["coarse"]["size"] == [48, 48, row["as_reconstructed"]["size"][2] // 3]  # 3 mm slices, three to a slab
    assert row["coarse"]["spacing_mm"][2] == pytest.approx(9.0) and "at 48², 10 mm slabs (mL)" in text
    for rendering in ("as_reconstructed", "coarse"):
        assert row[rendering]["false_lesion_ml"] >= 0 and row[rendering]["lung_ml"] > 10  # its lung bases found at both resolutions
    assert f"`{row['file']}`" in text and "covidlesionseg-coarse-renderings --model" in text
    assert coarse_renderings.main([*argv[:5], "nobody", *argv[6:]]) == 1
    assert "patients ['nobody'] are not in" in capsys.readouterr().err
    assert coarse_renderings.main([*argv[:9], "0", *argv[10:]]) == 1
    assert "--slab-mm 0.0: a slab between 0 and 50 mm thick" in capsys.readouterr().err
