"""covidlesionseg-crossval on real slices: a tiny recipe checkpoint cross-validated over 2 patient folds."""

from __future__ import annotations

import csv
import json

import pytest

from COVIDLesionSegLib.predictor import GuardRails
from COVIDLesionSegTraining import reproduce as reproduce_module
from COVIDLesionSegTraining.config import TrainConfig
from COVIDLesionSegTraining.crossval import crossval, main
from COVIDLesionSegTraining.data import read_manifest
from COVIDLesionSegTraining.model_card import crossval_section, po_section
from COVIDLesionSegTraining.splits import SplitSpec
from COVIDLesionSegTraining.train import train

RECIPE = {
    "model": "unet",
    "model_widths": (4, 8, 16, 32, 64),
    "channels": ("lesion", "lung"),
    "image_size": 64,
    "augment": "robust",
    "dice_weight": 1.0,
    "learning_rate": 3e-4,
    "max_steps": 3,
    "split": SplitSpec("holdout", holdout_groups=("radiopaedia_7_85703_0",)),
    "device": "cpu",
}


@pytest.fixture(scope="module")
def recipe_checkpoint(tiny_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("recipe") / "run"
    train(TrainConfig(data_dir=str(tiny_data), output_dir=str(run_dir), **RECIPE))
    return run_dir / "best.safetensors"


@pytest.fixture(scope="module")
def two_folds(recipe_checkpoint, tiny_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("crossval")
    results = crossval(
        str(recipe_checkpoint),
        tiny_data,
        folder / "runs",
        folder / "out",
        num_folds=2,
        changes={"max_steps": 2},
        device="cpu",
        command="test",
    )
    return folder, results


def test_each_fold_trains_the_recipe_with_only_split_budget_and_folder_changed(two_folds, tiny_data):
    folder, results = two_folds
    recipe = TrainConfig(data_dir=str(tiny_data), output_dir="x", **RECIPE).to_dict()
    for fold in (0, 1):
        saved = TrainConfig.load(folder / "runs" / f"fold{fold}" / "config.json").to_dict()
        changed = {name for name in saved if saved[name] != recipe[name]}
        assert changed == {"output_dir", "max_steps", "split"}
        assert saved["max_steps"] == 2 and saved["split"]["kind"] == "patient-kfold" and saved["split"]["fold"] == fold
        assert saved["split"]["num_folds"] == 2 and saved["split"]["seed"] == recipe["split"]["seed"]
    assert results["recipe"]["source"] == "best.safetensors" and results["recipe"]["changes"] == {"max_steps": 2}


def test_every_patient_is_tested_once_by_a_model_that_never_saw_it(two_folds, tiny_data):
    _, results = two_folds
    groups_of = {record.volume_id: record.split_group for record in read_manifest(tiny_data)}
    test_groups = [group for fold in results["folds"] for group in fold["test_groups"]]
    assert sorted(test_groups) == sorted(set(groups_of.values()))
    assert sorted(volume["volume_id"] for volume in results["volumes"]) == sorted(groups_of)
    for fold in results["folds"]:
        assert not set(fold["test_groups"]) & set(fold["validation_groups"])
        assert fold["slices"]["test"] == 3 * len(fold["test_groups"])


def test_pooled_figures_are_the_counts_of_every_test_slice(two_folds):
    folder, results = two_folds
    totals = {channel: {"tp": 0, "fp": 0, "fn": 0} for channel in ("lesion", "lung")}
    slices = 0
    for fold in (0, 1):
        with open(folder / "runs" / f"fold{fold}" / "test" / "per_slice.csv", newline="") as stream:
            for row in csv.DictReader(stream):
                slices += 1
                for channel, counts in totals.items():
                    for name in counts:
                        counts[name] += int(row[f"{channel}_{name}"])
    assert slices == 12
    for channel, counts in totals.items():
        expected = 2 * counts["tp"] / (2 * counts["tp"] + counts["fp"] + counts["fn"])
        assert results["overall"]["channels"][channel]["pooled_over_folds"]["F1"] == pytest.approx(expected)
        assert results["overall"]["channels"][channel]["per_volume"]["F1"]["n"] == 4


def test_outputs_agree_and_a_rerun_trains_nothing(two_folds, recipe_checkpoint, tiny_data, monkeypatch):
    folder, results = two_folds
    out = folder / "out"
    assert json.loads((out / "crossval.json").read_text()) == json.loads(json.dumps(results))
    assert (out / "crossval_validation.png").read_bytes().startswith(b"\x89PNG")
    markdown = (out / "crossval.md").read_text()
    assert markdown.startswith("# Patient-level 2-fold cross-validation of `best.safetensors`'s recipe")
    assert "Changed from the recipe for this run: **max_steps 2** (recipe: 3)." in markdown
    defaults = ", ".join(f"`{name}` = {value}" for name, value in GuardRails().to_dict().items())
    assert f"Guard rails of the measurements through the full inference path: fold 0, 1: {defaults}." in markdown
    for volume in results["volumes"]:
        lesion = volume["lesion"]["F1"]
        assert f"| {volume['volume_id']} | {volume['fold']} | 3 | {'—' if lesion is None else f'{lesion:.3f}'} |" in markdown

    assert "## Inputs that look different" in markdown
    for fold in results["folds"]:
        assert len(fold["shifted_inputs_lesion_dice"]) == 4 and fold["healthy_ct"]["file"] == "CTChest4.nrrd"
        assert fold["held_out_lesion_free"] == []  # the recipe holds no lesion-free patients out
        assert fold["healthy_ct"]["false_lesion_ml"] >= 0
        ml = fold["healthy_ct"]["false_lesion_ml"]
        assert f"| {fold['fold']} | " in markdown and f" | {ml:.1f} | {fold['healthy_ct']['slices_with_false_lesion']} |" in markdown

    monkeypatch.setattr(reproduce_module, "train", lambda *args, **kwargs: pytest.fail("a finished fold was trained again"))
    again = crossval(
        str(recipe_checkpoint), tiny_data, folder / "runs", folder / "again", num_folds=2, changes={"max_steps": 2}, device="cpu"
    )
    assert again["overall"] == results["overall"]


def test_percent_opacity_of_every_test_volume_is_compared_with_its_reference(two_folds, tiny_data):
    folder, results = two_folds
    from COVIDLesionSegTraining.validate_po import validate

    measured = {volume["volume_id"]: volume for fold in results["folds"] for volume in fold["percent_opacity"]}
    assert sorted(measured) == sorted(volume["volume_id"] for volume in results["volumes"])
    assert results["overall"]["percent_opacity"]["volumes"] == 4 and results["overall"]["percent_opacity"]["folds"] == [0, 1]
    # the same figures as covidlesionseg-validate-po gives for the fold models
    report = validate([(str(folder / "runs" / f"fold{fold['fold']}" / "best.safetensors"), fold["test_groups"])
                       for fold in results["folds"]], tiny_data, folder / "po", device="cpu")
    for volume in report["volumes"]:
        assert measured[volume["volume_id"]]["model_percent_opacity"] == pytest.approx(volume["model_percent_opacity"])
    assert results["overall"]["percent_opacity"]["mean_absolute_difference_pp"] == pytest.approx(
        report["summary"]["mean_absolute_difference_pp"])
    # a lower lesion threshold marks a superset of the lesion inside the same lung: no volume's PO falls
    low = validate([(str(folder / "runs" / f"fold{fold['fold']}" / "best.safetensors"), fold["test_groups"])
                    for fold in results["folds"]], tiny_data, folder / "po-low", device="cpu", lesion_threshold=0.05)
    assert low["guard_rails"]["lesion_threshold"] == 0.05 and report["guard_rails"]["lesion_threshold"] == 0.6
    default_po = {volume["volume_id"]: volume["model_percent_opacity"] or 0.0 for volume in report["volumes"]}
    assert all((volume["model_percent_opacity"] or 0.0) >= default_po[volume["volume_id"]] for volume in low["volumes"])
    markdown = (folder / "out" / "crossval.md").read_text()
    assert "### Percentage of opacity (PO) per test volume" in markdown and "over 4 volumes" in markdown
    assert "ran before PO was measured" not in markdown


def test_folds_carried_from_earlier_results_are_not_trained_again_and_are_named(two_folds, recipe_checkpoint, tiny_data, tmp_path,
                                                                                 monkeypatch):
    folder, results = two_folds
    earlier = json.loads(json.dumps(results))
    earlier["folds"] = [fold for fold in earlier["folds"] if fold["fold"] == 0]
    for key in ("percent_opacity", "date"):  # as results written before these were recorded
        earlier["folds"][0].pop(key)
    earlier["folds"][0]["training"].pop("log")
    (tmp_path / "fold0.json").write_text(json.dumps(earlier))
    monkeypatch.setattr(reproduce_module, "train", lambda *args, **kwargs: pytest.fail("a finished fold was trained again"))

    def run(carry, **options):
        return crossval(str(recipe_checkpoint), tiny_data, folder / "runs", tmp_path / "out", num_folds=2, device="cpu", carry=carry,
                        **{"changes": {"max_steps": 2}, **options})

    merged = run([tmp_path / "fold0.json"])  # fold 1 is run (finished earlier: evaluated only), fold 0 carried
    assert merged["split"]["folds_run"] == [0, 1] and merged["split"]["folds_carried"] == [0]
    lesion = merged["overall"]["channels"]["lesion"]["pooled_over_folds"]
    assert lesion == results["overall"]["channels"]["lesion"]["pooled_over_folds"]
    assert merged["overall"]["percent_opacity"]["folds"] == [1]
    markdown = (tmp_path / "out" / "crossval.md").read_text()
    assert markdown.startswith("# Patient-level 2-fold cross-validation")
    assert f"fold 0 from `{tmp_path / 'fold0.json'}` (run on {results['date']})" in markdown
    assert "Fold 0 ran before PO was measured here" in markdown
    assert (tmp_path / "out" / "crossval_validation.png").read_bytes().startswith(b"\x89PNG")

    rerun = run([tmp_path / "fold0.json"], folds=[0, 1])  # fold 0 named: evaluated again (its run is finished), PO and all
    assert rerun["split"]["folds_carried"] == [] and rerun["overall"]["percent_opacity"]["folds"] == [0, 1]
    assert "carried_from" not in rerun["folds"][0] and rerun["overall"] == results["overall"]
    with pytest.raises(ValueError, match="fold 0 is in"):
        run([tmp_path / "fold0.json", tmp_path / "fold0.json"])
    with pytest.raises(ValueError, match="another recipe, other changes"):
        run([tmp_path / "fold0.json"], changes={"max_steps": 3})
    with pytest.raises(ValueError, match="lesion-free patients"):
        run([tmp_path / "fold0.json"], lesion_free_patients=["someone"])
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json: not a readable crossval.json"):
        run([tmp_path / "broken.json"])
    earlier["folds"][0]["test_groups"] = ["elsewhere"]
    (tmp_path / "other.json").write_text(json.dumps(earlier))
    with pytest.raises(ValueError, match="fold 0 tested other patients"):
        run([tmp_path / "other.json"])


def test_command_line_reports_and_refuses_a_checkpoint_without_a_recipe(two_folds, recipe_checkpoint, tiny_data, tiny_checkpoint, capsys):
    folder, _ = two_folds
    arguments = ["--data", str(tiny_data), "--runs", str(folder / "runs"), "--num-folds", "2", "--max-steps", "2", "--device", "cpu"]
    assert main(["--recipe", str(recipe_checkpoint), "--output", str(folder / "cli"), *arguments]) == 0
    printed = capsys.readouterr().out
    assert "lesion: Dice pooled over all folds" in printed and "crossval.md" in printed
    assert "covidlesionseg-crossval --recipe" in (folder / "cli" / "crossval.md").read_text()

    assert main(["--recipe", str(tiny_checkpoint), "--output", str(folder / "none"), *arguments]) == 1
    assert "records no train_config" in capsys.readouterr().err
    assert main(["--recipe", "no-such-model", "--output", str(folder / "none"), *arguments]) == 1
    assert "neither a checkpoint file nor a registered model" in capsys.readouterr().err


def test_model_card_quotes_the_cross_validation_from_its_json(two_folds):
    _, results = two_folds
    section, limit = crossval_section(json.loads(json.dumps(results)), "results/crossval.json", results["recipe"]["train_config"])
    lesion = results["overall"]["channels"]["lesion"]
    assert f"| lesion | {lesion['pooled_over_folds']['F1']:.3f} | " in section
    assert "`results/crossval.md`, made by\n`test`" in section and "step budget cut to **2** (this model's: 3)" in section
    assert "trained each fold for 2 steps, not this model's 3" in limit
    assert crossval_section(None, "", {})[0] == "Not run (pass --crossval)."
    earlier = json.loads(json.dumps(results))
    del earlier["folds"][1]["guard_rails"]  # a fold scored before the guard rails were recorded
    section = crossval_section(earlier, "results/crossval.json", results["recipe"]["train_config"])[0]
    assert "fold 0: `lung_min_ml` = " in section and "fold 1: not recorded (the defaults of the day it ran)." in section
    po = po_section("", json.loads(json.dumps(results)), "results/crossval.json")  # no --po-validation: the folds' own PO
    compared = results["overall"]["percent_opacity"]["volumes_compared"]
    assert f"over {compared} volumes, Pearson r = " in po and po.endswith("`results/crossval.md`.") and not po.startswith("#")
    assert po_section("# PO\n\ngiven", results, "results/crossval.json") == "given"
    assert po_section("", None, "").startswith("Not measured")


def test_one_fold_with_a_changed_augmentation_is_labelled_and_kept_out_of_the_model_card(recipe_checkpoint, tiny_data, tmp_path):
    arguments = [
        "--recipe",
        str(recipe_checkpoint),
        "--data",
        str(tiny_data),
        "--runs",
        str(tmp_path / "runs"),
        "--output",
        str(tmp_path / "out"),
    ]
    arguments += ["--num-folds", "2", "--folds", "1", "--augment", "flip", "--max-steps", "1", "--weight-average-decay", "0.9"]
    arguments += ["--device", "cpu"]
    assert main(arguments) == 0
    assert not (tmp_path / "runs" / "fold0").exists()
    saved = TrainConfig.load(tmp_path / "runs" / "fold1" / "config.json")
    assert (saved.augment, saved.max_steps, saved.dice_weight, saved.weight_average_decay) == ("flip", 1, RECIPE["dice_weight"], 0.9)
    results = json.loads((tmp_path / "out" / "crossval.json").read_text())
    assert [fold["fold"] for fold in results["folds"]] == [1] and results["split"]["folds_run"] == [1]
    markdown = (tmp_path / "out" / "crossval.md").read_text()
    assert markdown.startswith("# Fold 1 of a patient-level 2-fold cross-validation")
    assert "**max_steps 1** (recipe: 3), **augment flip** (recipe: robust), **weight_average_decay 0.9** (recipe: None)" in markdown
    recipe = results["recipe"]["train_config"]
    with pytest.raises(ValueError, match=r"differs in augment: cross-validated 'flip', model 'robust'; weight_average_decay"):
        crossval_section(results, "out/crossval.json", recipe)
    # a model trained with the changed recipe (other run folder and step budget): its own recipe, quoted
    model = {**recipe, "augment": "flip", "weight_average_decay": 0.9, "output_dir": "elsewhere", "max_steps": 7}
    section, limit = crossval_section(results, "out/crossval.json", model)
    assert "**Partial: fold 1 of 2 only**" in section and "step budget cut to **1** (this model's: 7)" in section
    for name in ("augment", "weight_average_decay"):  # one fold of the recipe itself: quoted, and said to be partial
        results["recipe"]["changes"].pop(name)
    assert "**Partial: fold 1 of 2 only**" in crossval_section(results, "out/crossval.json", recipe)[0]
    assert main([*arguments[:8], "--num-folds", "2", "--folds", "2"]) == 1


def test_held_out_lesion_free_volumes_are_the_named_patients_and_are_aggregated_per_file(two_folds):
    from pathlib import Path

    from COVIDLesionSegTraining.crossval import aggregate
    from COVIDLesionSegTraining.model_card import held_out_negative_cases

    negatives = Path(__file__).resolve().parents[3] / "shared" / "data" / "chest-ct-hu-no-covid"
    if not negatives.is_dir():
        pytest.skip(f"lesion-free volumes not present at {negatives}")
    assert [case.volume.name for case in held_out_negative_cases(negatives, ["lung_pet_ct_dx_A0001"])] == [
        "lpct_A0001_series2_5mm.nii.gz",
        "lpct_A0001_series3_5mm.nii.gz",
    ]
    assert held_out_negative_cases(None, []) == []
    with pytest.raises(ValueError, match="not in"):
        held_out_negative_cases(negatives, ["nobody"])
    _, results = two_folds
    folds = json.loads(json.dumps(results["folds"]))
    for fold, millilitres in zip(folds, (2.0, 4.0), strict=True):
        fold["held_out_lesion_free"] = [{**fold["healthy_ct"], "file": "a.nii.gz", "false_lesion_ml": millilitres}]
    summary = aggregate(folds)["held_out_lesion_free_false_lesion_ml"]["a.nii.gz"]
    assert (summary["mean"], summary["n"]) == (3.0, 2)


def test_guard_rail_candidates_are_scored_on_the_fold_models_test_patients_and_lesion_free_ct(two_folds, tmp_path):
    from COVIDLesionSegTraining.guard_rails import CANDIDATES
    from COVIDLesionSegTraining.guard_rails import main as guard_rails_main

    folder, results = two_folds
    assert guard_rails_main(["--runs", str(folder / "runs" / "fold0"), "--output", str(tmp_path), "--device", "cpu"]) == 0
    written = json.loads((tmp_path / "guard_rails.json").read_text(encoding="utf-8"))
    run = written["runs"][0]
    assert run["test_volumes"] == [volume["volume_id"] for volume in results["volumes"] if volume["fold"] == 0]  # never seen by it
    assert set(written["pooled"]) == set(CANDIDATES)
    none = written["pooled"]["none"]
    assert none["relative_time"] == 1.0 and set(none["false_lesion_ml"]) == {"CTChest4.nrrd"}
    assert all(entry["false_lesion_ml"]["CTChest4.nrrd"] <= none["false_lesion_ml"]["CTChest4.nrrd"] + 1e-9
               for name, entry in written["pooled"].items() if "flip" not in name)  # removing lesion voxels never adds false lesion
    markdown = (tmp_path / "guard_rails.md").read_text(encoding="utf-8")
    assert markdown.count("\n|") == len(CANDIDATES) + 2 and f"**{written['recommended']}**" in markdown
    assert written["pooled"][written["recommended"]]["relative_time"] <= 1.2
    # each candidate is exactly what its name says, whatever GuardRails' defaults are (the default lesion ≥ 0.5 mL once
    # slipped into "none" and every other single-setting candidate)
    off = {"lung_min_ml": 0.0, "lesion_min_ml": 0.0, "flip_tta": False, "hu_lung_prior": False, "lesion_min_hu": None,
           "lesion_threshold": 0.5, "lesion_min_contrast_hu": None}
    assert written["pooled"]["none"]["guard_rails"] == off
    assert written["pooled"]["lung ≥ 100 mL"]["guard_rails"]["lesion_min_ml"] == 0.0
    assert written["pooled"]["flip TTA"]["guard_rails"] == {**written["pooled"]["none"]["guard_rails"], "flip_tta": True}
    every_one = {**off, "flip_tta": True, "lung_min_ml": 100.0, "lesion_min_ml": 0.1, "hu_lung_prior": True}
    assert written["pooled"]["all"]["guard_rails"] == every_one  # as in results/guard-rails-v2-hu: the density rule not in it
    assert written["pooled"]["lesion p ≥ 0.8, lesion ≥ 0.5 mL"]["guard_rails"] == {**off, "lesion_threshold": 0.8, "lesion_min_ml": 0.5}
    thresholds = [written["pooled"][f"lesion p ≥ {t:g}, lesion ≥ 0.5 mL"] for t in (0.6, 0.7, 0.8, 0.9)]
    for stricter, looser in zip(thresholds[1:], thresholds[:-1], strict=True):  # a higher threshold marks a subset of the lesion
        assert stricter["false_lesion_ml"]["CTChest4.nrrd"] <= looser["false_lesion_ml"]["CTChest4.nrrd"] + 1e-9


def test_guard_rail_scores_of_earlier_sittings_are_carried_and_named(two_folds, tmp_path, capsys):
    from COVIDLesionSegTraining.guard_rails import main as guard_rails_main

    folder, _ = two_folds
    fold0, fold1 = (str(folder / "runs" / f"fold{fold}") for fold in (0, 1))
    assert guard_rails_main(["--runs", fold0, "--output", str(tmp_path / "a"), "--device", "cpu"]) == 0
    earlier = tmp_path / "a" / "guard_rails.json"
    assert guard_rails_main(["--runs", fold1, "--carry", str(earlier), "--output", str(tmp_path / "b"), "--device", "cpu"]) == 0
    first, merged = (json.loads(path.read_text(encoding="utf-8")) for path in (earlier, tmp_path / "b" / "guard_rails.json"))
    assert [run["fold"] for run in merged["runs"]] == [0, 1] and "carried_from" not in merged["runs"][1]
    assert merged["runs"][0] == {**first["runs"][0], "carried_from": {"file": str(earlier), "date": first["date"]}}
    none = [run["candidates"]["none"]["counts"]["8-bit"] for run in merged["runs"]]
    assert merged["pooled"]["none"]["lesion_dice_8bit"] == pytest.approx((none[0][0] + none[1][0]) / (none[0][1] + none[1][1]))
    assert f"fold 0 from `{earlier}` (scored on {first['date']})" in (tmp_path / "b" / "guard_rails.md").read_text(encoding="utf-8")
    # carried again, a carried run keeps the file it was scored in
    assert guard_rails_main(["--carry", str(tmp_path / "b" / "guard_rails.json"), "--output", str(tmp_path / "c")]) == 0
    assert json.loads((tmp_path / "c" / "guard_rails.json").read_text(encoding="utf-8"))["runs"][0]["carried_from"]["file"] == str(earlier)

    capsys.readouterr()
    assert guard_rails_main(["--runs", fold0, "--carry", str(earlier), "--output", str(tmp_path / "d")]) == 1  # before scoring it
    assert "a fold is scored twice" in capsys.readouterr().err
    first["pooled"]["none"]["guard_rails"]["lesion_min_ml"] = 0.5
    (tmp_path / "other.json").write_text(json.dumps(first), encoding="utf-8")
    assert guard_rails_main(["--carry", str(tmp_path / "other.json"), "--output", str(tmp_path / "d")]) == 1
    assert "other.json: scored other guard-rail candidates" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_recommended_guard_rails_remove_the_most_false_lesion_at_no_dice_or_time_cost():
    from COVIDLesionSegTraining.guard_rails import recommend

    def entry(dice, millilitres, time):
        return {"lesion_dice_8bit": dice, "lesion_dice_hu": dice, "false_lesion_ml": {"a": millilitres}, "relative_time": time}

    summary = {"none": entry(0.70, 50, 1.0), "cheap": entry(0.695, 10, 1.05), "slow": entry(0.72, 0, 2.0), "lossy": entry(0.6, 0, 1.0)}
    assert recommend(summary) == "cheap"
    summary["cheaper"] = entry(0.70, 10, 1.01)
    assert recommend(summary) == "cheaper"


def test_a_fine_tuning_recipe_trains_its_first_stage_then_fine_tunes_within_the_budget(recipe_checkpoint, tiny_data, tmp_path):
    tuned_dir = tmp_path / "tuned"
    train(TrainConfig(data_dir=str(tiny_data), output_dir=str(tuned_dir), **{**RECIPE, "max_steps": 1, "learning_rate": 1e-4},
                      init_from=str(recipe_checkpoint)))
    recipe = TrainConfig.load(tuned_dir / "config.json")
    assert recipe.init_recipe["max_steps"] == 3 and recipe.init_recipe["learning_rate"] == 3e-4  # the first stage, recorded
    runs = tmp_path / "runs"
    results = crossval(str(tuned_dir / "best.safetensors"), tiny_data, runs, tmp_path / "out", num_folds=2,
                       changes={"max_steps": 3}, folds=[1], device="cpu", command="test")
    stage1 = TrainConfig.load(runs / "stage1" / "fold1" / "config.json")
    tuning = TrainConfig.load(runs / "fold1" / "config.json")
    assert (stage1.max_steps, stage1.learning_rate, stage1.init_from) == (2, 3e-4, None)  # budget 3 = 2 + 1 fine-tuning step
    assert (tuning.max_steps, tuning.learning_rate) == (1, 1e-4)
    assert tuning.init_from == str(runs / "stage1" / "fold1" / "best.safetensors") and tuning.init_recipe["max_steps"] == 2
    assert stage1.split.fold == tuning.split.fold == 1 and results["split"]["folds_run"] == [1]
    with pytest.raises(ValueError, match="leaves nothing before"):
        crossval(str(tuned_dir / "best.safetensors"), tiny_data, runs, tmp_path / "out", num_folds=2, changes={"max_steps": 1},
                 folds=[1], device="cpu")
