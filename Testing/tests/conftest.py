"""Shared fixtures: the real data folder beside the repository, a manifest of a few of its slices, and a tiny
two-channel checkpoint."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "covid19-ct-seg-20cases-png256"
TINY_DATA_GROUPS = ("coronacases_001", "coronacases_002", "radiopaedia_4_85506_1", "radiopaedia_7_85703_0")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "manifest.csv").is_file():
        pytest.skip(f"real data not present at {SHARED_DATA} (the shared/ folder beside the repository)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_data(shared_data, tmp_path_factory):
    """A manifest of 3 real slices from each of 4 groups (absolute paths into the shared data).

    Holding out ``radiopaedia_7_85703_0``: 3 test slices, and 6 train + 3 validation slices (one group) — 3 steps
    per epoch at batch 2.
    """
    with open(shared_data / "manifest.csv", newline="") as stream:
        reader = csv.DictReader(stream)
        fieldnames, rows = reader.fieldnames, list(reader)
    chosen = []
    for group in TINY_DATA_GROUPS:
        group_rows = [row for row in rows if row["split_group"] == group]
        chosen += group_rows[len(group_rows) // 2 : len(group_rows) // 2 + 3]
    for row in chosen:
        for column in ("image", "mask", "lung_mask"):
            row[column] = str(shared_data / row[column])
    folder = tmp_path_factory.mktemp("tiny_data")
    with open(folder / "manifest.csv", "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(chosen)
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised tiny U-Net (lesion + lung channels) saved as a real checkpoint."""
    from COVIDLesionSegLib.checkpoints import Checkpoint, save_checkpoint
    from COVIDLesionSegLib.models import build_model

    torch.manual_seed(0)
    kwargs = {"widths": [4, 8, 16, 32, 64], "out_channels": 2}
    model = build_model("unet", **kwargs)
    path = tmp_path_factory.mktemp("checkpoints") / "tiny.safetensors"
    return save_checkpoint(Checkpoint("unet", kwargs, model.state_dict(), ["lesion", "lung"]), path)
