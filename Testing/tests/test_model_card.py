"""covidlesionseg-model-card on a tiny checkpoint: every section is filled from its own measurements."""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from COVIDLesionSegLib.predictor import GuardRails
from COVIDLesionSegTraining.data import ORIENTATIONS
from COVIDLesionSegTraining.model_card import SHIFTED_RENDERINGS, card_markdown, density_text, main


def test_card_measures_both_orientations_shifted_inputs_and_lesion_free_volumes(tiny_checkpoint, shared_data, tmp_path):
    negatives = shared_data.parent / "chest-ct-hu-no-covid"
    arguments = ["--model", str(tiny_checkpoint), "--data", str(shared_data), "--holdout", "radiopaedia_36_86526_0"]
    if negatives.is_dir():
        arguments += ["--negatives", str(negatives), "--negative-patients", "totalsegmentator_example_dicom"]
    assert main([*arguments, "--output-dir", str(tmp_path)]) == 0
    card = json.loads((tmp_path / "tiny.safetensors.card.json").read_text(encoding="utf-8"))
    assert set(card["held_out_by_orientation"]) == set(ORIENTATIONS) and card["orientation"] == "as-stored"  # no recipe: v1's meaning
    assert card["held_out"] == card["held_out_by_orientation"]["as-stored"]
    assert list(card["shifted_inputs_lesion_dice"]) == list(SHIFTED_RENDERINGS)
    assert card["guard_rails"] == GuardRails().to_dict()  # what the CLI uses
    markdown = (tmp_path / "tiny.safetensors.card.md").read_text(encoding="utf-8")  # not the registry's default: its own file
    assert markdown == card_markdown(card, "covidlesionseg-model-card " + " ".join([*arguments, "--output-dir", str(tmp_path)]), "")
    assert "| radiological | " in markdown and "| as-stored (trained in) | " in markdown
    assert "No lesion-free slices" in markdown
    assert card["coarse_side"] == 128 and card["healthy_ct"]["coarse"] is None  # CTChest4.nrrd is 128² already
    assert "| false PO (%) | at 128² (mL) |" in markdown
    if negatives.is_dir():
        assert [entry["file"] for entry in card["held_out_lesion_free"]] == ["totalsegmentator_example_ct_dicom.nii.gz"]
        coarse = card["held_out_lesion_free"][0]["coarse"]
        assert coarse["size"] == [128, 128, 20] and coarse["false_lesion_ml"] >= 0
        row = next(line for line in markdown.splitlines() if line.startswith("| `totalsegmentator_example_ct_dicom.nii.gz` | 512×512×20 |"))
        density = density_text(card["held_out_lesion_free"][0]["false_lesion_density"])
        assert row.endswith(f"| {coarse['false_lesion_ml']:.1f} | {density} |")
    older = {key: value for key, value in card.items() if key != "coarse_side"}  # a card made before the coarse rendering
    assert "at 128²" not in card_markdown(older, "covidlesionseg-model-card", "")
    assert "false_lesion_density" in card["healthy_ct"] and "| false lesion / its mirror image (median HU) |" in markdown
    density = {"lesion_median_hu": -659.0, "mirror_median_hu": -869.0, "mirror_in_lung_share": 0.99}
    measured = {**card, "healthy_ct": {**card["healthy_ct"], "false_lesion_density": density}}
    row = next(line for line in card_markdown(measured, "c", "").splitlines() if "| 128×128×34 |" in line)
    assert row.endswith("| -659 / -869 (99 %) |")

    def without_density(entry: dict) -> dict:
        return {key: value for key, value in entry.items() if key != "false_lesion_density"}

    before = {**card, "healthy_ct": without_density(card["healthy_ct"]),
              "held_out_lesion_free": [without_density(entry) for entry in card["held_out_lesion_free"]]}
    assert "mirror image" not in card_markdown(before, "covidlesionseg-model-card", "")  # a card made before it


def test_recipe_says_when_the_weights_are_a_moving_average():
    from COVIDLesionSegTraining.model_card import recipe_lines

    recipe = {"model": "resattunet", "max_steps": 10, "split": {"val_fraction": 0.1}}
    assert "best validation loss kept. Trained" in recipe_lines(recipe)
    averaged = recipe_lines({**recipe, "weight_average_decay": 0.99})
    assert "best validation loss kept (of a moving average of the weights, decay 0.99, which is what is validated and saved)." in averaged


def two_lungs(direction: tuple, touching: bool = False) -> tuple:
    """A CT (HU) with two box lungs either side of the midline, a dense 'lesion' in the right lung (-600 HU), the same
    place mirrored into the left lung at -850 HU, and the rest of the lungs at -880 HU; with its lesion and lung masks.
    ``direction``: the image's; the patient's left-right axis (LPS x) is the column or the row axis, either way."""
    across, along = 51, 40  # voxels along the left-right axis and the other in-plane axis
    ct = np.full((6, along, across), 40, dtype=np.int16)  # z, other, left-right index
    lung = np.zeros(ct.shape, dtype=np.uint8)
    first, second = ((5, 26), (25, 46)) if touching else ((5, 20), (31, 46))  # index ranges; mirrored by i -> 50 - i
    for start, stop in (first, second):
        lung[:, 8:32, start:stop] = 1
    ct[lung > 0] = -880
    lesion = np.zeros_like(lung)
    lesion[1:5, 10:21, 8:12] = 1
    ct[lesion > 0] = -600
    ct[1:5, 10:21, 39:43] = -850  # 50 - 11 … 50 - 8
    steps = np.asarray(direction, dtype=float).reshape(3, 3)[0]  # LPS x per index step (x, y, z)
    if abs(steps[1]) > abs(steps[0]):  # LPS x runs along the rows: the left-right axis is y
        ct, lung, lesion = (array.transpose(0, 2, 1).copy() for array in (ct, lung, lesion))
    images = []
    for array in (ct, lesion, lung):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((0.7, 0.9, 2.5))
        image.SetOrigin((-12.0, 30.0, 7.5))
        image.SetDirection(direction)
        images.append(image)
    return tuple(images)


@pytest.mark.parametrize("direction", [(-1, 0, 0, 0, -1, 0, 0, 0, 1), (0, 1, 0, 1, 0, 0, 0, 0, -1)])
@pytest.mark.parametrize("touching", [False, True])
def test_mirror_image_density_compares_the_false_lesion_with_the_same_place_in_the_other_lung(direction, touching):
    from COVIDLesionSegTraining.model_card import mirror_image_density

    ct, lesion, lung = two_lungs(direction, touching)
    density = mirror_image_density(ct, lesion, lung)
    assert density == {"lesion_median_hu": -600.0, "mirror_median_hu": -850.0, "mirror_in_lung_share": 1.0}


def test_mirror_image_density_counts_mirror_images_outside_the_lung_and_needs_a_lesion():
    from COVIDLesionSegTraining.model_card import mirror_image_density

    ct, lesion, lung = two_lungs((1, 0, 0, 0, 1, 0, 0, 0, 1))
    lung_array = sitk.GetArrayFromImage(lung)
    lung_array[:, 10:16, 31:46] = 0  # rows 10-15 of the left lung, whole: its centroid across stays, 6 of 11 mirrored rows leave it
    cut = sitk.GetImageFromArray(lung_array)
    cut.CopyInformation(lung)
    density = mirror_image_density(ct, lesion, cut)
    assert density["mirror_median_hu"] == -850.0 and density["mirror_in_lung_share"] == pytest.approx(5 / 11)
    assert mirror_image_density(ct, lesion * 0, lung) is None
