"""``covidlesionseg-reproduce``: the paper's Table 3 and Figures 5–7 for the four models, on one split.

::

    covidlesionseg-reproduce --data ../shared/data/covid19-ct-seg-20cases-png256 --split benchmark --fold 0 \\
        --profile cpu --runs runs/reproduce-benchmark-fold0 --output Training/results/benchmark-fold0

Each model trains into ``RUNS/<model>/`` with :func:`~.train.train`. A run that reached its budget is
left as it is and an unfinished one is resumed, so running an interrupted reproduction again continues it.
Then each model's ``best.safetensors`` is evaluated on the split's test slices with
:func:`~.evaluate.evaluate_checkpoint` (into ``RUNS/<model>/test/``). ``OUTPUT`` gets these files, all
generated:

- ``results.json``: every number. The command, date, torch version, device, the profile and how it
  differs from the paper, the split and its warnings, and for each model the training (log, steps, time)
  and the test metrics (pooled, per-slice mean, per volume). Also the all-background baseline, the paper's
  Table 3 and the Figure 7 slices with their Dice;
- ``results.md``: rendered from ``results.json`` alone, so the two always agree;
- ``fig5_training_loss.png`` and ``fig6_validation_loss.png`` (from each run's ``log.csv``), and
  ``fig7_predictions.png`` (CT, label and each model's prediction on the same test slices).

A :class:`Profile` is a named set of :class:`~.config.TrainConfig` fields over its defaults, which are
the paper's protocol. Every profile trains with ``precision="auto"`` (bf16 autocast on CUDA, fp32 on CPU) unless
``--precision`` says otherwise.

On one GPU, ``--jobs 4`` trains the four models at the same time in four processes (each step of these
networks at batch 2 is too small to fill the GPU); ``--time-limit-minutes`` stops all training that long after
it started (each run validates and saves, the results say which runs were stopped, and running the command
again continues them); ``--save-every-seconds`` writes checkpoints at most that often.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import multiprocessing
import os
import shlex
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from COVIDLesionSegLib.checkpoints import atomic_output, load_checkpoint
from COVIDLesionSegLib.models import DISPLAY_NAMES, MODELS
from COVIDLesionSegLib.predictor import Predictor, resolve_device

from .config import PLAIN_ENCODER_MODELS, PRECISIONS, RESNET_ENCODER_MODELS, TrainConfig
from .data import SliceRecord, read_png
from .evaluate import confusion_counts, evaluate_checkpoint, metrics_from_counts, write_summary
from .splits import SPLIT_KINDS, SplitSpec, make_split
from .train import RunControl, check_resumable, train

logger = logging.getLogger(__name__)

TABLE_METRICS = ("Acc", "Pc", "Sen", "Sp", "F1")
PAPER_CITATION = (
    "Ye Duansheng, Hua Yunsong, “Research on Image Segmentation of Pneumonia Based on Deep Learning” "
    "(基于深度学习的肺炎影像分割研究), Hans Publishers, 2022, Table 3 (10 test slices drawn by slice; "
    "pooled or per-slice not stated)"
)
PAPER_TABLE3 = {
    "unet": {"Acc": 0.982, "Pc": 0.695, "Sen": 0.769, "Sp": 0.965, "F1": 0.731},
    "resunet": {"Acc": 0.983, "Pc": 0.766, "Sen": 0.738, "Sp": 0.986, "F1": 0.752},
    "attunet": {"Acc": 0.986, "Pc": 0.770, "Sen": 0.897, "Sp": 0.971, "F1": 0.829},
    "resattunet": {"Acc": 0.994, "Pc": 0.811, "Sen": 0.929, "Sp": 0.995, "F1": 0.867},
}
FIGURE7_SLICES = 4
THRESHOLD = 0.5  # the probability threshold evaluate_checkpoint uses


@dataclass(frozen=True)
class Profile:
    """A named training schedule. ``settings`` are TrainConfig fields set over its defaults (the paper's protocol)."""

    name: str
    summary: str
    settings: dict = field(default_factory=dict)


PROFILES = {
    "paper": Profile(
        "paper",
        "the paper's protocol: 256² inputs, 200 epochs, batch 2, Adam 1e-4, BCE, no augmentation, ImageNet-pretrained "
        "ResNet34 encoders. Meant for a GPU: on a 2-core CPU, Unet alone would need about 34 h.",
    ),
    "cpu": Profile(
        "cpu",
        "cut down to finish on a 2-core CPU. 128² inputs instead of 256². 600 optimizer steps per model (1,200 slices, "
        "the same for the four models) instead of 200 epochs. ResNet34 encoders trained from scratch (no ImageNet weights). "
        "Validation every 100 steps instead of after each epoch. As in the paper: batch 2, Adam 1e-4, BCE, no augmentation. "
        "Estimate: about 25 min of training per split for the four models on free cores (ResAttUnet trains about 12 slices/s "
        "at 128², and Unet and Attention-Unet cost about 6× as much), plus a few minutes of validation and evaluation.",
        {"image_size": 128, "encoder_weights": "none", "max_steps": 600, "validate_every_steps": 100},
    ),
}


def model_config(
    model: str, profile: Profile, data_dir: str | Path, runs_dir: str | Path, split: SplitSpec, overrides: dict
) -> TrainConfig:
    """The TrainConfig of ``model`` under ``profile`` and ``overrides``, with ``RUNS/<model>`` as its run folder.

    A ``model_widths`` override applies only to the plain-encoder models."""
    values = {"precision": "auto", **profile.settings, **overrides}
    if model not in PLAIN_ENCODER_MODELS:
        values.pop("model_widths", None)
    return TrainConfig(data_dir=str(data_dir), output_dir=str(Path(runs_dir) / model), model=model, split=split, **values)


def run_is_finished(config: TrainConfig) -> bool:
    """Whether the run's saved progress (``last.state.json``) reached its epochs or its step budget."""
    progress = json.loads((Path(config.output_dir) / "last.state.json").read_text())["progress"]
    return progress["epoch"] >= config.epochs or (config.max_steps is not None and progress["step"] >= config.max_steps)


def train_or_resume(config: TrainConfig, control: RunControl | None = None) -> str:
    """Train the run, resume it if it is unfinished, or leave it if it is finished. Returns which of the three happened
    (and whether ``control``'s deadline stopped it)."""
    run_dir = Path(config.output_dir)
    if not (run_dir / "last.state.json").is_file():
        outcome, result = "trained", train(config, control=control)
    else:
        try:
            check_resumable(TrainConfig.load(run_dir / "config.json"), config)
        except ValueError as error:
            raise ValueError(f"{run_dir} holds a different run ({error}); choose another --runs folder") from None
        if run_is_finished(config):
            return "finished earlier"
        outcome, result = "resumed", train(config, resume=True, control=control)
    if result["stopped"] == "signal":
        raise KeyboardInterrupt(f"{run_dir}: training stopped; run the same command again to resume it")
    if result["stopped"] == "time_limit":
        outcome += f", stopped by the time limit at step {result['step']}"
    return outcome


def train_worker(config: TrainConfig, control: RunControl) -> str:
    """:func:`train_or_resume` in a worker process (``--jobs``), logging with the model's name."""
    logging.basicConfig(level=logging.INFO, format=f"[{config.model}] %(message)s", force=True)  # a worker trains several
    return train_or_resume(config, control)


def train_all(configs: dict[str, TrainConfig], control: RunControl, jobs: int) -> dict[str, str]:
    """Train (or resume, or skip) each run, ``jobs`` at a time; ``{model: error}`` for the runs that failed."""
    failures: dict[str, str] = {}
    if jobs <= 1:
        for model, config in configs.items():
            logger.info("%s: %s (%s)", DISPLAY_NAMES[model], train_or_resume(config, control), config.output_dir)
        return failures
    quiet = RunControl(control.deadline, control.save_every_seconds, progress_bar=False)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {model: pool.submit(train_worker, config, quiet) for model, config in configs.items()}
        for model, future in futures.items():
            try:
                logger.info("%s: %s (%s)", DISPLAY_NAMES[model], future.result(), configs[model].output_dir)
            except KeyboardInterrupt:
                raise
            except Exception as error:  # one model's failure (out of memory, say) leaves the others' results
                logger.error("%s: training failed: %s: %s", DISPLAY_NAMES[model], type(error).__name__, error)
                failures[model] = f"{type(error).__name__}: {error}"
    return failures


def read_log(path: Path) -> list[dict]:
    """``log.csv`` rows as numbers."""
    with open(path, newline="") as stream:
        return [{name: float(value) for name, value in row.items()} for row in csv.DictReader(stream)]


def training_record(run_dir: Path) -> dict:
    """What the run folder says about its training: size, budget reached, best checkpoint, time, log."""
    info = json.loads((run_dir / "run_info.json").read_text())
    progress = json.loads((run_dir / "last.state.json").read_text())["progress"]
    log = read_log(run_dir / "log.csv")
    config = TrainConfig.load(run_dir / "config.json")
    return {
        "run_dir": str(run_dir),
        "encoder_weights": config.encoder_weights,
        "image_size": config.image_size,
        "parameters": info["parameters"],
        "device": info["device"],
        "steps": progress["step"],
        "epochs": log[-1]["epoch"],
        "steps_per_epoch": info["steps_per_epoch"],
        "best_step": progress["best_step"],
        "best_val_loss": progress["best_val_loss"],
        "seconds": round(sum(row["seconds"] for row in log), 1),
        "differences_from_paper": info["differences_from_paper"],
        "precision": info.get("precision", "fp32"),  # runs made before mixed precision: fp32
        "data_on_device": info.get("data_on_device", {"train": False, "val": False}),
        "log": log,
    }


def evenly_spaced(length: int, count: int) -> list[int]:
    """``count`` distinct indices spread over ``range(length)`` from first to last (``count`` ≤ ``length``)."""
    return [int(index) for index in np.linspace(0, length - 1, count).round()] if count else []


def figure_slices(records: Sequence[SliceRecord], count: int = FIGURE7_SLICES) -> list[SliceRecord]:
    """``count`` test slices for Figure 7, chosen deterministically.

    Takes the middle slice of evenly spaced volumes. If there are fewer volumes than ``count``, it adds
    slices evenly spaced over the rest. The result is in (volume, position) order."""
    ordered = sorted(records, key=lambda record: (record.volume_id, record.position))
    by_volume: dict[str, list[SliceRecord]] = {}
    for record in ordered:
        by_volume.setdefault(record.volume_id, []).append(record)
    volumes = sorted(by_volume)
    picked_volumes = [volumes[index] for index in evenly_spaced(len(volumes), min(count, len(volumes)))]
    chosen = [by_volume[volume][len(by_volume[volume]) // 2] for volume in picked_volumes]
    rest = [record for record in ordered if record not in chosen]
    chosen += [rest[i] for i in evenly_spaced(len(rest), min(count - len(chosen), len(rest)))]
    return sorted(chosen, key=lambda record: (record.volume_id, record.position))


def predict_figure_slices(records: Sequence[SliceRecord], checkpoints: dict[str, Path], device: str) -> dict[str, np.ndarray]:
    """``{model: bool lesion masks [N, 256, 256]}``: each checkpoint run by the core's Predictor on the stored slices,
    thresholded at 0.5 like the evaluation."""
    images = np.stack([read_png(record.image) for record in records])
    masks = {}
    for model, path in checkpoints.items():
        predictor = Predictor(load_checkpoint(path), device=device)
        masks[model] = predictor.predict_probabilities(images, preprocessed=True)["lesion"] > THRESHOLD
    return masks


def slice_dice(predictions: np.ndarray, labels: np.ndarray) -> list[float]:
    """Dice (F1) of each slice of bool ``[N, H, W]`` predictions against labels."""
    counts = confusion_counts(torch.from_numpy(predictions), torch.from_numpy(labels)).numpy()
    return [metrics_from_counts(row)["F1"] for row in counts]


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: Path) -> None:
    with atomic_output(path) as temporary:
        figure.savefig(temporary, format="png", dpi=110)
    pyplot().close(figure)


def plot_loss_figure(models: dict[str, dict], column: str, title: str, path: Path) -> None:
    """One loss curve per model (``column`` of each run's log) against optimizer steps, with epochs on top."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for model, result in models.items():
        log = result["training"]["log"]
        axes.plot([row["step"] for row in log], [row[column] for row in log], marker=".", label=DISPLAY_NAMES[model])
    steps_per_epoch = next(iter(models.values()))["training"]["steps_per_epoch"]
    top = axes.secondary_xaxis("top", functions=(lambda step: step / steps_per_epoch, lambda epoch: epoch * steps_per_epoch))
    top.set_xlabel("epoch")
    axes.set(xlabel="optimizer step", ylabel="loss", ylim=(0, None), title=title)
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    save_figure(figure, path)


def plot_prediction_grid(figure7: list[dict], images: np.ndarray, labels: np.ndarray, masks: dict[str, np.ndarray], path: Path) -> None:
    """Figure 7: one row per slice. Columns: CT, label, then each model's prediction with its Dice on the slice."""
    plt = pyplot()
    columns = 2 + len(masks)
    figure, axes = plt.subplots(len(figure7), columns, figsize=(2 * columns, 2.1 * len(figure7)), squeeze=False)
    for row, entry in enumerate(figure7):
        cells = axes[row]
        show_panel(cells[0], images[row], 255, "CT" if row == 0 else "")
        show_panel(cells[1], labels[row], 1, "label" if row == 0 else "")
        for cell, (model, model_masks) in zip(cells[2:], masks.items(), strict=True):
            show_panel(cell, model_masks[row], 1, DISPLAY_NAMES[model] if row == 0 else "")
            cell.set_xlabel(f"Dice {format_number(entry['dice'][model], 2)}", fontsize=8)
        cells[0].set_ylabel(f"{entry['volume_id']}\nslice {entry['position']}", fontsize=7)
    figure.tight_layout()
    save_figure(figure, path)


def show_panel(cell, image: np.ndarray, maximum: int, title: str) -> None:
    cell.imshow(image, cmap="gray", vmin=0, vmax=maximum, interpolation="nearest")
    cell.set_xticks([])
    cell.set_yticks([])
    cell.set_title(title)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({os.cpu_count()} cores)"


def reproduce(
    data_dir: str | Path,
    output_dir: str | Path,
    runs_dir: str | Path,
    split: SplitSpec,
    profile: Profile,
    models: Sequence[str] = tuple(MODELS),
    overrides: dict | None = None,
    device: str = "auto",
    command: str | None = None,
    jobs: int = 1,
    time_limit_minutes: float | None = None,
    save_every_seconds: float = 0.0,
) -> dict:
    """Train (or resume, or skip) and evaluate ``models`` on ``split``, then write results and figures to ``output_dir``.

    ``overrides`` are TrainConfig fields applied over the profile (e.g. ``encoder_weights``, ``max_steps``).
    ``command`` is the command line recorded in the results. ``jobs`` models train at a time (processes on the same
    device); ``time_limit_minutes`` stops all training that long after it starts (a resumable cut);
    ``save_every_seconds`` throttles checkpoint writes (:class:`~.train.RunControl`). A model whose training fails
    is left out of the results, which name it and the error. Returns the contents of ``results.json``."""
    overrides = overrides or {}
    configs = {
        model: model_config(model, profile, data_dir, runs_dir, split, {**overrides, "device": device})
        for model in MODELS
        if model in models
    }
    deadline = None if time_limit_minutes is None else time.time() + 60 * time_limit_minutes
    failures = train_all(configs, RunControl(deadline, save_every_seconds), jobs)
    configs = {model: config for model, config in configs.items() if model not in failures}
    if not configs:
        raise RuntimeError(f"every model's training failed: {failures}")

    made = make_split(split, data_dir)
    device_type = resolve_device(device).type
    results = {
        "command": command or "COVIDLesionSegTraining.reproduce.reproduce(...) called from Python",
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "device": describe_device(resolve_device(device)),
        "data_dir": str(data_dir),
        "profile": {"name": profile.name, "summary": profile.summary, "settings": profile.settings, "overrides": overrides},
        "execution": {"jobs": jobs, "time_limit_minutes": time_limit_minutes, "save_every_seconds": save_every_seconds},
        "failed": failures,
        "differences_from_paper": shared_differences(configs.values(), device_type),
        "split": made.summary(),
        "paper_table3": {"citation": PAPER_CITATION, "models": {model: PAPER_TABLE3[model] for model in configs}},
        "models": {model: model_results(config, device) for model, config in configs.items()},
    }
    results["all_background_baseline"] = next(iter(results["models"].values()))["test"]["all_background_baseline"]

    chosen = figure_slices(made.test)
    labels = np.stack([read_png(record.lesion_mask) > 0 for record in chosen])
    masks = predict_figure_slices(
        chosen, {model: Path(config.output_dir) / "best.safetensors" for model, config in configs.items()}, device
    )
    results["figure7"] = figure7_entries(chosen, labels, masks)
    return write_outputs(results, chosen, labels, masks, Path(output_dir))


def model_results(config: TrainConfig, device: str) -> dict:
    """The run's training record and its ``best.safetensors`` evaluated on the split's test slices (``RUN/test/``)."""
    run_dir = Path(config.output_dir)
    evaluation = evaluate_checkpoint(run_dir / "best.safetensors", config.data_dir, run_dir / "test", device=device)
    return {"training": {**training_record(run_dir), "finished": run_is_finished(config)}, "test": evaluation["channels"]["lesion"]}


def figure7_entries(chosen: Sequence[SliceRecord], labels: np.ndarray, masks: dict[str, np.ndarray]) -> list[dict]:
    """Each Figure 7 slice with each model's Dice on it."""
    dice = {model: slice_dice(model_masks, labels) for model, model_masks in masks.items()}
    return [
        {"volume_id": record.volume_id, "position": record.position, "dice": {model: dice[model][row] for model in masks}}
        for row, record in enumerate(chosen)
    ]


def write_outputs(results: dict, chosen: Sequence[SliceRecord], labels: np.ndarray, masks: dict[str, np.ndarray], output_dir: Path) -> dict:
    """The three figures, ``results.json``, then ``results.md`` rendered from what ``results.json`` holds; returns that."""
    output_dir.mkdir(parents=True, exist_ok=True)
    plot_loss_figure(results["models"], "train_loss", "Figure 5: training loss", output_dir / "fig5_training_loss.png")
    plot_loss_figure(results["models"], "val_loss", "Figure 6: validation loss", output_dir / "fig6_validation_loss.png")
    images = np.stack([read_png(record.image) for record in chosen])
    plot_prediction_grid(results["figure7"], images, labels, masks, output_dir / "fig7_predictions.png")
    results = json.loads(write_summary(results, output_dir / "results.json").read_text())  # NaN → null, as the markdown shows it
    with atomic_output(output_dir / "results.md") as temporary:
        temporary.write_text(render_markdown(results), encoding="utf-8")
    logger.info("wrote %s and %s", output_dir / "results.md", output_dir / "results.json")
    return results


def shared_differences(configs, device_type: str | None = None) -> list[str]:
    """Each model's departures from the paper's protocol, once each and in order. Which model it is does not count:
    Table 3 compares the four. ``device_type`` resolves ``precision="auto"``."""
    differences: list[str] = []
    for config in configs:
        for line in config.differences_from_paper(device_type):
            if not line.startswith("model: ") and line not in differences:
                differences.append(line)
    return differences


def format_number(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def format_duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 60 else f"{seconds / 60:.1f} min"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(row) + " |" for row in rows), ""]


def render_markdown(results: dict) -> str:
    """``results.md`` from the contents of ``results.json``."""
    sections = (setup_section, table3_section, per_volume_section, training_section, figures_section)
    lines = [f"# Table 3 and Figures 5–7 reproduced: {results['split']['spec']['kind']} split, {results['profile']['name']} profile", ""]
    for section in sections:
        lines += section(results)
    return "\n".join(lines)


def setup_section(results: dict) -> list[str]:
    split, models = results["split"], results["models"]
    lines = [
        "Generated by `covidlesionseg-reproduce`. Do not edit by hand: run the command again.",
        "",
        f"- command: `{results['command']}`",
        f"- date: {results['date']}; torch {results['torch']}; device {results['device']}",
        f"- data: `{results['data_dir']}`",
        f"- profile `{results['profile']['name']}`: {results['profile']['summary']}",
    ]
    if results["profile"]["overrides"]:
        overrides = ", ".join(f"{name} {value}" for name, value in results["profile"]["overrides"].items())
        lines.append(f"- given on the command line, replacing the profile's values: {overrides}")
    lines.append("")
    from_scratch = [DISPLAY_NAMES[m] for m in models if m in RESNET_ENCODER_MODELS and models[m]["training"]["encoder_weights"] == "none"]
    if from_scratch:
        lines += [
            f"**From-scratch encoders.** {' and '.join(from_scratch)} were trained with randomly initialised ResNet34 encoders. "
            "No ImageNet weights were used here. The paper used ImageNet-pretrained encoders.",
            "",
        ]
    lines += cut_down_note(models)
    lines += execution_note(results)
    lines += ["Differences from the paper's protocol (one line each):", ""]
    lines += [f"- {line}" for line in results["differences_from_paper"]] or ["- none"]
    lines += ["", f"Split: {describe_split(split)}.", ""]
    lines += [f"- **warning:** {warning}" for warning in split["warnings"]] or ["- no warnings for this split"]
    return [*lines, ""]


def cut_down_note(models: dict) -> list[str]:
    """A warning paragraph where the models trained for fewer epochs or at a smaller size than the paper's."""
    paper = TrainConfig(data_dir="", output_dir="")
    training = [result["training"] for result in models.values()]
    if all(item["epochs"] >= paper.epochs and item["image_size"] == paper.image_size for item in training):
        return []
    schedules = sorted({f"{item['steps']} optimizer steps ({item['epochs']:g} epochs) at {item['image_size']}²" for item in training})
    return [
        f"**Cut-down schedule.** The models trained for {' or '.join(schedules)}, not the paper's {paper.epochs} epochs at "
        f"{paper.image_size}². These numbers show what this schedule reaches. They are not a like-for-like test of the paper's.",
        "",
    ]


def execution_note(results: dict) -> list[str]:
    """How the runs were executed (parallel jobs, time limit), which runs the time limit stopped, which failed."""
    execution = results.get("execution") or {}
    lines = []
    if execution.get("jobs", 1) > 1:
        lines.append(f"- the models trained {execution['jobs']} at a time, as parallel processes on the same device")
    if execution.get("time_limit_minutes") is not None:
        stopped = [DISPLAY_NAMES[m] for m, result in results["models"].items() if not result["training"].get("finished", True)]
        lines.append(
            f"- training was limited to {execution['time_limit_minutes']:g} min of wall-clock time; "
            + (f"stopped by it before the end of their schedule: {', '.join(stopped)}" if stopped else "every run finished within it")
        )
    for model, error in (results.get("failed") or {}).items():
        lines.append(f"- **{DISPLAY_NAMES[model]} failed to train and is missing from the tables:** {error}")
    return [*lines, ""] if lines else []


def describe_split(split: dict) -> str:
    counts = ", ".join(
        f"{split[subset]['slices']} {subset} slices from {len(split[subset]['volumes'])} volumes" for subset in ("train", "val", "test")
    )
    return f"{SplitSpec(**split['spec']).describe()}: {counts}; test volumes {', '.join(split['test']['volumes'])}"


def table3_section(results: dict) -> list[str]:
    paper = results["paper_table3"]["models"]
    rows = []
    for model, result in results["models"].items():
        name = DISPLAY_NAMES[model]
        rows.append([name, "paper", *(format_number(paper[model][metric]) for metric in TABLE_METRICS)])
        rows.append([name, "ours, pooled", *(format_number(result["test"]["pooled"][metric]) for metric in TABLE_METRICS)])
        per_slice = result["test"]["per_slice_mean"]
        rows.append([name, "ours, per-slice mean", *(format_number(per_slice[metric]["mean"]) for metric in TABLE_METRICS)])
    baseline = results["all_background_baseline"]
    test_slices = results["split"]["test"]["slices"]
    return [
        f"## Table 3: {test_slices} test slices",
        "",
        "*pooled*: TP, FP, TN, FN summed over all test pixels, then the metric. *per-slice mean*: the metric on each slice, "
        "averaged over the slices where it is defined (Pc needs at least one predicted lesion pixel). The paper does not say "
        "which of the two it reports. Sp = TN/(TN+FP) and F1 = Dice (the paper's printed formulas are misprints). "
        "Predictions are thresholded at probability 0.5 and compared with the stored 256² labels.",
        "",
        *markdown_table(("Method", "source", *TABLE_METRICS), rows),
        f"The all-background baseline (predict no lesion anywhere) scores Acc {format_number(baseline['Acc'])} and "
        f"Sp {format_number(baseline['Sp'])}, pooled over the same test pixels. This is how much of Acc and Sp the background "
        "alone earns.",
        "",
        f"Paper: {results['paper_table3']['citation']}.",
        "",
    ]


def per_volume_section(results: dict) -> list[str]:
    """Dice per test volume (pixels pooled within the volume), for a patient-level split."""
    if results["split"]["spec"]["kind"] == "paper":
        return []
    models = results["models"]
    volumes = results["split"]["test"]["volumes"]
    first = next(iter(models.values()))["test"]["per_volume"]
    rows = [
        [volume, str(first[volume]["slices"]), *(format_number(models[m]["test"]["per_volume"][volume]["F1"]) for m in models)]
        for volume in volumes
    ]
    rows.append(["mean over volumes", "", *(format_number(models[m]["test"]["per_volume_mean"]["F1"]) for m in models)])
    return [
        "## Patient level: Dice per test volume",
        "",
        "Pixels pooled within each volume. No test patient was seen in training or validation.",
        "",
        *markdown_table(("volume", "slices", *(DISPLAY_NAMES[m] for m in models)), rows),
    ]


def training_section(results: dict) -> list[str]:
    rows = []
    for model, result in results["models"].items():
        training = result["training"]
        rows.append(
            [
                DISPLAY_NAMES[model],
                f"{training['parameters']:,}",
                str(training["steps"]),
                f"{training['epochs']:g}",
                f"{training['best_step']} ({format_number(training['best_val_loss'], 4)})",
                format_duration(training["seconds"]),
                training["device"],
                training.get("precision", "fp32"),
            ]
        )
    header = ("Method", "parameters", "steps", "epochs", "best step (val loss)", "training + validation time", "device", "precision")
    return [
        "## Training",
        "",
        "The checkpoint with the lowest validation loss (`best.safetensors`) is evaluated, as in the paper. Time is the sum "
        "of the `seconds` column of each run's `log.csv`.",
        "",
        *markdown_table(header, rows),
    ]


def figures_section(results: dict) -> list[str]:
    slices = ", ".join(f"{item['volume_id']} slice {item['position']}" for item in results["figure7"])
    return [
        "## Figures",
        "",
        "Figure 5: training loss (mean over the steps since the previous point).",
        "",
        "![Figure 5: training loss](fig5_training_loss.png)",
        "",
        "Figure 6: validation loss.",
        "",
        "![Figure 6: validation loss](fig6_validation_loss.png)",
        "",
        f"Figure 7: predictions on the same test slices ({slices}). The slices are chosen deterministically: the middle "
        "test slice of evenly spaced test volumes, then evenly spaced slices if there are fewer volumes than rows. Each "
        "prediction is labelled with its Dice on that slice.",
        "",
        "![Figure 7: predictions](fig7_predictions.png)",
        "",
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="covidlesionseg-reproduce",
        description="Train the paper's four models on one split with a named profile, evaluate them on its test slices, and "
        "write results.md (Table 3 beside the paper's), results.json and Figures 5–7. Running it again resumes unfinished "
        "runs and skips finished ones.",
    )
    parser.add_argument("--data", required=True, help="the covid19-ct-seg-20cases-png256 folder (manifest.csv)")
    parser.add_argument("--output", required=True, help="folder for results.md, results.json and the figures")
    parser.add_argument(
        "--runs", required=True, help="folder for the training runs, RUNS/<model>/ (checkpoints, GBs): keep it outside the repository"
    )
    parser.add_argument("--split", required=True, choices=SPLIT_KINDS, help="paper (slice-level, leaks patients) or a patient-level split")
    parser.add_argument("--fold", type=int, default=0, help="fold of benchmark or patient-kfold (default 0)")
    parser.add_argument("--holdout-groups", nargs="+", default=(), metavar="GROUP", help="split_group values held out (holdout)")
    parser.add_argument(
        "--profile", required=True, choices=list(PROFILES), help="; ".join(f"{p.name}: {p.summary}" for p in PROFILES.values())
    )
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS), help="default: all four")
    parser.add_argument("--encoder-weights", help="resnet encoders: none, imagenet or a resnet34 weights file (default: the profile's)")
    parser.add_argument("--max-steps", type=int, help="override the profile's step budget (quick checks, tests)")
    parser.add_argument("--image-size", type=int, help="override the profile's input size (quick checks, tests)")
    parser.add_argument(
        "--widths", type=int, nargs="+", help="plain-encoder widths of Unet and Attention-Unet instead of 64…1024 (quick checks, dry runs)"
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    parser.add_argument(
        "--precision", choices=PRECISIONS, help="mixed precision (default auto: bf16 autocast on CUDA, fp32 on CPU)"
    )
    parser.add_argument("--jobs", type=int, default=1, help="models trained at the same time, as processes on the device (default 1)")
    parser.add_argument(
        "--time-limit-minutes", type=float, help="stop all training this long after it starts; the results say which runs it cut"
    )
    parser.add_argument(
        "--save-every-seconds", type=float, default=0.0, help="write checkpoints at most this often (default 0: at every validation)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    overrides = {
        name: value
        for name, value in (
            ("encoder_weights", args.encoder_weights),
            ("max_steps", args.max_steps),
            ("image_size", args.image_size),
            ("precision", args.precision),
            ("model_widths", tuple(args.widths) if args.widths else None),
        )
        if value is not None
    }
    split = SplitSpec(args.split, fold=args.fold, holdout_groups=tuple(args.holdout_groups))
    command = shlex.join(["covidlesionseg-reproduce", *argv])
    try:
        reproduce(
            args.data,
            args.output,
            args.runs,
            split,
            PROFILES[args.profile],
            args.models,
            overrides,
            args.device,
            command,
            args.jobs,
            args.time_limit_minutes,
            args.save_every_seconds,
        )
    except KeyboardInterrupt as stop:
        logger.warning("%s", stop)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
