"""covidlesionseg-model-card on a tiny checkpoint: every section is filled from its own measurements."""

import json

from COVIDLesionSegLib.predictor import GuardRails
from COVIDLesionSegTraining.data import ORIENTATIONS
from COVIDLesionSegTraining.model_card import SHIFTED_RENDERINGS, card_markdown, main


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
        assert row.endswith(f"| {coarse['false_lesion_ml']:.1f} |")
    older = {key: value for key, value in card.items() if key != "coarse_side"}  # a card made before the coarse rendering
    assert "at 128²" not in card_markdown(older, "covidlesionseg-model-card", "")


def test_recipe_says_when_the_weights_are_a_moving_average():
    from COVIDLesionSegTraining.model_card import recipe_lines

    recipe = {"model": "resattunet", "max_steps": 10, "split": {"val_fraction": 0.1}}
    assert "best validation loss kept. Trained" in recipe_lines(recipe)
    averaged = recipe_lines({**recipe, "weight_average_decay": 0.99})
    assert "best validation loss kept (of a moving average of the weights, decay 0.99, which is what is validated and saved)." in averaged
