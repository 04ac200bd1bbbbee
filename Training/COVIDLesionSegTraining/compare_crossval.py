"""``covidlesionseg-compare-crossval``: a candidate recipe's cross-validation against a baseline's, and the adoption rule.

::

    covidlesionseg-compare-crossval --candidate Training/results/crossval-v5-vertical-flip/crossval.json \\
        --baseline Training/results/crossval-v4-batch-dice-rescored/crossval.json \\
        --output Training/results/crossval-v5-vertical-flip/compare.md

Both are ``crossval.json`` files of :mod:`.crossval` on the same split (patients per fold) and at the same guard
rails (else the figures would not compare, and the command refuses). Printed, and written to ``--output`` when given:

- per fold present in both: the fold's pooled lesion Dice, the false lesion (mL) on each lesion-free volume that no
  fold model trained on, and the lesion Dice of the zoomed-out and zoomed-in renderings of its test patients;
- per test volume, heaviest disease first (reference percentage of opacity): lesion Dice, sensitivity and PO;
- the PO agreement over these volumes, and the pooled lesion Dice over these folds, of each;
- an adoption rule of ``Training/README.md``, each part with its figure, judged only when the candidate has run every fold.
  ``--rule pair-wins`` (the rule since the v5 recipe): (1) pooled lesion Dice of the candidate over all folds ≥
  ``--dice-floor``; (2) less false lesion than the baseline in at least ``--min-wins`` of the fold × lesion-free volume
  pairs; (3) the mean zoomed-out and zoomed-in lesion Dice over the folds each within ``--zoom-tolerance`` below the
  as-shipped rendering's. ``--rule fold-means`` (since the heavy-disease candidate; pair wins between single draws are
  too noisy for close recipes): (1) pooled lesion Dice at least the baseline's; (2) better PO agreement: Pearson r
  higher and mean absolute difference lower than the baseline's; (3) the mean false lesion over the folds no higher than
  the baseline's on each lesion-free volume; (4) as (3) of ``pair-wins``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from statistics import fmean

from COVIDLesionSegLib.checkpoints import atomic_output

from .evaluate import metrics_from_counts
from .model_card import SHIFTED_RENDERINGS
from .reproduce import format_number, markdown_table
from .validate_po import VolumeResult, agreement, agreement_text

AS_SHIPPED, _, ZOOMED_OUT, ZOOMED_IN = SHIFTED_RENDERINGS
RULES = ("pair-wins", "fold-means")


def load(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a readable crossval.json ({error})") from None


def false_lesion_ml(fold: dict) -> dict[str, float]:
    """``{file: false lesion mL}`` of one fold: the healthy CT and each held-out lesion-free volume."""
    volumes = [fold["healthy_ct"], *fold.get("held_out_lesion_free", [])]
    return {volume["file"]: volume["false_lesion_ml"] for volume in volumes}


def pooled_lesion_dice(folds: Sequence[dict]) -> float:
    """The lesion Dice of ``folds``' test pixels pooled (their confusion counts summed)."""
    counts = [sum(fold["test"]["lesion"]["counts"][key] for fold in folds) for key in ("tp", "fp", "tn", "fn")]
    return metrics_from_counts(counts)["F1"]


def po_agreement(volumes: Sequence[dict]) -> dict:
    """:func:`.validate_po.agreement` of ``crossval.json`` volume entries."""
    return agreement([VolumeResult(volume["volume_id"], str(volume["fold"]), volume["slices"], volume["percent_opacity"]["reference"],
                                   volume["percent_opacity"]["model"]) for volume in volumes])


def matched_folds(candidate: dict, baseline: dict) -> list[tuple[dict, dict]]:
    """(candidate fold, baseline fold) for every fold both ran, in fold order; refuses folds that test other patients or
    ran at other guard rails."""
    baseline_folds = {fold["fold"]: fold for fold in baseline["folds"]}
    matched = [(fold, baseline_folds[fold["fold"]]) for fold in sorted(candidate["folds"], key=lambda fold: fold["fold"])
               if fold["fold"] in baseline_folds]
    for fold, other in matched:
        if sorted(fold["test_groups"]) != sorted(other["test_groups"]):
            raise ValueError(f"fold {fold['fold']} tests other patients in the two cross-validations: the splits differ")
        if fold.get("guard_rails") is None or fold.get("guard_rails") != other.get("guard_rails"):
            raise ValueError(f"fold {fold['fold']} ran at other guard rails, or one of them did not record them ({fold.get('guard_rails')} "
                             f"against {other.get('guard_rails')}); score both at the same (covidlesionseg-crossval again with the "
                             "same --runs: finished folds are scored, not trained)")
    return matched


def compare(candidate: dict, baseline: dict, dice_floor: float, min_wins: int, zoom_tolerance: float, rule_name: str = "pair-wins") -> dict:
    """The figures of the module docstring as a dict (see :func:`render_markdown`), judged by ``rule_name`` (one of ``RULES``)."""
    if rule_name not in RULES:
        raise ValueError(f"unknown rule {rule_name!r}; valid: {', '.join(RULES)}")
    matched = matched_folds(candidate, baseline)
    folds, pairs = [], []
    for fold, other in matched:
        mine, theirs = false_lesion_ml(fold), false_lesion_ml(other)
        pairs += [{"fold": fold["fold"], "file": file, "candidate": mine[file], "baseline": theirs[file]}
                  for file in mine if file in theirs]
        folds.append({
            "fold": fold["fold"],
            "lesion_dice": (fold["test"]["lesion"]["pooled"]["F1"], other["test"]["lesion"]["pooled"]["F1"]),
            "false_lesion_ml": {file: (mine[file], theirs.get(file)) for file in mine},
            "zoomed": {name: (fold["shifted_inputs_lesion_dice"][name], other["shifted_inputs_lesion_dice"][name])
                       for name in (AS_SHIPPED, ZOOMED_OUT, ZOOMED_IN)},
        })
    shared = {fold["fold"] for fold in folds}
    baseline_volumes = {volume["volume_id"]: volume for volume in baseline["volumes"] if volume["fold"] in shared}
    candidate_volumes = [volume for volume in candidate["volumes"] if volume["volume_id"] in baseline_volumes]
    volumes = [
        {"volume_id": volume["volume_id"], "fold": volume["fold"], "reference_po": volume["percent_opacity"]["reference"],
         **{key: (volume[key], baseline_volumes[volume["volume_id"]][key]) for key in ("lesion", "percent_opacity")}}
        for volume in candidate_volumes
    ]
    volumes.sort(key=lambda volume: -volume["reference_po"])
    pooled = (pooled_lesion_dice([fold for fold, _ in matched]), pooled_lesion_dice([other for _, other in matched]))
    shifted = candidate["overall"]["shifted_inputs_lesion_dice"]
    zoom_drops = {name: shifted[AS_SHIPPED]["mean"] - shifted[name]["mean"] for name in (ZOOMED_OUT, ZOOMED_IN)}
    percent_opacity = (po_agreement(candidate_volumes), po_agreement(list(baseline_volumes.values())))
    files = list(dict.fromkeys(pair["file"] for pair in pairs))
    mean_false_lesion = {file: tuple(fmean([pair[side] for pair in pairs if pair["file"] == file]) for side in ("candidate", "baseline"))
                         for file in files}
    rule = {"name": rule_name, "complete": len(folds) == candidate["split"]["num_folds"]}
    if rule_name == "pair-wins":
        wins = sum(pair["candidate"] < pair["baseline"] for pair in pairs)
        rule["pooled_lesion_dice"] = {"value": pooled[0], "floor": dice_floor, "holds": pooled[0] >= dice_floor}
        rule["less_false_lesion"] = {"wins": wins, "pairs": len(pairs), "needed": min_wins, "holds": wins >= min_wins}
    else:
        rule["pooled_lesion_dice"] = {"value": pooled[0], "floor": pooled[1], "holds": pooled[0] >= pooled[1]}
        (r, r_baseline), (difference, difference_baseline) = (
            tuple(summary[key] for summary in percent_opacity) for key in ("pearson_r", "mean_absolute_difference_pp"))
        rule["better_po_agreement"] = {"pearson_r": (r, r_baseline), "mean_absolute_difference_pp": (difference, difference_baseline),
                                       "holds": None not in (r, r_baseline) and r > r_baseline and difference < difference_baseline}
        rule["mean_false_lesion_not_higher"] = {"means_ml": mean_false_lesion,
                                                "holds": all(mine <= theirs for mine, theirs in mean_false_lesion.values())}
    rule["zoomed_within"] = {"drops": zoom_drops, "tolerance": zoom_tolerance,
                             "holds": all(drop <= zoom_tolerance for drop in zoom_drops.values())}
    parts = [part for part, value in rule.items() if isinstance(value, dict)]
    rule["adopt"] = rule["complete"] and all(rule[part]["holds"] for part in parts)
    return {
        "candidate": candidate["command"],
        "baseline": baseline["command"],
        "folds": folds,
        "pairs": pairs,
        "mean_false_lesion_ml": mean_false_lesion,
        "volumes": volumes,
        "pooled_lesion_dice": pooled,
        "percent_opacity": percent_opacity,
        "rule": rule,
    }


def pair_text(values: tuple[float | None, float | None], digits: int = 3) -> str:
    return f"{format_number(values[0], digits)} / {format_number(values[1], digits)}"


def verdict(holds: bool) -> str:
    return "holds" if holds else "fails"


def rule_lines(rule: dict) -> list[str]:
    """The numbered parts of ``rule`` (of :func:`compare`), each with its figures and whether it holds."""
    dice, zoom = rule["pooled_lesion_dice"], rule["zoomed_within"]
    if rule["name"] == "pair-wins":
        wins = rule["less_false_lesion"]
        parts = [f"Pooled lesion Dice ≥ {dice['floor']:g}: {format_number(dice['value'])}, {verdict(dice['holds'])}.",
                 f"Less false lesion than the baseline in ≥ {wins['needed']} fold × volume pairs: {wins['wins']} of {wins['pairs']}, "
                 f"{verdict(wins['holds'])}."]
    else:
        po, means = rule["better_po_agreement"], rule["mean_false_lesion_not_higher"]
        parts = [f"Pooled lesion Dice at least the baseline's: {pair_text((dice['value'], dice['floor']))}, {verdict(dice['holds'])}.",
                 f"Better PO agreement, Pearson r higher and mean absolute difference lower: r {pair_text(po['pearson_r'])}, "
                 f"{pair_text(po['mean_absolute_difference_pp'], 2)} pp, {verdict(po['holds'])}.",
                 "Mean false lesion over the folds no higher on each lesion-free volume: "
                 + ", ".join(f"`{file}` {pair_text(values, 1)} mL" for file, values in means["means_ml"].items())
                 + f", {verdict(means['holds'])}."]
    drops = ", ".join(f"{name} {format_number(drop)}" for name, drop in zoom["drops"].items())
    parts.append(f"Zoomed-out and zoomed-in lesion Dice (means over folds) within {zoom['tolerance']:g} below the as-shipped one: "
                 f"drops {drops}, {verdict(zoom['holds'])}.")
    return [f"{number}. {part}" for number, part in enumerate(parts, start=1)]


def render_markdown(comparison: dict, command: str) -> str:
    """The comparison as Markdown, headed by the ``command`` that made it: candidate first, baseline second, in every cell."""
    folds = comparison["folds"]
    files = list(folds[0]["false_lesion_ml"]) if folds else []
    lines = ["# Cross-validation: candidate against baseline", "", f"*Generated by `{command}`.*", "",
             f"Candidate: `{comparison['candidate']}`", "", f"Baseline: `{comparison['baseline']}`", "",
             "Every cell: candidate / baseline. False lesion in mL on lesion-free volumes no fold model trained on.", ""]
    lines += markdown_table(
        ["fold", "lesion Dice", *(f"`{file}`" for file in files), "as shipped", "zoomed out", "zoomed in"],
        [[str(fold["fold"]), pair_text(fold["lesion_dice"]), *(pair_text(fold["false_lesion_ml"][file], 1) for file in files),
          *(pair_text(fold["zoomed"][name]) for name in (AS_SHIPPED, ZOOMED_OUT, ZOOMED_IN))] for fold in folds],
    )
    lines += ["Mean false lesion over these folds (mL): "
              + ", ".join(f"`{file}` {pair_text(means, 1)}" for file, means in comparison["mean_false_lesion_ml"].items()) + ".", ""]
    lines += [f"Pooled lesion Dice over these folds' test volumes: {pair_text(comparison['pooled_lesion_dice'])}.", ""]
    lines += ["## Per test volume, heaviest disease first", ""]
    lines += markdown_table(
        ["volume", "fold", "reference PO (%)", "PO (%)", "lesion Dice", "sensitivity", "precision"],
        [[volume["volume_id"], str(volume["fold"]), format_number(volume["reference_po"], 1),
          pair_text(tuple(po["model"] for po in volume["percent_opacity"]), 1),
          *(pair_text(tuple(lesion[key] for lesion in volume["lesion"])) for key in ("F1", "Sen", "Pc"))]
         for volume in comparison["volumes"]],
    )
    for name, summary in zip(("Candidate", "Baseline"), comparison["percent_opacity"], strict=True):
        lines.append(f"{name} PO agreement over these {summary['volumes_compared']} volumes: {agreement_text(summary)}.")
    rule = comparison["rule"]
    lines += ["", f"## Adoption rule ({rule['name']})", "", *rule_lines(rule), ""]
    if not rule["complete"]:
        lines.append("Verdict: **not judged**: the candidate has not run every fold.")
    else:
        lines.append(f"Verdict: **{'adopt' if rule['adopt'] else 'do not adopt'}**.")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="covidlesionseg-compare-crossval", description=__doc__.splitlines()[0].split(": ", 1)[1])
    parser.add_argument("--candidate", type=Path, required=True, help="the candidate recipe's crossval.json")
    parser.add_argument("--baseline", type=Path, required=True, help="the baseline recipe's crossval.json, same split and guard rails")
    parser.add_argument("--dice-floor", type=float, default=0.632, help="least pooled lesion Dice (default 0.632, v1's recipe)")
    parser.add_argument("--min-wins", type=int, default=12,
                        help="fold × lesion-free volume pairs with less false lesion needed (default 12)")
    parser.add_argument("--rule", choices=RULES, default="pair-wins",
                        help="pair-wins (default): --dice-floor and --min-wins; fold-means: Dice, PO agreement and mean false lesion "
                             "against the baseline's")
    parser.add_argument("--zoom-tolerance", type=float, default=0.05, help="largest drop of the zoomed renderings' Dice (default 0.05)")
    parser.add_argument("--output", type=Path, help="also write the Markdown here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    try:
        comparison = compare(load(arguments.candidate), load(arguments.baseline), arguments.dice_floor, arguments.min_wins,
                             arguments.zoom_tolerance, arguments.rule)
    except KeyError as error:
        print(f"ERROR {arguments.candidate} or {arguments.baseline}: no field {error}; not a crossval.json", file=sys.stderr)
        return 1
    except ValueError as error:
        print(f"ERROR {error}", file=sys.stderr)
        return 1
    command = shlex.join(["covidlesionseg-compare-crossval", *(sys.argv[1:] if argv is None else argv)])
    text = render_markdown(comparison, command)
    if arguments.output:
        with atomic_output(arguments.output) as temporary:
            temporary.write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
