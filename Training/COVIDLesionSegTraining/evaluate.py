"""Pixel-wise evaluation from one confusion-matrix accumulator.

:class:`ConfusionAccumulator` keeps ``tp, fp, tn, fn`` (int64) per slice with the slice's volume, and
reports the paper's metrics three ways — **pooled** over all pixels of all slices, the **per-slice
mean** (NaN slices left out, with the count that entered), and **per volume** (pixels pooled within each
volume) — plus the all-background baseline (predict nothing), whose Acc and Sp show how much of the
headline Acc and Sp the background alone earns.

Metrics (:func:`metrics_from_counts`), NaN where the denominator is 0:

- Acc = (TP+TN)/(TP+FP+TN+FN); Pc (precision) = TP/(TP+FP); Sen (sensitivity) = TP/(TP+FN);
- Sp (specificity) = TN/(TN+FP) — the standard formula (the paper's printed one is a misprint);
- F1 = 2·Pc·Sen/(Pc+Sen), computed as 2TP/(2TP+FP+FN): the same number wherever the former is
  defined (it is the Dice coefficient), and 0 rather than NaN for a missed lesion (TP = 0 < FP + FN);
- IoU = TP/(TP+FP+FN).

``covidlesionseg-evaluate`` runs a checkpoint on a split's test slices and writes ``summary.json``
(NaN written as ``null``) and ``per_slice.csv``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

METRIC_NAMES = ("Acc", "Pc", "Sen", "Sp", "F1", "IoU")
COUNT_NAMES = ("tp", "fp", "tn", "fn")

logger = logging.getLogger(__name__)


def confusion_counts(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-slice counts: ``prediction``, ``target`` bool ``[N, H, W]`` → int64 ``[N, 4]`` (tp, fp, tn, fn)."""
    prediction, target = prediction.bool().flatten(1), target.bool().flatten(1)
    tp = (prediction & target).sum(1)
    fp = (prediction & ~target).sum(1)
    fn = (~prediction & target).sum(1)
    tn = prediction.shape[1] - tp - fp - fn
    return torch.stack([tp, fp, tn, fn], dim=1).long()


def metrics_from_counts(counts: np.ndarray) -> dict[str, float]:
    """The six metrics of one confusion matrix ``counts`` = (tp, fp, tn, fn); NaN where undefined."""
    tp, fp, tn, fn = (float(value) for value in np.asarray(counts, dtype=np.int64))

    def ratio(numerator: float, denominator: float) -> float:
        return numerator / denominator if denominator else math.nan

    return {
        "Acc": ratio(tp + tn, tp + fp + tn + fn),
        "Pc": ratio(tp, tp + fp),
        "Sen": ratio(tp, tp + fn),
        "Sp": ratio(tn, tn + fp),
        "F1": ratio(2 * tp, 2 * tp + fp + fn),
        "IoU": ratio(tp, tp + fp + fn),
    }


def background_baseline(counts: np.ndarray) -> dict[str, float]:
    """Acc and Sp of predicting background everywhere, for the same ground truth as ``counts``."""
    tp, fp, tn, fn = np.asarray(counts, dtype=np.int64)
    baseline = metrics_from_counts(np.array([0, 0, tn + fp, tp + fn]))
    return {"Acc": baseline["Acc"], "Sp": baseline["Sp"]}


class ConfusionAccumulator:
    """Per-slice confusion counts of one output channel, with each slice's volume id."""

    def __init__(self):
        self._counts: list[np.ndarray] = []
        self.volume_ids: list[str] = []

    def add(self, prediction: torch.Tensor, target: torch.Tensor, volume_ids: Sequence[str]) -> None:
        """Add slices: ``prediction``, ``target`` bool ``[N, H, W]``, ``volume_ids`` of length N."""
        if len(volume_ids) != len(prediction):
            raise ValueError(f"{len(volume_ids)} volume ids for {len(prediction)} slices")
        self._counts.append(confusion_counts(prediction, target).cpu().numpy())
        self.volume_ids.extend(volume_ids)

    @property
    def counts(self) -> np.ndarray:
        """int64 ``[slices, 4]`` (tp, fp, tn, fn)."""
        return np.concatenate(self._counts) if self._counts else np.zeros((0, 4), np.int64)

    def pooled(self) -> dict[str, float]:
        return metrics_from_counts(self.counts.sum(0))

    def per_slice_mean(self) -> dict[str, dict[str, float]]:
        """``{metric: {"mean": nanmean over slices, "slices": how many slices had it defined}}``."""
        table = np.array([[metrics_from_counts(row)[name] for name in METRIC_NAMES] for row in self.counts]).reshape(-1, len(METRIC_NAMES))
        defined = ~np.isnan(table)
        return {
            name: {
                "mean": float(np.nanmean(table[:, column])) if defined[:, column].any() else math.nan,
                "slices": int(defined[:, column].sum()),
            }
            for column, name in enumerate(METRIC_NAMES)
        }

    def per_volume(self) -> dict[str, dict]:
        """``{volume_id: {"slices": n, "counts": {...}, metrics…}}`` with pixels pooled per volume."""
        counts, volumes = self.counts, np.array(self.volume_ids)
        result = {}
        for volume_id in sorted(set(self.volume_ids)):
            volume_counts = counts[volumes == volume_id].sum(0)
            result[volume_id] = {
                "slices": int((volumes == volume_id).sum()),
                "counts": dict(zip(COUNT_NAMES, (int(value) for value in volume_counts), strict=True)),
                **metrics_from_counts(volume_counts),
            }
        return result

    def summary(self) -> dict:
        """Pooled, per-slice mean, per-volume (and their mean), baseline, and the pooled counts."""
        per_volume = self.per_volume()
        total = self.counts.sum(0)
        return {
            "slices": len(self.volume_ids),
            "counts": dict(zip(COUNT_NAMES, (int(value) for value in total), strict=True)),
            "pooled": metrics_from_counts(total),
            "per_slice_mean": self.per_slice_mean(),
            "per_volume": per_volume,
            "per_volume_mean": {name: nan_mean([volume[name] for volume in per_volume.values()]) for name in METRIC_NAMES},
            "all_background_baseline": background_baseline(total),
        }


def nan_mean(values: Sequence[float]) -> float:
    defined = [value for value in values if not math.isnan(value)]
    return sum(defined) / len(defined) if defined else math.nan


def nan_to_none(value):
    """``value`` with every float NaN replaced by None (JSON ``null``), recursively."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: nan_to_none(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [nan_to_none(item) for item in value]
    return value


def write_summary(summary: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(nan_to_none(summary), indent=2, allow_nan=False) + "\n")
    return path


@torch.no_grad()
def predict_and_accumulate(
    model: torch.nn.Module,
    dataset,
    channels: Sequence[str],
    device: torch.device,
    batch_size: int = 8,
    threshold: float = 0.5,
    indices: Sequence[int] | None = None,
) -> dict[str, ConfusionAccumulator]:
    """Run ``model`` over ``dataset`` (a :class:`~.data.SliceDataset`) → one accumulator per channel.

    Probabilities go back onto the targets' slice with the core's
    :func:`~COVIDLesionSegLib.preprocessing.uncrop_probabilities` (as inference does: the item's field-of-view
    ``box`` undone, resized) when they differ, then thresholded at ``threshold``.
    """
    from COVIDLesionSegLib.preprocessing import uncrop_probabilities

    model.eval()
    accumulators = {name: ConfusionAccumulator() for name in channels}
    indices = list(range(len(dataset))) if indices is None else list(indices)
    for start in range(0, len(indices), batch_size):
        items = [dataset[index] for index in indices[start : start + batch_size]]
        images = torch.stack([item["image"] for item in items]).to(device, memory_format=torch.channels_last)
        targets = torch.stack([item["target"] for item in items]) > 0.5
        probabilities = torch.sigmoid(model(images)).float().cpu()
        boxes = [item.get("box") for item in items]
        if probabilities.shape[-2:] != targets.shape[-2:] or any(boxes):
            height, width = targets.shape[-2:]
            probabilities = torch.stack(
                [torch.from_numpy(uncrop_probabilities(p.numpy(), box, height, width)) for p, box in zip(probabilities, boxes, strict=True)]
            )
        predictions = probabilities > threshold
        volume_ids = [dataset.volume_id(item["index"]) for item in items]
        for channel, name in enumerate(channels):
            accumulators[name].add(predictions[:, channel], targets[:, channel], volume_ids)
    return accumulators


def evaluate_checkpoint(
    checkpoint_path: str | Path,
    data_dir: str | Path | None,
    output_dir: str | Path,
    split=None,
    subset: str = "test",
    batch_size: int = 8,
    threshold: float = 0.5,
    device: str = "auto",
    orientation: str | None = None,
) -> dict:
    """Evaluate a checkpoint on one subset of a split; writes ``summary.json`` and ``per_slice.csv``.

    ``orientation`` of the manifest slices (``data.ORIENTATIONS``); None: the one the checkpoint trained on.

    ``split`` is a :class:`~.splits.SplitSpec`; None uses the split recorded in the checkpoint's
    ``train_config`` (its own test set), and ``data_dir`` None the data it was trained on. Targets stay at
    the stored 256² resolution.
    """
    from COVIDLesionSegLib.checkpoints import load_checkpoint
    from COVIDLesionSegLib.predictor import resolve_device

    from .data import ManifestSliceDataset
    from .splits import SplitSpec, make_split

    checkpoint = load_checkpoint(checkpoint_path)
    if split is None:
        if "split" not in checkpoint.train_config:
            raise ValueError(f"{checkpoint_path}: no split recorded in the checkpoint; pass --split")
        split = SplitSpec(**checkpoint.train_config["split"])
    data_dir = data_dir or checkpoint.train_config.get("data_dir")
    if not data_dir:
        raise ValueError(f"{checkpoint_path}: no data folder recorded in the checkpoint; pass --data")
    made = make_split(split, data_dir)
    for warning in made.warnings:
        logger.warning("warning: %s", warning)
    records = {"train": made.train, "val": made.val, "test": made.test}[subset]
    orientation = orientation or checkpoint.train_config.get("orientation", "as-stored")
    dataset = ManifestSliceDataset(
        records, orientation=orientation, channels=checkpoint.channels, preprocessing=checkpoint.preprocessing, native_targets=True
    )
    torch_device = resolve_device(device)
    model = checkpoint.build().to(torch_device, memory_format=torch.channels_last)
    accumulators = predict_and_accumulate(model, dataset, checkpoint.channels, torch_device, batch_size, threshold)
    summary = {
        "checkpoint": str(checkpoint_path),
        "model": checkpoint.model_name,
        "split": made.spec.to_dict(),
        "subset": subset,
        "orientation": orientation,
        "warnings": made.warnings,
        "threshold": threshold,
        "image_size": checkpoint.preprocessing.size,
        "metric_definitions": "pooled = counts summed over all pixels of all slices; per_slice_mean = mean over "
        "slices where defined; per_volume = counts summed within each volume; NaN (null) where undefined",
        "channels": {name: accumulator.summary() for name, accumulator in accumulators.items()},
    }
    output_dir = Path(output_dir)
    write_summary(summary, output_dir / "summary.json")
    write_per_slice_csv(dataset, accumulators, output_dir / "per_slice.csv")
    return summary


def write_per_slice_csv(dataset, accumulators: dict[str, ConfusionAccumulator], path: Path) -> None:
    """One row per slice: volume, position, image, then tp/fp/tn/fn and F1 per channel."""
    header = ["volume_id", "position", "image"]
    for name in accumulators:
        header += [f"{name}_{count}" for count in COUNT_NAMES] + [f"{name}_F1"]
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(header)
        for index, record in enumerate(dataset.records):
            row = [record.volume_id, record.position, record.image.name]
            for accumulator in accumulators.values():
                counts = accumulator.counts[index]
                row += [int(value) for value in counts] + [metrics_from_counts(counts)["F1"]]
            writer.writerow(row)


def build_parser() -> argparse.ArgumentParser:
    from .splits import SPLIT_KINDS

    parser = argparse.ArgumentParser(
        prog="covidlesionseg-evaluate",
        description="Evaluate a checkpoint on a split's test slices: pooled, per-slice and per-volume metrics → summary.json.",
    )
    parser.add_argument("--checkpoint", required=True, help="a .safetensors checkpoint written by covidlesionseg-train")
    parser.add_argument("--data", help="the covid19-ct-seg-20cases-png256 folder (manifest.csv); default: the checkpoint's training data")
    parser.add_argument("--output", required=True, help="folder for summary.json and per_slice.csv")
    parser.add_argument("--split", choices=SPLIT_KINDS, help="default: the split recorded in the checkpoint")
    parser.add_argument("--fold", type=int, default=0, help="fold for patient-kfold and benchmark (default 0)")
    parser.add_argument("--num-folds", type=int, default=5, help="folds for patient-kfold (default 5)")
    parser.add_argument("--holdout-groups", nargs="+", default=(), metavar="GROUP", help="split_group values held out (holdout)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the paper split's draw and the validation groups (default 0)")
    parser.add_argument("--subset", choices=("test", "val", "train"), default="test", help="which slices of the split (default test)")
    parser.add_argument("--batch-size", type=int, default=8, help="slices per forward pass (default 8)")
    parser.add_argument("--threshold", type=float, default=0.5, help="probability threshold (default 0.5)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .splits import SplitSpec

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    split = None
    if args.split:
        split = SplitSpec(args.split, args.fold, args.num_folds, tuple(args.holdout_groups), args.split_seed)
    summary = evaluate_checkpoint(args.checkpoint, args.data, args.output, split, args.subset, args.batch_size, args.threshold, args.device)
    for name, channel in summary["channels"].items():
        pooled = ", ".join(f"{metric} {channel['pooled'][metric]:.3f}" for metric in METRIC_NAMES)
        logger.info("%s (%d slices, pooled): %s", name, channel["slices"], pooled)
    logger.info("wrote %s", Path(args.output) / "summary.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
