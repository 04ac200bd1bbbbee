"""Splits on the real manifest: sizes, disjointness, patient-level separation, determinism."""

from __future__ import annotations

import json

import pytest

from COVIDLesionSegTraining.data import read_manifest
from COVIDLesionSegTraining.splits import SplitSpec, make_split


def keys(records) -> set[tuple[str, int]]:
    return {(record.volume_id, record.position) for record in records}


def groups(records) -> set[str]:
    return {record.split_group for record in records}


def assert_patient_level(split) -> None:
    assert not groups(split.train) & groups(split.val)
    assert not groups(split.train) & groups(split.test)
    assert not groups(split.val) & groups(split.test)


def test_paper_split_draws_224_plus_10_slices_and_warns_of_the_leak(shared_data):
    split = make_split(SplitSpec("paper"), shared_data)
    assert (len(split.train), len(split.val), len(split.test)) == (202, 22, 10)
    assert len(keys(split.train) | keys(split.val) | keys(split.test)) == 234
    assert any("same patients" in warning for warning in split.warnings)
    again = make_split(SplitSpec("paper"), shared_data)
    assert [keys([r]) for r in again.test] == [keys([r]) for r in split.test]
    assert keys(make_split(SplitSpec("paper", seed=1), shared_data).test) != keys(split.test)


def test_patient_kfold_covers_every_group_once(shared_data):
    all_groups = groups(read_manifest(shared_data))
    test_groups = []
    for fold in range(5):
        split = make_split(SplitSpec("patient-kfold", fold=fold, num_folds=5), shared_data)
        assert_patient_level(split)
        assert len(split.train) + len(split.val) + len(split.test) == 1614
        assert 0.05 < len(split.val) / (len(split.train) + len(split.val)) < 0.2
        assert 250 < len(split.test) < 400  # balanced by slice count
        assert not split.warnings
        test_groups.append(groups(split.test))
    assert set().union(*test_groups) == all_groups
    assert sum(len(fold) for fold in test_groups) == 18
    again = make_split(SplitSpec("patient-kfold", fold=2), shared_data)
    assert keys(again.val) == keys(make_split(SplitSpec("patient-kfold", fold=2), shared_data).val)


def test_benchmark_fold_tests_on_its_four_volumes(shared_data):
    folds = json.loads((shared_data / "benchmark_task1_folds.json").read_text())["folds"]
    split = make_split(SplitSpec("benchmark", fold=0), shared_data)
    assert {record.volume_id for record in split.test} == set(folds[0]["train"])
    assert {record.volume_id for record in split.train + split.val} == set(folds[0]["test"])
    assert_patient_level(split)
    assert not split.warnings


def test_benchmark_fold_drops_training_studies_of_test_patients(shared_data):
    split = make_split(SplitSpec("benchmark", fold=2), shared_data)  # tests on 10_85902_1 and 29_86491_1
    assert_patient_level(split)
    training_volumes = {record.volume_id for record in split.train + split.val}
    assert "radiopaedia_10_85902_3" not in training_volumes and "radiopaedia_29_86490_1" not in training_volumes
    assert len(training_volumes) == 14
    assert any("radiopaedia_10_85902_3" in warning for warning in split.warnings)


def test_holdout_tests_on_the_named_groups(shared_data):
    spec = SplitSpec("holdout", holdout_groups=("coronacases_004", "radiopaedia_27_86410_0"))
    split = make_split(spec, shared_data)
    assert groups(split.test) == {"coronacases_004", "radiopaedia_27_86410_0"}
    assert len(split.test) == 113 + 33
    assert_patient_level(split)
    summary = split.summary()
    assert summary["test"]["volumes"] == ["coronacases_004", "radiopaedia_27_86410_0"]
    assert summary["train"]["slices"] + summary["val"]["slices"] == 1614 - 146


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (lambda: SplitSpec("random"), "unknown split"),
        (lambda: SplitSpec("holdout"), "holdout"),
        (lambda: SplitSpec("paper", val_fraction=1.5), "val_fraction"),
    ],
)
def test_invalid_specs_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        spec()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (SplitSpec("holdout", holdout_groups=("coronacases_099",)), "valid split_group values"),
        (SplitSpec("patient-kfold", fold=5, num_folds=5), "fold"),
        (SplitSpec("patient-kfold", num_folds=19), "18 split groups"),
        (SplitSpec("benchmark", fold=5), "0..4"),
    ],
)
def test_impossible_splits_explain_themselves(shared_data, spec, message):
    with pytest.raises(ValueError, match=message):
        make_split(spec, shared_data)
