"""``covidlesionseg-compare-crossval`` on the committed cross-validation results (real files of real runs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from COVIDLesionSegTraining import compare_crossval

RESULTS = Path(__file__).resolve().parents[2] / "Training" / "results"
BASELINE = RESULTS / "crossval-v4-batch-dice-rescored" / "crossval.json"  # the v5 recipe, 5 folds, lesion threshold 0.6
ONE_FOLD = RESULTS / "crossval-v5-full-field-of-view" / "crossval.json"  # fold 2 only, same split and guard rails
UNRECORDED_GUARD_RAILS = RESULTS / "crossval-v4-batch-dice" / "crossval.json"  # the same runs, scored before folds recorded them


def test_a_recipe_against_itself_is_complete_wins_no_pair_and_is_not_adopted():
    baseline = compare_crossval.load(BASELINE)
    comparison = compare_crossval.compare(baseline, baseline, dice_floor=0.632, min_wins=12, zoom_tolerance=0.05)
    rule = comparison["rule"]
    pooled = baseline["overall"]["channels"]["lesion"]["pooled_over_folds"]["F1"]
    assert comparison["pooled_lesion_dice"] == (pytest.approx(pooled, abs=1e-12), pytest.approx(pooled, abs=1e-12))
    assert rule["complete"] and rule["pooled_lesion_dice"]["holds"]
    assert rule["less_false_lesion"] == {"wins": 0, "pairs": 15, "needed": 12, "holds": False}  # equal is not less
    assert not rule["adopt"]
    assert [volume["reference_po"] for volume in comparison["volumes"]] == sorted(
        (volume["percent_opacity"]["reference"] for volume in baseline["volumes"]), reverse=True)
    assert comparison["percent_opacity"][0]["pearson_r"] == pytest.approx(baseline["overall"]["percent_opacity"]["pearson_r"])


def test_a_one_fold_candidate_is_compared_on_that_fold_and_not_judged(tmp_path, capsys):
    output = tmp_path / "compare.md"
    assert compare_crossval.main(["--candidate", str(ONE_FOLD), "--baseline", str(BASELINE), "--output", str(output)]) == 0
    text = output.read_text(encoding="utf-8")
    assert text == capsys.readouterr().out
    assert text.startswith("# Cross-validation: candidate against baseline") and "covidlesionseg-compare-crossval --candidate" in text
    candidate, baseline = compare_crossval.load(ONE_FOLD), compare_crossval.load(BASELINE)
    comparison = compare_crossval.compare(candidate, baseline, 0.632, 12, 0.05)
    fold2 = next(fold for fold in baseline["folds"] if fold["fold"] == 2)
    assert [fold["fold"] for fold in comparison["folds"]] == [2] and len(comparison["pairs"]) == 3
    assert comparison["pooled_lesion_dice"][1] == pytest.approx(fold2["test"]["lesion"]["pooled"]["F1"], abs=1e-12)
    assert {volume["fold"] for volume in comparison["volumes"]} == {2}
    # the whole slice: less false lesion on CTChest4 and pyradiomics_lung2, more on lidc_idri_0001 (Training/README.md)
    assert comparison["rule"]["less_false_lesion"]["wins"] == 2 and not comparison["rule"]["complete"]
    assert "Verdict: **not judged**" in text


def test_other_or_unrecorded_guard_rails_or_an_unreadable_file_is_a_clear_error(tmp_path, capsys):
    assert compare_crossval.main(["--candidate", str(UNRECORDED_GUARD_RAILS), "--baseline", str(BASELINE)]) == 1
    assert "fold 0 ran at other guard rails" in capsys.readouterr().err
    other = compare_crossval.load(BASELINE)
    other["folds"][1]["guard_rails"]["lesion_threshold"] = 0.5
    with pytest.raises(ValueError, match="fold 1 ran at other guard rails"):
        compare_crossval.compare(other, compare_crossval.load(BASELINE), 0.632, 12, 0.05)
    broken = tmp_path / "crossval.json"
    broken.write_text(json.dumps({"folds": []}))
    assert compare_crossval.main(["--candidate", str(broken), "--baseline", str(BASELINE)]) == 1
    assert "not a crossval.json" in capsys.readouterr().err
    assert compare_crossval.main(["--candidate", str(tmp_path / "absent.json"), "--baseline", str(BASELINE)]) == 1
    assert "absent.json: not a readable crossval.json" in capsys.readouterr().err


def test_fold_means_rule_judges_dice_po_agreement_and_mean_false_lesion_against_the_baseline():
    baseline = compare_crossval.load(BASELINE)
    itself = compare_crossval.compare(baseline, baseline, 0.632, 12, 0.05, rule_name="fold-means")["rule"]
    assert itself["pooled_lesion_dice"]["holds"] and itself["mean_false_lesion_not_higher"]["holds"]  # equal is enough for these
    assert not itself["better_po_agreement"]["holds"] and not itself["adopt"]  # equal agreement is not better
    # the vertical-flip recipe against the v5 recipe (Training/README.md): 0.644 against 0.648, r 0.553 against 0.399
    vertical_flip = compare_crossval.load(RESULTS / "crossval-v5-vertical-flip" / "crossval.json")
    comparison = compare_crossval.compare(vertical_flip, baseline, 0.632, 12, 0.05, rule_name="fold-means")
    rule = comparison["rule"]
    assert rule["complete"] and not rule["pooled_lesion_dice"]["holds"] and rule["better_po_agreement"]["holds"]
    means = rule["mean_false_lesion_not_higher"]["means_ml"]
    assert rule["mean_false_lesion_not_higher"]["holds"] and means == comparison["mean_false_lesion_ml"] and len(means) == 3
    ctchest = [fold["healthy_ct"]["false_lesion_ml"] for fold in baseline["folds"]]
    assert means["CTChest4.nrrd"][1] == pytest.approx(sum(ctchest) / len(ctchest))
    assert not rule["adopt"]
    text = compare_crossval.render_markdown(comparison, "covidlesionseg-compare-crossval --rule fold-means")
    assert "## Adoption rule (fold-means)" in text and "1. Pooled lesion Dice at least the baseline's: 0.644 / 0.648, fails." in text
    with pytest.raises(ValueError, match="unknown rule"):
        compare_crossval.compare(baseline, baseline, 0.632, 12, 0.05, rule_name="best-draw")
