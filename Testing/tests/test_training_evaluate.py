"""Metrics from hand-computed confusion matrices, including empty masks; summary.json writes NaN as null."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from COVIDLesionSegTraining.evaluate import (
    ConfusionAccumulator,
    background_baseline,
    confusion_counts,
    metrics_from_counts,
    write_summary,
)

nan = math.nan


def masks(*rows: str) -> torch.Tensor:
    """2×2 masks from strings, e.g. masks("11", "00") → [[1, 1], [0, 0]] as bool ``[1, 2, 2]``."""
    return torch.tensor([[[char == "1" for char in row] for row in rows]])


# Four 2×2 slices: (prediction, target), counts (tp, fp, tn, fn).
SLICES = {
    "overlap": (masks("11", "00"), masks("10", "10"), (1, 1, 1, 1)),
    "both_empty": (masks("00", "00"), masks("00", "00"), (0, 0, 4, 0)),
    "missed_lesion": (masks("00", "00"), masks("11", "00"), (0, 0, 2, 2)),
    "false_alarm": (masks("10", "00"), masks("00", "00"), (0, 1, 3, 0)),
}


@pytest.mark.parametrize("name", SLICES)
def test_counts_per_slice(name):
    prediction, target, expected = SLICES[name]
    counts = confusion_counts(prediction, target)
    assert counts.dtype == torch.int64 and counts.tolist() == [list(expected)]


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        ((1, 1, 1, 1), {"Acc": 0.5, "Pc": 0.5, "Sen": 0.5, "Sp": 0.5, "F1": 0.5, "IoU": 1 / 3}),
        ((0, 0, 4, 0), {"Acc": 1.0, "Pc": nan, "Sen": nan, "Sp": 1.0, "F1": nan, "IoU": nan}),
        ((0, 0, 2, 2), {"Acc": 0.5, "Pc": nan, "Sen": 0.0, "Sp": 1.0, "F1": 0.0, "IoU": 0.0}),
        ((0, 1, 3, 0), {"Acc": 0.75, "Pc": 0.0, "Sen": nan, "Sp": 0.75, "F1": 0.0, "IoU": 0.0}),
        ((0, 0, 0, 0), {"Acc": nan, "Pc": nan, "Sen": nan, "Sp": nan, "F1": nan, "IoU": nan}),
        ((90, 10, 880, 20), {"Acc": 0.97, "Pc": 0.9, "Sen": 90 / 110, "Sp": 880 / 890, "F1": 180 / 210, "IoU": 90 / 120}),
    ],
)
def test_metrics_from_counts(counts, expected):
    result = metrics_from_counts(np.array(counts, dtype=np.int64))
    for name, value in expected.items():
        assert result[name] == pytest.approx(value, nan_ok=True), name


def test_f1_is_the_harmonic_mean_of_precision_and_sensitivity_where_both_exist():
    result = metrics_from_counts(np.array([90, 10, 880, 20]))
    assert result["F1"] == pytest.approx(2 * result["Pc"] * result["Sen"] / (result["Pc"] + result["Sen"]))


@pytest.fixture
def accumulator() -> ConfusionAccumulator:
    accumulator = ConfusionAccumulator()
    for name, volume in (("overlap", "v1"), ("both_empty", "v1"), ("missed_lesion", "v2"), ("false_alarm", "v2")):
        prediction, target, _ = SLICES[name]
        accumulator.add(prediction, target, [volume])
    return accumulator


def test_pooled_metrics_sum_all_pixels(accumulator):
    assert accumulator.counts.dtype == np.int64 and accumulator.counts.sum(0).tolist() == [1, 2, 10, 3]
    pooled = accumulator.pooled()
    expected = {"Acc": 11 / 16, "Pc": 1 / 3, "Sen": 1 / 4, "Sp": 10 / 12, "F1": 2 / 7, "IoU": 1 / 6}
    assert pooled == pytest.approx(expected)


def test_per_slice_mean_skips_undefined_slices(accumulator):
    per_slice = accumulator.per_slice_mean()
    assert per_slice["Acc"] == {"mean": pytest.approx((0.5 + 1 + 0.5 + 0.75) / 4), "slices": 4}
    assert per_slice["F1"] == {"mean": pytest.approx(0.5 / 3), "slices": 3}
    assert per_slice["Pc"] == {"mean": pytest.approx(0.25), "slices": 2}
    assert per_slice["Sen"] == {"mean": pytest.approx(0.25), "slices": 2}


def test_per_volume_pools_within_each_volume(accumulator):
    per_volume = accumulator.per_volume()
    assert per_volume["v1"]["counts"] == {"tp": 1, "fp": 1, "tn": 5, "fn": 1}
    assert per_volume["v1"]["slices"] == 2
    assert per_volume["v1"]["F1"] == pytest.approx(0.5) and per_volume["v1"]["Sp"] == pytest.approx(5 / 6)
    assert per_volume["v2"]["counts"] == {"tp": 0, "fp": 1, "tn": 5, "fn": 2}
    assert (per_volume["v2"]["F1"], per_volume["v2"]["Pc"], per_volume["v2"]["Sen"]) == (0.0, 0.0, 0.0)
    assert accumulator.summary()["per_volume_mean"]["F1"] == pytest.approx(0.25)


def test_all_background_baseline(accumulator):
    assert background_baseline(accumulator.counts.sum(0)) == {"Acc": 12 / 16, "Sp": 1.0}
    assert accumulator.summary()["all_background_baseline"] == {"Acc": 0.75, "Sp": 1.0}


def test_empty_accumulator_reports_nan():
    summary = ConfusionAccumulator().summary()
    assert summary["slices"] == 0 and all(math.isnan(value) for value in summary["pooled"].values())


def test_summary_json_writes_nan_as_null(accumulator, tmp_path):
    path = write_summary({"lesion": accumulator.summary()}, tmp_path / "out" / "summary.json")
    loaded = json.loads(path.read_text())
    assert loaded["lesion"]["per_volume"]["v1"]["F1"] == 0.5
    single = ConfusionAccumulator()
    single.add(*SLICES["both_empty"][:2], ["v3"])
    path = write_summary(single.summary(), tmp_path / "empty.json")
    assert json.loads(path.read_text())["pooled"]["F1"] is None


def test_volume_ids_must_match_the_slices():
    with pytest.raises(ValueError, match="volume ids"):
        ConfusionAccumulator().add(*SLICES["overlap"][:2], ["v1", "v2"])
