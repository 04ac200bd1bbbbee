"""Train / validation / test splits of the manifest's slices.

========================  ============================================================================
kind                      test set, and how train/validation are drawn from the rest
========================  ============================================================================
``paper``                 10 slices, and 224 train+val slices split 9:1, drawn at random from all
                          slices (the paper's protocol). Slice level: test slices share patients with
                          training slices, which inflates the numbers — the split carries a warning.
``patient-kfold``         fold ``fold`` of ``num_folds`` folds over ``split_group`` (18 patient groups,
                          balanced by slice count, deterministic).
``benchmark``             the 4 volumes of fold ``fold`` of the COVID-19-CT-Seg benchmark's Task 1
                          (``benchmark_task1_folds.json``), used the 80/20 way: train on the other 16.
``holdout``               the slices of the named ``holdout_groups`` (``split_group`` values).
========================  ============================================================================

In the patient-level kinds validation is a set of whole groups drawn from the training groups (seeded),
about ``val_fraction`` of the training slices, and no group is in two subsets.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .data import SliceRecord, read_manifest

SPLIT_KINDS = ("paper", "patient-kfold", "benchmark", "holdout")
PAPER_TRAIN_VAL_SLICES = 224
PAPER_TEST_SLICES = 10
BENCHMARK_FOLDS_FILE = "benchmark_task1_folds.json"
PAPER_LEAK_WARNING = (
    "the 'paper' split is drawn by slice, as the paper did: its test slices come from the same patients as "
    "its training slices, which inflates the scores; report a patient-level split (patient-kfold, benchmark "
    "or holdout) beside it"
)


@dataclass(frozen=True)
class SplitSpec:
    """Which split to make; saved in every :class:`~.config.TrainConfig`."""

    kind: str = "paper"
    fold: int = 0  # patient-kfold and benchmark
    num_folds: int = 5  # patient-kfold
    holdout_groups: tuple[str, ...] = ()  # holdout
    seed: int = 0  # slice draw (paper) and validation groups
    val_fraction: float = 0.1

    def __post_init__(self):
        if self.kind not in SPLIT_KINDS:
            raise ValueError(f"unknown split {self.kind!r}; valid: {', '.join(SPLIT_KINDS)}")
        if self.kind == "holdout" and not self.holdout_groups:
            raise ValueError("the holdout split needs the split groups to hold out (--holdout-groups)")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        object.__setattr__(self, "holdout_groups", tuple(self.holdout_groups))

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        if self.kind == "patient-kfold":
            return f"patient-kfold fold {self.fold} of {self.num_folds}"
        if self.kind == "benchmark":
            return f"benchmark fold {self.fold} (80/20)"
        if self.kind == "holdout":
            return f"holdout of {', '.join(self.holdout_groups)}"
        return "paper (slice-level)"


@dataclass
class Split:
    """Three disjoint lists of slices, and a warning to print/log where the split has a known flaw."""

    spec: SplitSpec
    train: list[SliceRecord]
    val: list[SliceRecord]
    test: list[SliceRecord]
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        """Slice counts and volumes per subset, for the run's ``run_info.json``."""
        return {
            "spec": self.spec.to_dict(),
            "warnings": self.warnings,
            **{
                name: {"slices": len(records), "volumes": sorted({record.volume_id for record in records})}
                for name, records in (("train", self.train), ("val", self.val), ("test", self.test))
            },
        }


def make_split(spec: SplitSpec, data_dir: str | Path) -> Split:
    """The split ``spec`` of the manifest in ``data_dir``."""
    records = read_manifest(data_dir)
    if spec.kind == "paper":
        return paper_split(records, spec)
    if spec.kind == "patient-kfold":
        return patient_kfold_split(records, spec)
    if spec.kind == "benchmark":
        return benchmark_split(records, spec, Path(data_dir) / BENCHMARK_FOLDS_FILE)
    return holdout_split(records, spec)


def paper_split(records: list[SliceRecord], spec: SplitSpec) -> Split:
    """10 test + 224 train/val slices (9:1) drawn at random by slice, with ``spec.seed``."""
    count = PAPER_TEST_SLICES + PAPER_TRAIN_VAL_SLICES
    if len(records) < count:
        raise ValueError(f"the paper split needs {count} slices, the manifest has {len(records)}")
    chosen = [records[index] for index in np.random.default_rng(spec.seed).permutation(len(records))[:count]]
    val_count = round(PAPER_TRAIN_VAL_SLICES * spec.val_fraction)
    test, val, train = (
        chosen[:PAPER_TEST_SLICES],
        chosen[PAPER_TEST_SLICES : PAPER_TEST_SLICES + val_count],
        chosen[PAPER_TEST_SLICES + val_count :],
    )
    return Split(spec, train, val, test, [PAPER_LEAK_WARNING])


def patient_kfold_split(records: list[SliceRecord], spec: SplitSpec) -> Split:
    """Test = the groups of fold ``spec.fold``; folds are filled largest group first into the smallest fold."""
    if not 0 <= spec.fold < spec.num_folds or spec.num_folds < 2:
        raise ValueError(f"fold must be in 0..{spec.num_folds - 1} and num_folds ≥ 2, got fold {spec.fold} of {spec.num_folds}")
    sizes = group_sizes(records)
    if spec.num_folds > len(sizes):
        raise ValueError(f"num_folds {spec.num_folds} is more than the {len(sizes)} split groups")
    folds: list[list[str]] = [[] for _ in range(spec.num_folds)]
    fold_slices = [0] * spec.num_folds
    for group in sorted(sizes, key=lambda name: (-sizes[name], name)):
        smallest = fold_slices.index(min(fold_slices))
        folds[smallest].append(group)
        fold_slices[smallest] += sizes[group]
    return split_by_groups(records, set(folds[spec.fold]), spec)


def benchmark_split(records: list[SliceRecord], spec: SplitSpec, folds_file: Path) -> Split:
    """Test = the 4 volumes the benchmark trains on in fold ``spec.fold``; train/val = the other 16.

    Volumes that share a ``split_group`` (patient) with a test volume are dropped from training, with a
    warning: in folds 2 and 4 the benchmark separates two studies of one patient.
    """
    folds = json.loads(Path(folds_file).read_text())["folds"]
    if not 0 <= spec.fold < len(folds):
        raise ValueError(f"benchmark fold must be in 0..{len(folds) - 1}, got {spec.fold}")
    test_volumes = set(folds[spec.fold]["train"])
    unknown = test_volumes - {record.volume_id for record in records}
    if unknown:
        raise ValueError(f"{folds_file}: volumes {sorted(unknown)} are not in the manifest")
    test_groups = {record.split_group for record in records if record.volume_id in test_volumes}
    dropped = sorted({record.volume_id for record in records if record.split_group in test_groups} - test_volumes)
    remaining = [record for record in records if record.volume_id not in dropped]
    split = split_by_groups(remaining, test_groups, spec)
    if dropped:
        split.warnings.append(
            f"benchmark fold {spec.fold}: dropped {', '.join(dropped)} from training because they share a patient "
            f"with test volumes (training on {len({r.volume_id for r in split.train + split.val})} volumes, not 16)"
        )
    return split


def holdout_split(records: list[SliceRecord], spec: SplitSpec) -> Split:
    """Test = the slices of ``spec.holdout_groups``; train/val = all other groups."""
    groups = group_sizes(records)
    unknown = sorted(set(spec.holdout_groups) - set(groups))
    if unknown:
        raise ValueError(f"unknown split groups {unknown}; valid split_group values: {', '.join(sorted(groups))}")
    return split_by_groups(records, set(spec.holdout_groups), spec)


def split_by_groups(records: list[SliceRecord], test_groups: set[str], spec: SplitSpec) -> Split:
    """Test = ``test_groups``; validation = whole groups of the rest, ≈ ``val_fraction`` of its slices.

    Groups are visited in a seeded random order; the first is taken, and each later one if it brings the
    validation slice count closer to the target.
    """
    test = [record for record in records if record.split_group in test_groups]
    rest = [record for record in records if record.split_group not in test_groups]
    sizes = group_sizes(rest)
    if len(sizes) < 2:
        raise ValueError(f"need at least 2 split groups outside the test set for training and validation, have {sorted(sizes)}")
    names, target = sorted(sizes), spec.val_fraction * len(rest)
    val_groups: set[str] = set()
    val_slices = 0
    for index in np.random.default_rng(spec.seed).permutation(len(names)):
        group = names[index]
        closer = abs(val_slices + sizes[group] - target) < abs(val_slices - target)
        if (not val_groups or closer) and len(val_groups) < len(names) - 1:
            val_groups.add(group)
            val_slices += sizes[group]
    train = [record for record in rest if record.split_group not in val_groups]
    val = [record for record in rest if record.split_group in val_groups]
    return Split(spec, train, val, test)


def group_sizes(records: list[SliceRecord]) -> dict[str, int]:
    """``{split_group: slice count}``."""
    sizes: dict[str, int] = {}
    for record in records:
        sizes[record.split_group] = sizes.get(record.split_group, 0) + 1
    return sizes
