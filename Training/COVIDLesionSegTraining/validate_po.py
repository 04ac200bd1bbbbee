"""Validate the percentage of opacity (PO): the model's masks against the ground truth, per held-out volume.

    covidlesionseg-validate-po --data ../shared/data/covid19-ct-seg-20cases-png256 \\
        --checkpoint MODEL.safetensors coronacases_004 radiopaedia_27_86410_0 --output-dir runs/po-validation

Each ``--checkpoint MODEL [NAME ...]`` is one fold: a checkpoint file or registry name, then the volumes it
did not train on (``volume_id`` or ``split_group`` values of ``manifest.csv``). Without names, the fold's
volumes are the test set of the split recorded in the checkpoint (as ``covidlesionseg-evaluate`` uses it);
a named volume that the recorded split trained or validated on is refused. Repeat ``--checkpoint`` once per
fold of a cross-validation so that every volume is predicted by the model that did not see it: a Pearson
r over PO per volume needs more than two volumes to mean anything (below three it is not computed).

Per volume, the stored slices are stacked in z order, in the orientation the model trained in
(:func:`.sample.stack_volume`), and predicted with :class:`~COVIDLesionSegLib.predictor.Predictor` — as they
are (``preprocessed``): the PNGs already are the preprocessing recipe's output, as in training — with the
default guard rails on the nominal grid, as the CLI would. Both PO come from
:func:`~COVIDLesionSegLib.statistics.lesion_statistics` (PO = 100 × lesion / lung, the lung including its
lesions; reference lung = lung mask ∪ lesion mask). The PNG set keeps only slices that hold lesion, so this
PO is over those slices, not the whole lung: it checks agreement, not a patient's true PO.

Writes to ``--output-dir``: ``po_validation.json`` (per volume: slices, reference and model PO, difference;
overall: number of volumes, Pearson r, mean absolute difference and bias in percentage points, 95 % limits
of agreement), ``po_bland_altman.png`` and ``po_validation.md`` (a paragraph with the figures and the command
line, for the model card).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from COVIDLesionSegLib.checkpoints import atomic_output
from COVIDLesionSegLib.statistics import VoxelGrid, lesion_statistics

from .data import read_manifest
from .sample import NOMINAL_SPACING_MM, model_orientation, stack_volume

logger = logging.getLogger(__name__)
MIN_VOLUMES_FOR_CORRELATION = 3
GRID = VoxelGrid(NOMINAL_SPACING_MM)  # PO is a ratio: the nominal spacing cancels out


@dataclass(frozen=True)
class VolumeResult:
    volume_id: str
    model: str  # the checkpoint that predicted it
    slices: int
    reference_percent_opacity: float | None  # None where the reference lung is empty
    model_percent_opacity: float | None  # None where the predicted lung is empty

    @property
    def difference(self) -> float | None:
        """Model − reference, percentage points."""
        if self.model_percent_opacity is None or self.reference_percent_opacity is None:
            return None
        return self.model_percent_opacity - self.reference_percent_opacity


def expand_names(names: Sequence[str], data_dir: Path) -> list[str]:
    """Volume ids for ``names`` (each a ``volume_id`` or a ``split_group``), in manifest order, without repeats."""
    records = read_manifest(data_dir)
    known = {record.volume_id for record in records} | {record.split_group for record in records}
    unknown = sorted(set(names) - known)
    if unknown:
        raise ValueError(f"{unknown} are neither volume_id nor split_group values of {data_dir / 'manifest.csv'}")
    wanted = set(names)
    return list(dict.fromkeys(r.volume_id for r in records if r.volume_id in wanted or r.split_group in wanted))


def held_out_volumes(checkpoint, checkpoint_name: str, names: Sequence[str], data_dir: Path) -> list[str]:
    """The fold's volumes: ``names`` expanded, or the recorded split's test volumes; refuses a volume it trained on."""
    from .splits import SplitSpec, make_split

    recorded = checkpoint.train_config.get("split")
    split = make_split(SplitSpec(**recorded), data_dir) if recorded else None
    if not names:
        if split is None:
            raise ValueError(f"{checkpoint_name}: no split recorded in the checkpoint; name its held-out volumes after it")
        if split.spec.kind == "paper":
            raise ValueError(f"{checkpoint_name}: trained on the slice-level 'paper' split, so no volume is held out")
        return list(dict.fromkeys(record.volume_id for record in split.test))
    volumes = expand_names(names, data_dir)
    if split is not None:
        seen = sorted({record.volume_id for record in split.train + split.val} & set(volumes))
        if seen:
            raise ValueError(f"{checkpoint_name} trained or validated on {seen}; name only volumes it held out")
    return volumes


def validate_fold(predictor, volumes: Sequence[str], data_dir: Path, label: str) -> list[VolumeResult]:
    """PO of each volume from the reference labels and from ``predictor``'s masks; ``label`` names the model."""
    if "lung" not in predictor.channels:
        raise ValueError(f"{label}: the model has no lung channel, so it gives no percentage of opacity")
    results = []
    for volume_id in volumes:
        ct, labels = stack_volume(data_dir, volume_id, model_orientation(predictor.checkpoint))
        reference = lesion_statistics(labels == 1, GRID, labels > 0)
        masks = predictor.predict_masks(ct, preprocessed=True, grid=GRID)  # with the default guard rails, as the CLI
        predicted = lesion_statistics(masks["lesion"], GRID, masks["lung"])
        result = VolumeResult(volume_id, label, len(ct), reference.percent_opacity, predicted.percent_opacity)
        results.append(result)
        logger.info(
            "%s: %d slices, PO reference %s, model %s",
            volume_id,
            len(ct),
            *(format_percent(value) for value in (result.reference_percent_opacity, result.model_percent_opacity)),
        )
    return results


def format_percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} %"


def agreement(results: Sequence[VolumeResult]) -> dict:
    """Pearson r, mean absolute difference, bias and 95 % limits of agreement (percentage points) over the
    volumes where both PO exist; r is None below three volumes or when either PO does not vary."""
    compared = [result for result in results if result.difference is not None]
    reference = np.array([result.reference_percent_opacity for result in compared], dtype=np.float64)
    model = np.array([result.model_percent_opacity for result in compared], dtype=np.float64)
    differences = model - reference
    pearson_r = None
    if len(compared) >= MIN_VOLUMES_FOR_CORRELATION and reference.std() > 0 and model.std() > 0:
        pearson_r = float(np.corrcoef(reference, model)[0, 1])
    bias = float(differences.mean()) if compared else None
    spread = float(differences.std(ddof=1)) if len(compared) >= 2 else None
    return {
        "volumes": len(results),
        "volumes_compared": len(compared),
        "pearson_r": pearson_r,
        "mean_absolute_difference_pp": float(np.abs(differences).mean()) if compared else None,
        "bias_pp": bias,
        "limits_of_agreement_pp": [bias - 1.96 * spread, bias + 1.96 * spread] if spread is not None else None,
    }


def plot_bland_altman(results: Sequence[VolumeResult], summary: dict, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    paired = [r for r in results if r.difference is not None]
    means = [(r.reference_percent_opacity + r.model_percent_opacity) / 2 for r in paired]
    figure = Figure(figsize=(7, 5), dpi=120)
    FigureCanvasAgg(figure)
    axis = figure.subplots()
    axis.scatter(means, [r.difference for r in paired], color="tab:orange", zorder=3)
    if summary["bias_pp"] is not None:
        axis.axhline(summary["bias_pp"], color="black", label=f"bias {summary['bias_pp']:+.2f} pp")
    if summary["limits_of_agreement_pp"]:
        low, high = summary["limits_of_agreement_pp"]
        for limit in (low, high):
            axis.axhline(limit, color="grey", linestyle="--")
        axis.plot([], [], color="grey", linestyle="--", label=f"95 % limits {low:+.2f} … {high:+.2f} pp")
    axis.axhline(0, color="lightgrey", linewidth=0.8, zorder=0)
    axis.set_xlabel("mean of model and reference PO (%)")
    axis.set_ylabel("model − reference PO (percentage points)")
    r_text = "n/a" if summary["pearson_r"] is None else f"{summary['pearson_r']:.3f}"
    axis.set_title(f"Percentage of opacity per volume: n = {summary['volumes_compared']}, Pearson r = {r_text}", fontsize=10)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=8, loc="best")
    with atomic_output(path) as temporary:
        figure.savefig(temporary, format="png", bbox_inches="tight")
    return path


def agreement_text(summary: dict) -> str:
    """The figures of :func:`agreement` in words: r, mean absolute difference, bias and limits of agreement."""
    def number(value, digits=2):
        return "n/a" if value is None else f"{value:.{digits}f}"

    limits = summary["limits_of_agreement_pp"]
    return (
        f"Pearson r = {number(summary['pearson_r'], 3)}, mean absolute difference {number(summary['mean_absolute_difference_pp'])} "
        f"percentage points, bias {number(summary['bias_pp'])} pp, 95 % limits of agreement "
        f"{'n/a' if limits is None else f'{limits[0]:.2f} … {limits[1]:.2f}'} pp"
    )


def model_card_paragraph(summary: dict, command: str) -> str:
    return (
        "### Percentage of opacity (PO) against the reference\n\n"
        f"On {summary['volumes_compared']} held-out volumes ({summary['volumes']} run; models: "
        f"{', '.join(summary['models'])}), PO per volume over its stored slices (slices with lesion only): "
        f"{agreement_text(summary)} (Bland–Altman plot: `po_bland_altman.png`). Reproduce with:\n\n    {command}\n"
    )


def validate(
    folds: Sequence[tuple[str, Sequence[str]]],
    data_dir: str | Path,
    output_dir: str | Path,
    device: str = "auto",
    batch_size: int = 8,
    command: str = "",
    lesion_threshold: float | None = None,
) -> dict:
    """Run every fold ``(checkpoint or registry name, volume names)``; write the JSON, the plot and the paragraph.
    ``lesion_threshold`` replaces the default guard rails' lesion probability threshold (the JSON records the guard rails)."""
    from COVIDLesionSegLib.predictor import GuardRails, Predictor

    data_dir, output_dir = Path(data_dir), Path(output_dir)
    guard_rails = GuardRails() if lesion_threshold is None else GuardRails(lesion_threshold=lesion_threshold)
    results: list[VolumeResult] = []
    models = []
    for source, names in folds:
        predictor = Predictor.from_checkpoint(source, device, batch_size, guard_rails)
        label = str(source)  # as given: a registry name, or a path that tells the folds' best.safetensors apart
        volumes = held_out_volumes(predictor.checkpoint, label, names, data_dir)
        repeated = sorted({r.volume_id for r in results} & set(volumes))
        if repeated:
            raise ValueError(f"{repeated} are in more than one fold; each volume must be predicted once")
        results += validate_fold(predictor, volumes, data_dir, label)
        models.append({"name": label, "sha256": predictor.sha256, "volumes": volumes})
    summary = {**agreement(results), "models": list(dict.fromkeys(model["name"] for model in models))}
    report = {
        "summary": summary,
        "definitions": {
            "percent_opacity": "100 × lesion voxels / lung voxels over the volume's stored slices (slices with lesion only); "
            "reference lung = lung mask ∪ lesion mask; model masks: lesion ∩ lung, lung ∪ lesion",
            "difference": "model − reference, percentage points (pp)",
            "limits_of_agreement_pp": "bias ± 1.96 × SD of the differences (sample SD)",
            "pearson_r": f"computed from {MIN_VOLUMES_FOR_CORRELATION} volumes on, when both PO vary",
        },
        "models": models,
        "guard_rails": asdict(guard_rails),
        "data": str(data_dir),
        "command": command,
        "volumes": [{**asdict(r), "difference": r.difference} for r in results],
    }
    with atomic_output(output_dir / "po_validation.json") as temporary:
        temporary.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    plot_bland_altman(results, summary, output_dir / "po_bland_altman.png")
    with atomic_output(output_dir / "po_validation.md") as temporary:
        temporary.write_text(model_card_paragraph(summary, command), encoding="utf-8")
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="covidlesionseg-validate-po",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument(
        "--checkpoint",
        action="append",
        nargs="+",
        required=True,
        metavar="MODEL_OR_VOLUME",
        help="MODEL [NAME ...]: a checkpoint file or registry name, then its held-out volume_id/split_group "
        "values (none: the test set recorded in the checkpoint); repeat once per fold",
    )
    parser.add_argument("--data", required=True, type=Path, help="the covid19-ct-seg-20cases-png256 folder (manifest.csv)")
    parser.add_argument("--output-dir", required=True, type=Path, help="folder for po_validation.json/.md and po_bland_altman.png")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lesion-threshold", type=float, help="lesion probability threshold of the guard rails (default: the "
                        "CLI's); to see how the PO agreement depends on it")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    folds = [(fold[0], fold[1:]) for fold in args.checkpoint]
    command = shlex.join(["covidlesionseg-validate-po", *argv])
    try:
        report = validate(folds, args.data, args.output_dir, args.device, args.batch_size, command, args.lesion_threshold)
    except (OSError, ValueError) as error:
        print(f"ERROR {error}", file=sys.stderr)
        return 1
    summary = report["summary"]
    r_text = "n/a" if summary["pearson_r"] is None else f"{summary['pearson_r']:.3f}"
    mad = summary["mean_absolute_difference_pp"]
    print(
        f"PO on {summary['volumes_compared']} of {summary['volumes']} volumes: Pearson r {r_text}, mean absolute difference "
        f"{'n/a' if mad is None else f'{mad:.2f}'} pp; wrote {args.output_dir / 'po_validation.json'}"
    )
    if summary["volumes_compared"] < MIN_VOLUMES_FOR_CORRELATION:
        print(
            f"note: Pearson r needs at least {MIN_VOLUMES_FOR_CORRELATION} volumes where both PO exist; "
            "add the other folds' held-out volumes",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
