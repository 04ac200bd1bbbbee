"""``covidlesionseg-compare-runs``: compare training runs on their validation data only, to choose a recipe.

::

    covidlesionseg-compare-runs --runs runs/select-v2/a runs/select-v2/b --output Training/results/select-v2

Each run's checkpoint (``--checkpoint best`` or ``last``) is scored on what the run validated on and never
trained on — never on its test patients:

- its split's **validation groups** (lesion-bearing slices as stored, 256²): pooled lesion and lung Dice,
  lesion precision and sensitivity;
- its recipe's **lesion-free validation patients** (``negative_validation``), through the full inference path
  with the default guard rails, as the CLI runs it: false lesion in mL and the slices holding it.

Writes ``compare.json`` and ``compare.md`` (rendered from it); the table names the settings in which the runs
differ, so a row reads as one recipe choice.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from COVIDLesionSegLib.checkpoints import atomic_output
from COVIDLesionSegLib.predictor import Predictor

from .config import TrainConfig
from .evaluate import evaluate_checkpoint
from .model_card import healthy_ct_check, held_out_negative_cases, trained_on
from .reproduce import markdown_table


def score_run(
    run_dir: Path, checkpoint: str, device: str, lesion_free_patients: Sequence[str] | None = None, negatives_dir: Path | None = None
) -> dict:
    """One run's validation scores (see the module docstring); ``lesion_free_patients`` replaces the recipe's
    ``negative_validation`` (each must be one the run never trained on), found in ``negatives_dir`` or, when that
    is None, in the recipe's lesion-free folder."""
    config = TrainConfig.load(run_dir / "config.json")
    patients = config.negative_validation if lesion_free_patients is None else tuple(lesion_free_patients)
    trained = trained_on(config, patients)
    if trained:
        raise ValueError(f"{run_dir}: trained on the lesion-free patients {trained}; they cannot validate it")
    negatives_dir = negatives_dir or config.negatives_dir
    if patients and not negatives_dir:
        raise ValueError(f"{run_dir}: its recipe has no lesion-free folder; name one with --negatives")
    path = run_dir / f"{checkpoint}.safetensors"
    with tempfile.TemporaryDirectory() as scratch:
        channels = evaluate_checkpoint(path, config.data_dir, scratch, subset="val", device=device)["channels"]
    predictor = Predictor.from_checkpoint(path, device)
    lesion_free = [healthy_ct_check(predictor, case) for case in held_out_negative_cases(negatives_dir, patients)]
    return {
        "run": str(run_dir),
        "checkpoint": checkpoint,
        "step": predictor.checkpoint.metrics.get("step"),
        "config": config.to_dict(),
        "validation_groups": {
            "lesion_dice": channels["lesion"]["pooled"]["F1"],
            "lesion_precision": channels["lesion"]["pooled"]["Pc"],
            "lesion_sensitivity": channels["lesion"]["pooled"]["Sen"],
            "lung_dice": channels["lung"]["pooled"]["F1"] if "lung" in channels else None,
        },
        "lesion_free_validation": [
            {"file": entry["file"], "false_lesion_ml": entry["false_lesion_ml"], "slices": entry["slices_with_false_lesion"]}
            for entry in lesion_free
        ],
    }


def differing_settings(runs: list[dict]) -> list[str]:
    """The ``TrainConfig`` fields whose values differ between the runs (output folder, data paths and init_recipe aside)."""
    ignored = {"output_dir", "data_dir", "negatives_dir", "init_recipe"}  # init_recipe follows init_from
    names = runs[0]["config"].keys()
    return [name for name in names if name not in ignored and len({json.dumps(run["config"][name]) for run in runs}) > 1]


def render_markdown(results: dict) -> str:
    settings = results["differing_settings"]
    volumes = sorted({entry["file"] for run in results["runs"] for entry in run["lesion_free_validation"]})
    rows = []
    for run in results["runs"]:
        false_lesion = {entry["file"]: entry for entry in run["lesion_free_validation"]}
        scores = run["validation_groups"]
        rows.append(
            [
                f"`{Path(run['run']).name}`",
                *(f"`{json.dumps(run['config'][name])}`" for name in settings),
                f"{run['checkpoint']} (step {run['step']})",
                f"{scores['lesion_dice']:.3f}",
                f"{scores['lesion_precision']:.3f}",
                f"{scores['lesion_sensitivity']:.3f}",
                f"{scores['lung_dice']:.3f}" if scores["lung_dice"] is not None else "—",
                *(
                    f"{false_lesion[volume]['false_lesion_ml']:.1f} ({false_lesion[volume]['slices']})" if volume in false_lesion else "—"
                    for volume in volumes
                ),
            ]
        )
    header = (
        "run",
        *settings,
        "checkpoint",
        "lesion Dice",
        "lesion precision",
        "lesion sensitivity",
        "lung Dice",
        *(f"{volume} false lesion mL (slices)" for volume in volumes),
    )
    return "\n".join(
        [
            "# Recipe comparison on validation data",
            "",
            f"*Generated by `{results['command']}` on {results['date']}.*",
            "",
            "Scores on what each run never trained on: its validation groups (lesion-bearing slices, pooled over pixels, "
            "256²) and lesion-free patients (full inference path, default guard rails): "
            + (
                "each run's lesion-free validation patients."
                if results.get("lesion_free_patients") is None
                else f"{', '.join(results['lesion_free_patients'])}, named on the command line (held out or validated on by every run; "
                "where a recipe holds them out as test patients, this column is a test, not a basis for choosing)."
            )
            + " Encoders trained from scratch (no ImageNet weights here).",
            "",
            *markdown_table(header, rows),
        ]
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="covidlesionseg-compare-runs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="run folders (config.json + checkpoints)")
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best", help="which checkpoint of each run (default best)")
    parser.add_argument("--output", type=Path, required=True, help="folder for compare.json and compare.md")
    parser.add_argument(
        "--lesion-free-patients", nargs="+", metavar="PATIENT", help="score on these lesion-free patients instead of each recipe's "
        "negative_validation (each must be held out or validated on by every run)"
    )
    parser.add_argument("--negatives", type=Path, metavar="DIR", help="the lesion-free folder (chest-ct-hu-no-covid's layout) to find "
                        "the lesion-free patients in (default: each recipe's)")
    parser.add_argument("--device", default="auto")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    runs = []
    for run_dir in arguments.runs:
        runs.append(score_run(run_dir, arguments.checkpoint, arguments.device, arguments.lesion_free_patients, arguments.negatives))
        print(f"{run_dir}: {runs[-1]['validation_groups']} {runs[-1]['lesion_free_validation']}", flush=True)
    command = shlex.join(["covidlesionseg-compare-runs", *(sys.argv[1:] if argv is None else argv)])
    results = {"command": command, "date": datetime.now().isoformat(timespec="seconds"), "runs": runs,
               "differing_settings": differing_settings(runs), "lesion_free_patients": arguments.lesion_free_patients}
    arguments.output.mkdir(parents=True, exist_ok=True)
    with atomic_output(arguments.output / "compare.json") as temporary:
        temporary.write_text(json.dumps(results, indent=2) + "\n")
    with atomic_output(arguments.output / "compare.md") as temporary:
        temporary.write_text(render_markdown(results) + "\n")
    print(render_markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
