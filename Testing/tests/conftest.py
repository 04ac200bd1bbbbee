"""Shared fixtures: the real data folder beside the repository and a tiny two-channel checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "covid19-ct-seg-20cases-png256"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "manifest.csv").is_file():
        pytest.skip(f"real data not present at {SHARED_DATA} (the shared/ folder beside the repository)")
    return SHARED_DATA


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
