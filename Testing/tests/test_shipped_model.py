"""The shipped default model: its file matches the registry's SHA-256, and it still reaches the Dice stated in
its model card on held-out real slices (the golden test)."""

import json
import re

import pytest

from COVIDLesionSegLib.checkpoints import resolve_model_file, sha256_of
from COVIDLesionSegLib.predictor import Predictor
from COVIDLesionSegLib.resources import default_model_name, load_registry, resources_dir

TOLERANCE = 0.01  # CPU kernels may differ slightly between machines


@pytest.fixture(scope="module")
def shipped():
    name = default_model_name()
    entry = load_registry()[name]
    card = json.loads((resources_dir() / "Models" / f"{name}.card.json").read_text(encoding="utf-8"))
    return name, entry, card


def test_shipped_file_matches_the_registry_checksum(shipped):
    name, entry, card = shipped
    path = resolve_model_file(entry)  # raises on a mismatch
    assert sha256_of(path) == entry.sha256 == card["sha256"]
    assert path.stat().st_size < 60e6  # fp16


def test_golden_dice_on_held_out_patients(shipped, shared_data):
    from COVIDLesionSegTraining.model_card import held_out_scores

    name, entry, card = shipped
    golden = card["golden"]
    scores = held_out_scores(Predictor.from_checkpoint(name, device="cpu"), shared_data, card["holdout"], golden["slice_step"])
    assert scores["slices"] == golden["slices"]
    assert scores["lesion_dice"] == pytest.approx(golden["lesion_dice"], abs=TOLERANCE)
    assert scores["lung_dice"] == pytest.approx(golden["lung_dice"], abs=TOLERANCE)


def test_default_predictor_has_lesion_and_lung_channels(shipped):
    assert Predictor.default(device="cpu").channels == ["lesion", "lung"]


def test_readme_quotes_the_generated_card_and_cross_validation(shipped):
    """The README's figures are copies of generated files; this keeps them from drifting."""
    _, _, card = shipped
    repository = resources_dir().parent
    readme = " ".join((repository / "README.md").read_text(encoding="utf-8").split())
    held_out = card["held_out"]
    assert f"pooled lesion Dice of {held_out['lesion_dice']:.3f} and a lung Dice of {held_out['lung_dice']:.3f}" in readme
    for entry in [card["healthy_ct"], *card["held_out_lesion_free"]]:
        assert f"{entry['false_lesion_ml']:.1f} mL (`{entry['file']}`)" in readme
        density = entry["false_lesion_density"]
        lesion, mirror = (f"{density[key]:.0f}".replace("-", "−") for key in ("lesion_median_hu", "mirror_median_hu"))
        assert f"{lesion} against {mirror} HU" in readme
    command = (resources_dir() / "Models" / "MODEL_CARD.md").read_text(encoding="utf-8")  # the card's command names its recipe's CV
    crossval = json.loads((repository / re.search(r"--crossval (\S+)", command).group(1)).read_text(encoding="utf-8"))
    lesion, lung = crossval["overall"]["channels"]["lesion"], crossval["overall"]["channels"]["lung"]
    folds = crossval["split"]["folds_run"]
    assert (
        f"a lesion Dice of {lesion['pooled_over_folds']['F1']:.3f} pooled over its {lesion['per_volume']['F1']['n']} test volumes "
        f"and a lung Dice of {lung['pooled_over_folds']['F1']:.3f}"
    ) in readme
    assert f"{len(folds)} of the {crossval['split']['num_folds']} folds" in readme
    budget, own = crossval["recipe"]["changes"]["max_steps"], crossval["recipe"]["train_config"]["max_steps"]
    assert f"cut to {budget:,} of its {own:,} steps" in readme


def test_a_coarse_reconstruction_is_flagged_in_the_summary_and_the_report(shipped, tmp_path):
    """CTChest4.nrrd (3 mm pixels) is coarser in plane than any slice the default model trained on; the sample is not."""
    import csv

    from PIL import Image
    from slicerio.data_helper import get_testdata_file

    from COVIDLesionSegLib import cli
    from COVIDLesionSegLib.report import PNG_TEXT_KEY

    sample = resources_dir() / "Samples" / "radiopaedia_27_86410_0.nii.gz"
    arguments = ["segment", get_testdata_file("CTChest4.nrrd"), str(sample), "-o", str(tmp_path), "--device", "cpu", "--report"]
    assert cli.main([*arguments, "--progress", "none"]) == 0
    with open(tmp_path / "summary.csv", newline="") as stream:
        rows = {row["input"].rsplit("/", 1)[-1]: row for row in csv.DictReader(stream)}
    warning = ("coarse in plane: the 138 pixels across what the network sees fill its 256² grid at 0.54 of its resolution, "
               "coarser than any slice this model trained on (0.6)")
    assert warning in rows["CTChest4.nrrd"]["warnings"] and rows["radiopaedia_27_86410_0.nii.gz"]["warnings"] == ""
    with Image.open(rows["CTChest4.nrrd"]["report"]) as png:
        assert any(note.startswith(warning) for note in json.loads(png.text[PNG_TEXT_KEY])["notes"])
