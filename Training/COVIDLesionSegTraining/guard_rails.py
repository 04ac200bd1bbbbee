"""``covidlesionseg-guard-rails``: choose the inference guard rails on cross-validation fold models.

::

    covidlesionseg-guard-rails --runs runs/crossval-v2/fold0 [runs/crossval-v2/fold1 …] \\
        --output Training/results/guard-rails-v2

Each fold model (``RUN/best.safetensors``, with its recipe in ``RUN/config.json``) is run once per input
through the full inference path, with and without left–right flip test-time augmentation; then every
candidate :class:`~COVIDLesionSegLib.predictor.GuardRails` setting is applied to the same probabilities:

- on the fold's **test patients** (patients the model never saw), stacked in the model's orientation on the
  sample's nominal grid, 8-bit as stored and rendered to HU: pooled lesion Dice;
- on **lesion-free CT** it never trained on — ``CTChest4.nrrd`` and the recipe's held-out lesion-free
  patients — in HU: false lesion in mL;
- **cost**: seconds per slice of the network and guard rails, relative to no guard rail.

Writes ``guard_rails.json`` and ``guard_rails.md`` (rendered from it), with the recommended setting
(:func:`recommend`): among the settings that lose at most ``MAX_DICE_LOSS`` lesion Dice on either rendering
and cost at most ``MAX_RELATIVE_TIME`` of the time, the one with the least false lesion in total (the
cheaper on a tie). ``predictor.GuardRails``' defaults are meant to be that setting.

``--carry RESULTS.json ...`` adds the fold models scored in earlier ``guard_rails.json`` files (their models need
not exist any more), refused unless scored on the same candidates and lesion-free volumes, so the fold models of one
cross-validation can be scored in several sittings; ``guard_rails.md`` names the carried ones.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from COVIDLesionSegLib import io
from COVIDLesionSegLib.checkpoints import atomic_output
from COVIDLesionSegLib.predictor import NO_GUARD_RAILS, GuardRails, Predictor, apply_guard_rails, masks_from_probabilities
from COVIDLesionSegLib.preprocessing import is_hounsfield
from COVIDLesionSegLib.statistics import VoxelGrid

from .config import TrainConfig
from .model_card import as_hounsfield, ctchest4, held_out_negative_cases
from .reproduce import markdown_table
from .sample import NOMINAL_SPACING_MM, stack_volume
from .splits import make_split

# each candidate spelt out from NO_GUARD_RAILS, so a change of GuardRails' defaults cannot slip into it
CANDIDATES = {
    "none": NO_GUARD_RAILS,
    "lesion ≥ 0.1 mL": replace(NO_GUARD_RAILS, lesion_min_ml=0.1),
    "lesion ≥ 0.5 mL": replace(NO_GUARD_RAILS, lesion_min_ml=0.5),
    "lung ≥ 100 mL": replace(NO_GUARD_RAILS, lung_min_ml=100.0),
    "lung ≥ 100 mL, lesion ≥ 0.1 mL": replace(NO_GUARD_RAILS, lung_min_ml=100.0, lesion_min_ml=0.1),
    "HU lung prior": replace(NO_GUARD_RAILS, hu_lung_prior=True),
    **{
        f"lesion ≥ {hu:g} HU, lesion ≥ 0.5 mL": replace(NO_GUARD_RAILS, lesion_min_hu=float(hu), lesion_min_ml=0.5)
        for hu in (-800, -750, -700)
    },
    **{
        f"lesion p ≥ {threshold:g}, lesion ≥ 0.5 mL": replace(NO_GUARD_RAILS, lesion_threshold=threshold, lesion_min_ml=0.5)
        for threshold in (0.6, 0.7, 0.8, 0.9)
    },
    **{
        f"lesion p ≥ 0.6, contrast ≥ {hu:g} HU, lesion ≥ 0.5 mL": replace(
            NO_GUARD_RAILS, lesion_threshold=0.6, lesion_min_contrast_hu=float(hu), lesion_min_ml=0.5
        )
        for hu in (25, 50, 75, 100)
    },
    "flip TTA": replace(NO_GUARD_RAILS, flip_tta=True),
    "flip TTA, lung ≥ 100 mL, lesion ≥ 0.1 mL": replace(NO_GUARD_RAILS, flip_tta=True, lung_min_ml=100.0, lesion_min_ml=0.1),
    "all": replace(NO_GUARD_RAILS, flip_tta=True, lung_min_ml=100.0, lesion_min_ml=0.1, hu_lung_prior=True),
}


class TimedInputs:
    """One model's probabilities on one input, plain and flip-averaged, with the network seconds of each."""

    def __init__(self, predictor: Predictor, volume: np.ndarray):
        self.probabilities, self.seconds = {}, {}
        for flip in (False, True):
            predictor.guard_rails = replace(NO_GUARD_RAILS, flip_tta=flip)
            started = time.perf_counter()
            self.probabilities[flip] = predictor.predict_probabilities(volume)
            self.seconds[flip] = time.perf_counter() - started

    def masks(self, guard_rails: GuardRails, grid: VoxelGrid, ct_hu: np.ndarray | None) -> tuple[dict, float]:
        """Masks under ``guard_rails`` and the seconds they took (network + guard rails)."""
        started = time.perf_counter()
        probabilities = self.probabilities[guard_rails.flip_tta]
        masks = apply_guard_rails(masks_from_probabilities(probabilities, guard_rails.lesion_threshold), guard_rails, grid, ct_hu)
        return masks, self.seconds[guard_rails.flip_tta] + time.perf_counter() - started


def evaluate_run(run_dir: Path, device: str) -> dict:
    """Every candidate on one fold model: test-patient counts per rendering, false lesion per lesion-free volume, seconds."""
    config = TrainConfig.load(run_dir / "config.json")
    predictor = Predictor.from_checkpoint(run_dir / "best.safetensors", device)
    split = make_split(config.split, config.data_dir)
    test_volumes = list(dict.fromkeys(record.volume_id for record in split.test))
    grid = VoxelGrid(NOMINAL_SPACING_MM)
    totals = {name: {"8-bit": np.zeros(2), "HU": np.zeros(2), "seconds": 0.0, "slices": 0, "false_lesion_ml": {}} for name in CANDIDATES}
    for volume_id in test_volumes:
        ct, labels = stack_volume(Path(config.data_dir), volume_id, config.orientation)
        reference = labels == 1
        for rendering, volume in (("8-bit", ct), ("HU", as_hounsfield(ct))):
            inputs = TimedInputs(predictor, volume)
            ct_hu = volume if rendering == "HU" else None
            for name, guard_rails in CANDIDATES.items():
                masks, seconds = inputs.masks(guard_rails, grid, ct_hu)
                lesion = masks["lesion"] > 0
                totals[name][rendering] += (2 * np.logical_and(lesion, reference).sum(), lesion.sum() + reference.sum())
                totals[name]["seconds"] += seconds
                totals[name]["slices"] += len(volume)
    for path in [ctchest4(), *(case.volume for case in held_out_negative_cases(config.negatives_dir, config.negative_holdout))]:
        image = io.to_radiological(io.read_image(path))
        hu = sitk.GetArrayFromImage(image)
        image_grid = VoxelGrid.of_image(image)
        inputs = TimedInputs(predictor, hu)
        for name, guard_rails in CANDIDATES.items():
            masks, seconds = inputs.masks(guard_rails, image_grid, hu if is_hounsfield(hu, predictor.preprocessing) else None)
            totals[name]["false_lesion_ml"][path.name] = float(masks["lesion"].sum()) * image_grid.voxel_ml
            totals[name]["seconds"] += seconds
            totals[name]["slices"] += len(hu)
    return {
        "run": str(run_dir),
        "fold": config.split.fold,
        "test_volumes": test_volumes,
        "candidates": {
            name: {
                "lesion_dice_8bit": float(t["8-bit"][0] / t["8-bit"][1]) if t["8-bit"][1] else None,
                "lesion_dice_hu": float(t["HU"][0] / t["HU"][1]) if t["HU"][1] else None,
                "false_lesion_ml": t["false_lesion_ml"],
                "seconds_per_slice": t["seconds"] / t["slices"],
                "counts": {"8-bit": t["8-bit"].tolist(), "HU": t["HU"].tolist()},
            }
            for name, t in totals.items()
        },
    }


def carried_runs(paths: Sequence[Path]) -> list[dict]:
    """The scored fold models of earlier ``guard_rails.json`` files, each recording its file (``carried_from``);
    refused unless every candidate is the one of :data:`CANDIDATES` of the same name."""
    runs = []
    for path in paths:
        try:
            earlier = json.loads(Path(path).read_text(encoding="utf-8"))
            settings = {name: entry["guard_rails"] for name, entry in earlier["pooled"].items()}
            earlier_runs = earlier["runs"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"{path}: not a readable guard_rails.json ({error})") from None
        if settings != {name: guard_rails.to_dict() for name, guard_rails in CANDIDATES.items()}:
            raise ValueError(f"{path}: scored other guard-rail candidates than these; score its fold models again")
        runs += [{**run, "carried_from": run.get("carried_from", {"file": str(path), "date": earlier["date"]})} for run in earlier_runs]
    return runs


def check_distinct_folds(folds: Sequence[int]) -> None:
    """Refuse a fold scored twice (pooling it twice would weigh it double)."""
    if len(set(folds)) != len(folds):
        raise ValueError(f"fold models {sorted(folds)}: a fold is scored twice; score or carry each once")


def check_same_lesion_free_volumes(runs: list[dict]) -> None:
    """Refuse fold models tested on different lesion-free volumes (their false lesion cannot be averaged)."""
    volumes = {run["fold"]: sorted(run["candidates"]["none"]["false_lesion_ml"]) for run in runs}
    if len({tuple(names) for names in volumes.values()}) > 1:
        raise ValueError(f"the fold models were tested on different lesion-free volumes: {volumes}")


def pooled(runs: list[dict]) -> dict:
    """Per candidate over all runs: Dice from the summed counts, false lesion per volume (mean over runs), relative time."""
    result = {}
    baseline = np.mean([run["candidates"]["none"]["seconds_per_slice"] for run in runs])
    for name in CANDIDATES:
        entries = [run["candidates"][name] for run in runs]
        counts = {rendering: np.sum([entry["counts"][rendering] for entry in entries], axis=0) for rendering in ("8-bit", "HU")}
        volumes = list(entries[0]["false_lesion_ml"])
        result[name] = {
            "guard_rails": CANDIDATES[name].to_dict(),
            "lesion_dice_8bit": float(counts["8-bit"][0] / counts["8-bit"][1]),
            "lesion_dice_hu": float(counts["HU"][0] / counts["HU"][1]),
            "false_lesion_ml": {volume: float(np.mean([entry["false_lesion_ml"][volume] for entry in entries])) for volume in volumes},
            "relative_time": float(np.mean([entry["seconds_per_slice"] for entry in entries]) / baseline),
        }
    return result


MAX_DICE_LOSS = 0.01
MAX_RELATIVE_TIME = 1.2


def recommend(summary: dict) -> str:
    """The name of the recommended candidate of a :func:`pooled` summary (see the module docstring)."""
    none = summary["none"]

    def acceptable(entry: dict) -> bool:
        return (
            entry["lesion_dice_8bit"] >= none["lesion_dice_8bit"] - MAX_DICE_LOSS
            and entry["lesion_dice_hu"] >= none["lesion_dice_hu"] - MAX_DICE_LOSS
            and entry["relative_time"] <= MAX_RELATIVE_TIME
        )

    return min(
        (name for name, entry in summary.items() if acceptable(entry)),
        key=lambda name: (round(sum(summary[name]["false_lesion_ml"].values()), 1), summary[name]["relative_time"]),
    )


def render_markdown(results: dict) -> str:
    summary = results["pooled"]
    volumes = list(next(iter(summary.values()))["false_lesion_ml"])
    rows = [
        [
            name,
            f"{entry['lesion_dice_8bit']:.3f}",
            f"{entry['lesion_dice_hu']:.3f}",
            *(f"{entry['false_lesion_ml'][volume]:.1f}" for volume in volumes),
            f"{entry['relative_time']:.2f}",
        ]
        for name, entry in summary.items()
    ]
    folds = ", ".join(str(run["fold"]) for run in results["runs"])
    carried = [run for run in results["runs"] if "carried_from" in run]
    sources = "; ".join(f"fold {run['fold']} from `{run['carried_from']['file']}` (scored on {run['carried_from']['date']})"
                        for run in carried)
    return "\n".join(
        [
            "# Inference guard rails on cross-validation fold models",
            "",
            f"*Generated by `{results['command']}` on {results['date']}.*",
            "",
            f"Fold model(s) {folds} of the recipe; lesion Dice pooled over each fold's test patients (never seen in training), "
            "the stored slices stacked on the sample's nominal grid (1.4 × 1.4 × 5 mm), as stored (8-bit) and rendered to HU; "
            "false lesion on lesion-free CT never trained on, mean over the fold models; time relative to no guard rail "
            "(network + guard rails, CPU)." + (f" Carried from earlier sittings: {sources}." if carried else ""),
            "",
            *markdown_table(
                ("guard rails", "lesion Dice 8-bit", "lesion Dice HU", *(f"{v} false lesion (mL)" for v in volumes), "time ×"), rows
            ),
            f"Recommended (least false lesion among the settings losing ≤ {MAX_DICE_LOSS} Dice and costing ≤ "
            f"{MAX_RELATIVE_TIME:.1f}× the time): **{results['recommended']}** = `{summary[results['recommended']]['guard_rails']}`.",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="covidlesionseg-guard-rails", description=__doc__.splitlines()[0].split(": ", 1)[1])
    parser.add_argument("--runs", type=Path, nargs="+", default=[], help="fold run folders (best.safetensors + config.json)")
    parser.add_argument("--carry", type=Path, nargs="+", default=[], metavar="RESULTS_JSON",
                        help="add the fold models scored in these earlier guard_rails.json files (same candidates)")
    parser.add_argument("--output", type=Path, required=True, help="folder for guard_rails.json and guard_rails.md")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    if not args.runs + args.carry:
        parser.error("give fold runs (--runs) or earlier results (--carry)")
    try:
        carried = carried_runs(args.carry)
        check_distinct_folds([run["fold"] for run in carried] + [TrainConfig.load(run / "config.json").split.fold for run in args.runs])
        runs = sorted(carried + [evaluate_run(run_dir, args.device) for run_dir in args.runs], key=lambda run: run["fold"])
        check_same_lesion_free_volumes(runs)
    except (OSError, ValueError) as error:
        print(f"ERROR {error}", file=sys.stderr)
        return 1
    command = shlex.join(["covidlesionseg-guard-rails", *(argv if argv is not None else sys.argv[1:])])
    summary = pooled(runs)
    results = {"command": command, "date": datetime.now().isoformat(timespec="seconds"), "runs": runs, "pooled": summary}
    results["recommended"] = recommend(summary)
    with atomic_output(args.output / "guard_rails.json") as temporary:
        temporary.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    with atomic_output(args.output / "guard_rails.md") as temporary:
        temporary.write_text(render_markdown(results) + "\n", encoding="utf-8")
    print(render_markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
