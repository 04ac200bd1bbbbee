"""``covidlesionseg-crossval``: patient-level k-fold cross-validation of a trained model's recipe.

::

    covidlesionseg-crossval --recipe resattunet-lesion-lung-v1 --data ../shared/data/covid19-ct-seg-20cases-png256 \\
        --max-steps 1500 --runs runs/crossval-recipe --output Training/results/crossval-shipped-recipe

The recipe is the ``train_config`` stored in ``--recipe`` (a registry name or a checkpoint file), so the
folds train exactly as that model did; only the split (``patient-kfold``, fold k of ``--num-folds``, the
18 patient groups balanced by slice count), the run folder and, when given, ``--max-steps`` change. Fold k
trains into ``RUNS/fold<k>/`` (finished runs are left, unfinished ones resumed, as ``covidlesionseg-reproduce``
does), chooses its checkpoint on its own validation groups, and its ``best.safetensors`` is evaluated on the
fold's test patients with :func:`~.evaluate.evaluate_checkpoint` (``RUNS/fold<k>/test/``). Every volume
is thus scored by the one model that never saw its patient.

``OUTPUT`` gets, all generated:

- ``crossval.json``: the command, recipe, per fold (test groups, training record, pooled test metrics
  per channel), per volume (fold, slices, metrics per channel), and over all folds: the counts pooled over
  every test pixel, the mean ± SD of the folds' pooled Dice and of the per-volume Dice;
- ``crossval.md``: rendered from ``crossval.json`` alone;
- ``crossval_validation.png``: each fold's validation loss and Dice against the optimizer step, the chosen
  (best validation loss) step marked — the evidence for the step budget.

Each fold model also predicts its test volumes through the full inference path, for the percentage of opacity
(PO, as ``covidlesionseg-validate-po``): Pearson r and mean absolute difference over every volume of the folds.

``--carry-folds RESULTS.json ...`` takes folds from earlier ``crossval.json`` files of the same recipe, changes,
split and lesion-free tests instead of training them again (their models need not exist any more), so a
cross-validation longer than one sitting is completed piece by piece; ``crossval.md`` names the carried folds.
A fold named in ``--folds`` is run (or, when its run is finished, only evaluated) again and replaces its carried
result: how a fold scored before PO was measured gets its PO.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import statistics
import sys
from collections.abc import Sequence
from dataclasses import asdict, fields
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from COVIDLesionSegLib.checkpoints import atomic_output, load_checkpoint, locate_model
from COVIDLesionSegLib.predictor import Predictor
from COVIDLesionSegLib.preprocessing import FIELDS_OF_VIEW

from .augment import AUGMENT_MODES
from .config import DICE_MODES, TrainConfig
from .evaluate import COUNT_NAMES, evaluate_checkpoint, metrics_from_counts, nan_to_none
from .model_card import guard_rails_words, healthy_ct_check, held_out_negative_cases, shifted_input_scores, trained_on
from .negatives import NegativeCase
from .reproduce import format_duration, format_number, markdown_table, pyplot, save_figure, train_or_resume, training_record
from .splits import make_split
from .validate_po import VolumeResult, agreement, agreement_text, validate_fold

logger = logging.getLogger(__name__)
REPORTED_METRICS = ("F1", "Pc", "Sen", "Sp", "IoU")
# TrainConfig fields the command line may change
CLI_CHANGES = ("max_steps", "final_lr_steps", "final_lr", "augment", "dice_weight", "dice_mode", "low_resolution", "weight_average_decay",
               "negative_fraction", "dependent_density", "thick_slices", "coarse_reconstructions", "field_of_view", "vertical_flip",
               "heavy_disease_repeat", "low_resolution_min_scale", "seed")
HEALTHY_CT_FIELDS = (
    "file", "false_lesion_ml", "false_lesion_ml_off_tumour", "slices_with_false_lesion", "lung_ml", "false_percent_opacity"
)


def fold_config(recipe: dict, data_dir: str | Path, runs_dir: str | Path, fold: int, num_folds: int, changes: dict) -> TrainConfig:
    """``recipe`` (a checkpoint's ``train_config``) with ``changes`` (TrainConfig fields), retargeted to
    patient-kfold fold ``fold`` in ``RUNS/fold<fold>``."""
    values = {**recipe, **changes, "data_dir": str(data_dir), "output_dir": str(Path(runs_dir) / f"fold{fold}")}
    values["split"] = {**recipe.get("split", {}), "kind": "patient-kfold", "fold": fold, "num_folds": num_folds, "holdout_groups": []}
    return TrainConfig.from_dict(values)


def fold_stages(recipe: dict, data_dir: str | Path, runs_dir: str | Path, fold: int, num_folds: int, changes: dict) -> list[TrainConfig]:
    """The training runs of fold ``fold``, in order. A fine-tuning recipe (``init_from``, with the first stage's
    ``init_recipe``) gives two: its first stage in ``RUNS/stage1/fold<k>`` with the step budget less the
    fine-tuning steps, then the fine-tuning from that stage's best checkpoint in ``RUNS/fold<k>``."""
    if not recipe.get("init_from"):
        return [fold_config(recipe, data_dir, runs_dir, fold, num_folds, changes)]
    if not recipe.get("init_recipe"):
        raise ValueError("the recipe fine-tunes a checkpoint but does not record that checkpoint's recipe (init_recipe)")
    if recipe["init_recipe"].get("init_from"):
        raise ValueError("recipes of more than two stages are not supported")
    stage1_changes = {**changes}
    if "max_steps" in changes:
        stage1_changes["max_steps"] = changes["max_steps"] - recipe["max_steps"]
        if stage1_changes["max_steps"] < 1:
            raise ValueError(f"a budget of {changes['max_steps']} steps leaves nothing before the {recipe['max_steps']} fine-tuning steps")
    stage1 = fold_config(recipe["init_recipe"], data_dir, Path(runs_dir) / "stage1", fold, num_folds, stage1_changes)
    tuning = {**recipe, "init_from": str(Path(stage1.output_dir) / "best.safetensors"), "init_recipe": None}
    return [stage1, fold_config(tuning, data_dir, runs_dir, fold, num_folds, {k: v for k, v in changes.items() if k != "max_steps"})]


def select(values: dict, keys: Sequence[str]) -> dict:
    return {key: values[key] for key in keys}


def summarise(values: Sequence[float | None]) -> dict:
    """Mean and sample SD of the defined ``values`` (None/NaN left out), with how many entered."""
    defined = [value for value in values if value is not None and not np.isnan(value)]
    return {
        "mean": statistics.fmean(defined) if defined else None,
        "sd": statistics.stdev(defined) if len(defined) > 1 else None,
        "n": len(defined),
    }


def lesion_free_tests(config: TrainConfig, folder: str | Path | None = None, patients: Sequence[str] | None = None) -> list[NegativeCase]:
    """The lesion-free volumes a fold model is tested on: ``patients`` (default: the recipe's held-out ones) of
    ``folder`` (default: the recipe's lesion-free folder); refused where the fold trained on one of them."""
    patients = list(config.negative_holdout if patients is None else patients)
    trained = trained_on(config, patients)
    if trained:
        raise ValueError(f"{config.output_dir}: trained on the lesion-free patients {trained}; they cannot test it")
    return held_out_negative_cases(folder or config.negatives_dir, patients)


def fold_result(config: TrainConfig, device: str, lesion_free: Sequence[NegativeCase]) -> dict:
    """Evaluate the fold's best checkpoint on its test patients and on the ``lesion_free`` volumes; return its
    groups, training and metrics."""
    run_dir = Path(config.output_dir)
    split = make_split(config.split, config.data_dir)
    evaluation = evaluate_checkpoint(run_dir / "best.safetensors", config.data_dir, run_dir / "test", device=device)
    predictor = Predictor.from_checkpoint(run_dir / "best.safetensors", device)
    test_volumes = list(dict.fromkeys(record.volume_id for record in split.test))
    healthy = healthy_ct_check(predictor)
    percent_opacity = validate_fold(predictor, test_volumes, Path(config.data_dir), str(run_dir / "best.safetensors"))
    return {
        "fold": config.split.fold,
        "date": datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "guard_rails": predictor.guard_rails.to_dict(),
        "test_groups": sorted({record.split_group for record in split.test}),
        "validation_groups": sorted({record.split_group for record in split.val}),
        "slices": {"train": len(split.train), "val": len(split.val), "test": len(split.test)},
        "training": training_record(run_dir),
        "test": evaluation["channels"],
        "shifted_inputs_lesion_dice": shifted_input_scores(predictor, Path(config.data_dir), test_volumes),
        "healthy_ct": select(healthy, HEALTHY_CT_FIELDS),
        "held_out_lesion_free": [select(healthy_ct_check(predictor, case), HEALTHY_CT_FIELDS) for case in lesion_free],
        "percent_opacity": [asdict(result) for result in percent_opacity],
    }


def carried_folds(paths: Sequence[str | Path], recipe: dict, changes: dict, num_folds: int, data_dir: str | Path,
                  lesion_free_patients: Sequence[str] | None) -> list[dict]:
    """The fold results of earlier ``crossval.json`` files, each refused unless it ran the same ``recipe`` with the
    same ``changes``, split and lesion-free test patients; a fold carried twice is refused. Each fold records the
    file it came from (``carried_from``)."""
    folds: dict[int, dict] = {}
    for path in paths:
        try:
            earlier = json.loads(Path(path).read_text(encoding="utf-8"))
            source = (earlier["recipe"]["train_config"], earlier["recipe"]["changes"], earlier["split"]["num_folds"])
            patients = earlier["lesion_free_tests"]["patients"]
            earlier_folds = earlier["folds"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path}: not a readable crossval.json ({error})") from None
        if source != (recipe, changes, num_folds):
            raise ValueError(f"{path}: ran another recipe, other changes or another number of folds; it cannot be carried")
        if list(patients or []) != list(lesion_free_patients or []):
            raise ValueError(f"{path}: tested on the lesion-free patients {patients}, not {lesion_free_patients}")
        for fold in earlier_folds:
            expected = make_split(fold_config(recipe, data_dir, ".", fold["fold"], num_folds, changes).split, data_dir).test
            if sorted({record.split_group for record in expected}) != fold["test_groups"]:
                raise ValueError(f"{path}: fold {fold['fold']} tested other patients than this split's; other data?")
            if fold["fold"] in folds:
                raise ValueError(f"fold {fold['fold']} is in {folds[fold['fold']]['carried_from']['file']} and in {path}")
            folds[fold["fold"]] = {**fold, "carried_from": {"file": str(path), "date": fold.get("date", earlier["date"])}}
    return list(folds.values())


def aggregate(folds: list[dict]) -> dict:
    """Per channel: counts pooled over every test pixel of every fold, mean ± SD over folds and over volumes.
    Then mean ± SD over folds of the shifted-input lesion Dice and of the false lesion volume on the healthy CT."""
    result = {"channels": {}}
    for channel in folds[0]["test"]:
        counts = np.sum([[fold["test"][channel]["counts"][name] for name in COUNT_NAMES] for fold in folds], axis=0)
        volumes = [volume for fold in folds for volume in fold["test"][channel]["per_volume"].values()]
        result["channels"][channel] = {
            "pooled_over_folds": metrics_from_counts(counts),
            "fold_pooled": {metric: summarise([fold["test"][channel]["pooled"][metric] for fold in folds]) for metric in REPORTED_METRICS},
            "per_volume": {metric: summarise([volume[metric] for volume in volumes]) for metric in REPORTED_METRICS},
        }
    result["shifted_inputs_lesion_dice"] = {
        rendering: summarise([fold["shifted_inputs_lesion_dice"][rendering] for fold in folds])
        for rendering in folds[0]["shifted_inputs_lesion_dice"]
    }
    result["healthy_ct_false_lesion_ml"] = summarise([fold["healthy_ct"]["false_lesion_ml"] for fold in folds])
    with_po = [fold for fold in folds if "percent_opacity" in fold]  # folds run before PO was measured have none
    volumes = [VolumeResult(**volume) for fold in with_po for volume in fold["percent_opacity"]]
    result["percent_opacity"] = {**agreement(volumes), "folds": [fold["fold"] for fold in with_po]}
    for key, measure in (("held_out_lesion_free_false_lesion_ml", "false_lesion_ml"),
                         ("held_out_lesion_free_off_tumour_ml", "false_lesion_ml_off_tumour")):
        result[key] = {
            entry["file"]: summarise(
                [check.get(measure) for fold in folds for check in fold["held_out_lesion_free"] if check["file"] == entry["file"]]
            )
            for entry in folds[0].get("held_out_lesion_free", [])
        }
    return result


def per_volume_rows(folds: list[dict]) -> list[dict]:
    """One entry per test volume: its fold, slices and per-channel metrics (pixels pooled within the volume)."""
    rows = []
    for fold in folds:
        channels = fold["test"]
        percent_opacity = {volume["volume_id"]: volume for volume in fold.get("percent_opacity", [])}
        for volume_id, first_channel in next(iter(channels.values()))["per_volume"].items():
            entry = {"volume_id": volume_id, "fold": fold["fold"], "slices": first_channel["slices"]}
            for channel, summary in channels.items():
                entry[channel] = {metric: summary["per_volume"][volume_id][metric] for metric in REPORTED_METRICS}
            if volume_id in percent_opacity:
                volume = percent_opacity[volume_id]
                entry["percent_opacity"] = {"reference": volume["reference_percent_opacity"], "model": volume["model_percent_opacity"]}
            rows.append(entry)
    return rows


def plot_validation(folds: list[dict], path: Path) -> None:
    """Validation loss (left) and Dice (right) against the step, one line per fold; ● marks the kept checkpoint.
    Folds whose results hold no training log (carried from a file written before the log was kept) are left out."""
    plt = pyplot()
    figure, (loss_axes, dice_axes) = plt.subplots(1, 2, figsize=(10, 4))
    for fold in (fold for fold in folds if "log" in fold["training"]):
        log = [row for row in fold["training"]["log"] if not np.isnan(row["val_loss"])]
        steps = [row["step"] for row in log]
        line = loss_axes.plot(steps, [row["val_loss"] for row in log], marker=".", label=f"fold {fold['fold']}")[0]
        dice_axes.plot(steps, [row["val_dice"] for row in log], marker=".", color=line.get_color())
        best = next(row for row in log if row["step"] == fold["training"]["best_step"])
        loss_axes.plot(best["step"], best["val_loss"], "o", color=line.get_color(), markersize=9, fillstyle="none")
        dice_axes.plot(best["step"], best["val_dice"], "o", color=line.get_color(), markersize=9, fillstyle="none")
    loss_axes.set(xlabel="optimizer step", ylabel="validation loss (BCE + soft Dice, both channels)", ylim=(0, None))
    dice_axes.set(xlabel="optimizer step", ylabel="validation Dice", ylim=(0, 1))
    for axes in (loss_axes, dice_axes):
        axes.grid(True, alpha=0.3)
    loss_axes.legend()
    figure.suptitle("Validation groups of each fold (○ = checkpoint kept: lowest validation loss)")
    figure.tight_layout()
    save_figure(figure, path)


def crossval(
    recipe_source: str,
    data_dir: str | Path,
    runs_dir: str | Path,
    output_dir: str | Path,
    num_folds: int = 5,
    changes: dict | None = None,
    folds: Sequence[int] | None = None,
    device: str = "auto",
    command: str = "",
    lesion_free_dir: str | Path | None = None,
    lesion_free_patients: Sequence[str] | None = None,
    carry: Sequence[str | Path] = (),
) -> dict:
    """Train (or resume, or skip) and evaluate the ``folds`` (default: all not carried) of the recipe with ``changes``
    (TrainConfig fields, e.g. ``{"max_steps": 1500}``), add the folds of the ``carry`` files (:func:`carried_folds`);
    write ``crossval.json``, ``.md`` and the figure. The fold models are tested on :func:`lesion_free_tests` of
    ``lesion_free_dir`` and ``lesion_free_patients``."""
    changes = dict(changes or {})
    path, name = locate_model(recipe_source)
    recipe = load_checkpoint(path).train_config
    if not recipe:
        raise ValueError(f"{path}: the checkpoint records no train_config, so it has no recipe to cross-validate")
    carried = carried_folds(carry, recipe, changes, num_folds, data_dir, lesion_free_patients)
    if folds is not None:  # a fold named to run replaces its carried result
        for fold in carried:
            if fold["fold"] in folds:
                logger.info("fold %d is run again: its result from %s is replaced", fold["fold"], fold["carried_from"]["file"])
        carried = [fold for fold in carried if fold["fold"] not in folds]
    carried_numbers = sorted(fold["fold"] for fold in carried)
    folds = sorted(set(range(num_folds)) - set(carried_numbers)) if folds is None else sorted(set(folds))
    if not folds + carried_numbers or not all(0 <= fold < num_folds for fold in folds):
        raise ValueError(f"folds must be in 0..{num_folds - 1}, got {folds}")
    split = fold_config(recipe, data_dir, runs_dir, (folds + carried_numbers)[0], num_folds, changes).split
    configs = []  # each fold's last stage: the model that is tested
    for fold in folds:
        stages = fold_stages(recipe, data_dir, runs_dir, fold, num_folds, changes)
        for config in stages:
            logger.info("fold %d: %s (%s)", fold, train_or_resume(config), config.output_dir)
        configs.append(stages[-1])
    fold_results = [fold_result(config, device, lesion_free_tests(config, lesion_free_dir, lesion_free_patients)) for config in configs]
    fold_results = sorted(fold_results + carried, key=lambda fold: fold["fold"])
    results = nan_to_none(
        {
            "command": command,
            "date": datetime.now().isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "recipe": {"source": name, "train_config": recipe, "changes": changes},
            "split": {
                "kind": "patient-kfold",
                "num_folds": num_folds,
                "seed": split.seed,
                "val_fraction": split.val_fraction,
                "folds_run": [fold["fold"] for fold in fold_results],
                "folds_carried": carried_numbers,
            },
            "lesion_free_tests": {"folder": str(lesion_free_dir) if lesion_free_dir else None, "patients": lesion_free_patients},
            "folds": fold_results,
            "volumes": per_volume_rows(fold_results),
            "overall": aggregate(fold_results),
        }
    )
    output_dir = Path(output_dir)
    with atomic_output(output_dir / "crossval.json") as temporary:
        temporary.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    plot_validation(fold_results, output_dir / "crossval_validation.png")
    with atomic_output(output_dir / "crossval.md") as temporary:
        temporary.write_text(render_markdown(results), encoding="utf-8")
    return results


def mean_sd(summary: dict, digits: int = 3) -> str:
    """"mean ± SD" of a :func:`summarise` result; "—" when nothing was defined."""
    if summary["mean"] is None:
        return format_number(None)
    return f"{format_number(summary['mean'], digits)} ± {format_number(summary['sd'], digits)}"


def render_markdown(results: dict) -> str:
    """``crossval.md`` from ``crossval.json`` alone."""
    recipe, overall = results["recipe"], results["overall"]
    config = recipe["train_config"]
    channels = list(overall["channels"])
    defaults = {field.name: field.default for field in fields(TrainConfig)}  # a field the recipe predates has its default
    changed = ", ".join(f"**{name} {value}** (recipe: {config.get(name, defaults[name])})" for name, value in recipe["changes"].items())
    split = results["split"]
    folds_text = (
        f"Patient-level {split['num_folds']}-fold cross-validation"
        if len(split["folds_run"]) == split["num_folds"]
        else f"Fold {', '.join(map(str, split['folds_run']))} of a patient-level {split['num_folds']}-fold cross-validation"
    )
    from_scratch = " (trained from scratch: no ImageNet weights)" if config.get("encoder_weights") == "none" else ""
    lines = [
        f"# {folds_text} of `{recipe['source']}`'s recipe",
        "",
        f"*Generated by `{results['command']}` on {results['date']} (torch {results['torch']}).*",
        "",
        f"Recipe: the `train_config` stored in `{recipe['source']}` — `{config.get('model')}`, encoder weights "
        f"`{config.get('encoder_weights')}`{from_scratch}, channels {', '.join(config.get('channels', []))}, "
        f"{config.get('image_size')}², augmentation `{config.get('augment')}`, BCE + {config.get('dice_weight')} × soft Dice, "
        f"Adam lr {config.get('learning_rate')}, batch {config.get('batch_size')}, step budget {config.get('max_steps')}, "
        f"checkpoint with the lowest "
        "loss on the fold's validation groups kept. Split: `patient-kfold` over the patient groups (`split_group`), "
        "balanced by slice count; validation groups are drawn from each fold's training groups. Each test volume is "
        "scored by the one model that never saw its patient, on the stored 256² slices (only slices with lesion).",
        "",
        f"Changed from the recipe for this run: {changed or 'nothing'}.",
        "",
        *carried_lines(results["folds"]),
        f"Guard rails of the measurements through the full inference path: {guard_rails_text(results['folds'])}.",
        "",
        "## Over all folds",
        "",
    ]
    rows = []
    for channel in channels:
        summary = overall["channels"][channel]
        pooled = summary["pooled_over_folds"]
        rows.append([f"{channel}, pooled over every test pixel", *(format_number(pooled[m]) for m in REPORTED_METRICS)])
        rows.append([f"{channel}, mean ± SD of the folds' pooled", *(mean_sd(summary["fold_pooled"][m]) for m in REPORTED_METRICS)])
        rows.append(
            [
                f"{channel}, mean ± SD over {summary['per_volume']['F1']['n']} volumes",
                *(mean_sd(summary["per_volume"][m]) for m in REPORTED_METRICS),
            ]
        )
    lines += markdown_table(("", "Dice (F1)", "precision", "sensitivity", "specificity", "IoU"), rows)
    lines += percent_opacity_lines(overall["percent_opacity"], split["folds_run"])
    lines += ["## Per fold", ""]
    rows = []
    for fold in results["folds"]:
        training = fold["training"]
        rows.append(
            [
                str(fold["fold"]),
                ", ".join(fold["test_groups"]),
                f"{fold['slices']['train']} / {fold['slices']['val']} / {fold['slices']['test']}",
                f"{training['best_step']} of {training['steps']}",
                format_number(training["best_val_loss"], 4),
                *(format_number(fold["test"][channel]["pooled"]["F1"]) for channel in channels),
                format_duration(training["seconds"]),
            ]
        )
    lines += markdown_table(
        (
            "fold",
            "test patient groups",
            "slices train / val / test",
            "kept step",
            "val loss",
            *(f"{c} Dice (pooled)" for c in channels),
            "training time",
        ),
        rows,
    )
    lines += ["## Per volume (pixels pooled within the volume)", ""]
    rows = [
        [
            volume["volume_id"],
            str(volume["fold"]),
            str(volume["slices"]),
            *(format_number(volume[channel][m]) for channel in channels for m in ("F1", "Pc", "Sen")),
            *(format_number(volume.get("percent_opacity", {}).get(source), 2) for source in ("reference", "model")),
        ]
        for volume in results["volumes"]
    ]
    header = [f"{channel} {label}" for channel in channels for label in ("Dice", "precision", "sensitivity")]
    lines += markdown_table(("volume", "fold", "slices", *header, "PO reference (%)", "PO model (%)"), rows)
    lines += robustness_section(results)
    kept_last = sum(fold["training"]["best_step"] == fold["training"]["steps"] for fold in results["folds"])
    lines += [
        "## Step budget",
        "",
        "![validation curves](crossval_validation.png)",
        "",
        f"The lowest validation loss came at the last validation of the budget in {kept_last} of {len(results['folds'])} folds "
        "(the figure shows each fold's curves on its validation groups, not its test patients).",
        "",
    ]
    return "\n".join(lines)


def carried_lines(folds: list[dict]) -> list[str]:
    """A paragraph naming the folds taken from earlier results, and when they ran; nothing when none was."""
    carried = [fold for fold in folds if "carried_from" in fold]
    if not carried:
        return []
    sources = "; ".join(f"fold {fold['fold']} from `{fold['carried_from']['file']}` (run on {fold['carried_from']['date']})"
                        for fold in carried)
    return [f"Carried from earlier runs of this same recipe, changes and split, not run again: {sources}.", ""]


def guard_rails_text(folds: list[dict]) -> str:
    """The guard rails of the folds' full-inference-path measurements (PO, renderings, lesion-free CT) in words; a fold
    scored before they were recorded is named as such."""
    settings: dict[str, list[int]] = {}
    for fold in folds:
        text = guard_rails_words(fold.get("guard_rails", {})) or "not recorded (the defaults of the day it ran)"
        settings.setdefault(text, []).append(fold["fold"])
    return "; ".join(f"fold {', '.join(map(str, numbers))}: {text}" for text, numbers in settings.items())


def percent_opacity_paragraph(summary: dict, folds_run: Sequence[int]) -> str:
    """The PO agreement over the folds' test volumes in words, naming folds that did not measure it."""
    missing = sorted(set(folds_run) - set(summary["folds"]))
    paragraph = (
        f"Each fold's model on its test volumes through the full inference path with the guard rails named with the cross-validation (as "
        f"`covidlesionseg-validate-po`; PO over the stored slices, which all hold lesion): over {summary['volumes_compared']} "
        f"volumes, {agreement_text(summary)}."
    )
    if missing:
        paragraph += f" Fold {', '.join(map(str, missing))} ran before PO was measured here, so its volumes are not in these figures."
    return paragraph


def percent_opacity_lines(summary: dict, folds_run: Sequence[int]) -> list[str]:
    """The crossval.md section of :func:`percent_opacity_paragraph`."""
    return ["### Percentage of opacity (PO) per test volume", "", percent_opacity_paragraph(summary, folds_run), ""]


def robustness_section(results: dict) -> list[str]:
    """Each fold's model on inputs unlike its training slices: its test patients re-rendered, and a healthy CT."""
    folds, overall = results["folds"], results["overall"]
    renderings = list(overall["shifted_inputs_lesion_dice"])
    healthy_file = folds[0]["healthy_ct"]["file"]
    negatives = list(overall.get("held_out_lesion_free_false_lesion_ml", {}))
    rows = [
        [
            str(fold["fold"]),
            *(format_number(fold["shifted_inputs_lesion_dice"][name]) for name in renderings),
            format_number(fold["healthy_ct"]["false_lesion_ml"], 1),
            str(fold["healthy_ct"]["slices_with_false_lesion"]),
            format_number(fold["healthy_ct"]["false_percent_opacity"], 2),
            *(with_off_tumour(check["false_lesion_ml"], check.get("false_lesion_ml_off_tumour"), format_number, 1)
              for check in fold.get("held_out_lesion_free", [])),
        ]
        for fold in folds
    ]
    healthy = overall["healthy_ct_false_lesion_ml"]
    off_tumour = overall.get("held_out_lesion_free_off_tumour_ml", {})
    rows.append(
        [
            "mean ± SD",
            *(mean_sd(overall["shifted_inputs_lesion_dice"][name]) for name in renderings),
            mean_sd(healthy, 1),
            "",
            "",
            *(with_off_tumour(overall["held_out_lesion_free_false_lesion_ml"][name], off_tumour.get(name, {"n": 0}), mean_sd, 1)
              for name in negatives),
        ]
    )
    return [
        "## Inputs that look different",
        "",
        "Each fold's model through the full inference path (`Predictor.predict_masks`, as the CLI runs it): its test "
        "patients' slices re-rendered (pooled lesion Dice; see `model_card.py` for the renderings), and "
        f"`{healthy_file}`, a chest CT without COVID-19 in raw HU (slicerio's test data), where every lesion voxel is false"
        + (f", and lesion-free volumes it never trained on ({', '.join(negatives)})." if negatives else "."),
        "",
        *markdown_table(
            ("fold", *renderings, f"{healthy_file} false lesion (mL)", "slices with it", "false PO (%)")
            + tuple(f"{name} false lesion (mL; off the tumour slices)" for name in negatives),
            rows,
        ),
        *(["", "Off the tumour slices: where a lesion-free volume holds a marked lung tumour or nodule (an opacity, but not "
            "COVID-19), its false lesion without the slices that training leaves out (`negatives.tumour_free_slices`)."]
          if negatives else []),
    ]


def with_off_tumour(total, off_tumour, render, digits: int) -> str:
    """"total (off tumour)" of a lesion-free volume, each rendered by ``render``; the total alone where the volume has no
    tumour mask (``off_tumour`` None, or a summary of none)."""
    if off_tumour is None or (isinstance(off_tumour, dict) and not off_tumour["n"]):
        return render(total, digits)
    return f"{render(total, digits)} ({render(off_tumour, digits)})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="covidlesionseg-crossval",
        description=__doc__.splitlines()[0].split(": ", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--recipe", required=True, help="registry name or checkpoint file whose train_config is the recipe")
    parser.add_argument("--data", required=True, help="the covid19-ct-seg-20cases-png256 folder (manifest.csv)")
    parser.add_argument("--runs", required=True, help="folder for the fold runs (fold0 … fold<k-1>); keep it out of the repository")
    parser.add_argument("--output", required=True, help="folder for crossval.json, crossval.md and crossval_validation.png")
    parser.add_argument("--num-folds", type=int, default=5, help="folds over the patient groups (default 5)")
    parser.add_argument("--folds", type=int, nargs="+", metavar="K", help="run only these folds (default: all not carried)")
    group = parser.add_argument_group("changes to the recipe (default: keep it)")
    group.add_argument("--max-steps", type=int, help="step budget")
    group.add_argument("--final-lr-steps", type=int, metavar="N", help="take the last N steps of the budget at --final-lr")
    group.add_argument("--final-lr", type=float, metavar="LR", help="Adam learning rate of those final steps")
    group.add_argument("--augment", choices=AUGMENT_MODES, help="augmentation")
    group.add_argument("--dice-weight", type=float, help="loss = BCE + this × soft Dice")
    group.add_argument("--dice-mode", choices=DICE_MODES, help="soft Dice per slice or pooled over the batch")
    group.add_argument("--low-resolution", type=float, metavar="P", help="share of training slices shown at 0.6–0.9 of their resolution")
    group.add_argument("--weight-average-decay", type=float, metavar="D", help="checkpoints hold a moving average of the weights (decay D)")
    group.add_argument("--negative-fraction", type=float, metavar="F", help="share of each epoch from the recipe's lesion-free slices")
    group.add_argument("--dependent-density", type=float, metavar="P", help="share of lesion-free slices given synthetic dependent density")
    group.add_argument("--thick-slices", type=float, metavar="P", help="share of lesion-free slices shown as 5–10 mm slabs")
    group.add_argument("--coarse-reconstructions", type=float, metavar="P",
                       help="share of lesion-free slices shown as 5–10 mm slabs with 2.5–4 mm pixels")
    group.add_argument("--low-resolution-min-scale", type=float, metavar="S", help="smallest scale of the lower-resolution rendering")
    group.add_argument("--vertical-flip", type=float, metavar="P", help="share of training slices shown upside down")
    group.add_argument("--heavy-disease-repeat", type=int, metavar="R",
                       help="times per epoch a lesion slice with at least 25 %% of its lung lesioned is shown")
    group.add_argument("--field-of-view", choices=FIELDS_OF_VIEW, help="full: the whole slice; body: each volume cut to its body box")
    group.add_argument("--seed", type=int, help="training seed (initialisation, sample order, augmentation; the split keeps its own)")
    parser.add_argument("--carry-folds", nargs="+", default=[], metavar="RESULTS_JSON",
                        help="take folds from these earlier crossval.json files of the same recipe and changes, not training them again "
                             "(a fold also given with --folds is run again and replaces the carried one)")
    group = parser.add_argument_group("lesion-free test volumes (default: the recipe's held-out patients in its own folder)")
    group.add_argument("--lesion-free", metavar="DIR", help="a lesion-free folder (chest-ct-hu-no-covid's layout) to find them in")
    group.add_argument("--lesion-free-patients", nargs="+", metavar="PATIENT", help="these patients (none may be trained on)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    command = shlex.join(["covidlesionseg-crossval", *argv])
    try:
        changes = {name: value for name in CLI_CHANGES if (value := getattr(args, name)) is not None}
        results = crossval(args.recipe, args.data, args.runs, args.output, args.num_folds, changes, args.folds, args.device, command,
                           args.lesion_free, args.lesion_free_patients, args.carry_folds)
    except (OSError, ValueError) as error:
        print(f"ERROR {error}", file=sys.stderr)
        return 1
    for channel, summary in results["overall"]["channels"].items():
        print(
            f"{channel}: Dice pooled over all folds {format_number(summary['pooled_over_folds']['F1'])}, "
            f"folds {mean_sd(summary['fold_pooled']['F1'])}, volumes {mean_sd(summary['per_volume']['F1'])}"
        )
    print(f"wrote {Path(args.output) / 'crossval.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
