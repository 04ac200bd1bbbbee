"""The CUDA code paths: inference autocast, the out-of-memory retry, ``--device cuda`` (segmentation and training, with
mixed precision and the training data on the GPU), DistributedDataParallel over NCCL.

Every test here is skipped where PyTorch sees no CUDA GPU (CI, these 2-core machines); the GPU suite
(``Testing/gpu/run_suite.sh``) runs this file on a GPU. Real SimpleITK is needed for the CLI test only (the suite may
run with its stand-in).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from COVIDLesionSegLib.checkpoints import load_checkpoint
from COVIDLesionSegLib.models import build_model
from COVIDLesionSegLib.predictor import predict_in_batches

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (PyTorch sees none)")

ROOT = Path(__file__).resolve().parents[2]
TINY_WIDTHS = ["4", "8", "16", "32", "64"]
CUDA = torch.device("cuda", 0)


def synthetic_data(folder: Path) -> Path:
    """4 synthetic volumes of 6 slices at 64² (Testing/gpu/make_synthetic_data.py)."""
    spec = importlib.util.spec_from_file_location("make_synthetic_data", ROOT / "Testing" / "gpu" / "make_synthetic_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make(folder, volumes=4, slices_per_volume=6, size=64)


def train_arguments(data: Path, run: Path, *more: str) -> list[str]:
    """A tiny U-Net at 64², holding out one volume: 12 train, 6 validation slices (6 steps per epoch)."""
    return ["--data", str(data), "--output", str(run), "--model", "unet", "--widths", *TINY_WIDTHS, "--image-size", "64",
            "--split", "holdout", "--holdout-groups", "synthetic_003", "--device", "cuda", *more]  # fmt: skip


def log_steps(run: Path) -> list[str]:
    with open(run / "log.csv", newline="") as stream:
        return [row["step"] for row in csv.DictReader(stream)]


def collect(total: int, channels: int, size: int):
    output = np.zeros((total, channels, size, size), np.float32)

    def consume(start: int, probabilities: np.ndarray) -> None:
        output[start : start + len(probabilities)] = probabilities

    return output, consume


def test_inference_autocast_matches_fp32():
    """The core's CUDA inference (fp16 autocast) against the same network in fp32 on the CPU."""
    torch.manual_seed(0)
    network = build_model("resattunet", encoder_weights="none").eval()
    inputs = np.random.default_rng(0).normal(size=(6, 3, 256, 256)).astype(np.float32)
    with torch.no_grad():
        reference = torch.sigmoid(network(torch.from_numpy(inputs))).numpy()
    probabilities, consume = collect(6, 1, 256)
    assert predict_in_batches(network.to(CUDA), inputs, 4, consume, CUDA) == 4
    difference = np.abs(probabilities - reference)
    assert difference.max() < 2e-2 and difference.mean() < 2e-3, (difference.max(), difference.mean())
    assert ((probabilities >= 0.5) == (reference >= 0.5)).mean() > 0.99


class Greedy(nn.Module):
    """Allocates ``per_slice`` bytes per input slice on the GPU: a real CUDA out-of-memory error above a batch size."""

    def __init__(self, per_slice: int):
        super().__init__()
        self.per_slice = per_slice

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        block = torch.empty(len(batch) * self.per_slice, dtype=torch.uint8, device=batch.device)
        return batch[:, :1] + block[:1].float() * 0


def test_out_of_memory_retries_with_half_the_batch():
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    network = Greedy(int(free * 0.3))  # batch 8 and 4 ask for 2.4× and 1.2× the free memory, batch 2 for 0.6×
    inputs = np.arange(5 * 8 * 8, dtype=np.float32).reshape(5, 1, 8, 8)
    probabilities, consume = collect(5, 1, 8)
    try:
        assert predict_in_batches(network, inputs, 8, consume, CUDA) == 2
    finally:
        torch.cuda.empty_cache()
    assert np.allclose(probabilities, 1 / (1 + np.exp(-inputs)), atol=1e-3)  # every slice done once, in place


@pytest.mark.skipif(getattr(sitk, "STUB", False), reason="needs the real SimpleITK (the GPU suite's stand-in is in use)")
def test_segment_command_on_cuda(tiny_checkpoint, tmp_path):
    from COVIDLesionSegLib import cli

    y, x = np.mgrid[:512, :512] / 512 - 0.5
    plane = np.where((x / 0.45) ** 2 + (y / 0.35) ** 2 < 1, 40.0, -1000.0)
    plane[((np.abs(x) - 0.2) / 0.15) ** 2 + (y / 0.25) ** 2 < 1] = -850
    volume = sitk.GetImageFromArray(np.repeat(plane[None], 12, axis=0).astype(np.int16))
    volume.SetSpacing((0.7, 0.7, 2.0))
    sitk.WriteImage(volume, str(tmp_path / "ct.nii.gz"))
    for device in ("cuda", "cpu"):
        arguments = ["segment", str(tmp_path / "ct.nii.gz"), "-o", str(tmp_path / device), "--weights", str(tiny_checkpoint)]
        assert cli.main([*arguments, "--device", device, "--batch-size", "4", "--progress", "none"]) == 0
    cuda_rows = list(csv.DictReader(open(tmp_path / "cuda" / "summary.csv", newline="")))
    cpu_rows = list(csv.DictReader(open(tmp_path / "cpu" / "summary.csv", newline="")))
    assert len(cuda_rows) == len(cpu_rows) == 1 and cuda_rows[0]["status"] == cpu_rows[0]["status"] == "ok"


def test_device_slices_give_the_data_loaders_batches(tmp_path):
    from torch.utils.data import DataLoader

    from COVIDLesionSegLib.preprocessing import PreprocessingConfig
    from COVIDLesionSegTraining.data import ManifestSliceDataset, read_manifest
    from COVIDLesionSegTraining.train import DeviceSlices, loader_batches

    data = synthetic_data(tmp_path / "data")
    dataset = ManifestSliceDataset(read_manifest(data), channels=("lesion", "lung"), preprocessing=PreprocessingConfig(size=64))
    assert DeviceSlices.fits(dataset, CUDA, 3, 64)
    order = list(np.random.default_rng(0).permutation(len(dataset))[:11])
    cached = list(DeviceSlices(dataset, CUDA).batches(order, 2))
    loaded = list(loader_batches(DataLoader(dataset, batch_size=2, sampler=order), CUDA))
    assert len(cached) == len(loaded) == 6
    for (images, targets), (expected_images, expected_targets) in zip(cached, loaded, strict=True):
        assert torch.equal(images, expected_images) and torch.equal(targets, expected_targets)
        assert images.is_contiguous(memory_format=torch.channels_last)


def test_training_on_cuda_in_bf16_with_the_data_on_the_gpu_resume_and_evaluate(tmp_path):
    from COVIDLesionSegTraining.evaluate import main as evaluate_main
    from COVIDLesionSegTraining.train import main as train_main

    data, run = synthetic_data(tmp_path / "data"), tmp_path / "run"
    assert train_main(train_arguments(data, run, "--max-steps", "3", "--save-every-seconds", "600")) == 0
    info = json.loads((run / "run_info.json").read_text())
    assert info["device"].startswith("cuda") and info["precision"] == "bf16"
    assert info["data_on_device"] == {"train": True, "val": True}
    assert json.loads((run / "config.json").read_text())["precision"] == "auto"
    assert any(line.startswith("precision: 'bf16'") for line in info["differences_from_paper"])
    assert train_main(["--output", str(run), "--resume", "--max-steps", "5"]) == 0
    assert log_steps(run) == ["3", "5"]
    best = load_checkpoint(run / "best.safetensors")
    assert all(tensor.dtype == torch.float32 for tensor in best.state_dict.values() if tensor.is_floating_point())
    assert best.metrics["step"] in (3, 5) and (run / "loss_curves.png").is_file()
    assert evaluate_main(["--checkpoint", str(run / "best.safetensors"), "--output", str(tmp_path / "test"), "--device", "cuda"]) == 0
    assert json.loads((tmp_path / "test" / "summary.json").read_text())["channels"]["lesion"]["slices"] == 6


def test_training_on_cuda_in_fp16_keeps_the_loss_scale(tmp_path):
    from COVIDLesionSegTraining.train import main as train_main

    data, run = synthetic_data(tmp_path / "data"), tmp_path / "run"
    assert train_main(train_arguments(data, run, "--max-steps", "2", "--precision", "fp16", "--augment", "flip")) == 0
    info = json.loads((run / "run_info.json").read_text())
    assert info["precision"] == "fp16" and info["data_on_device"] == {"train": False, "val": True}  # augmented: loader
    state = json.loads((run / "last.state.json").read_text())
    assert state["grad_scaler"]["scale"] > 0
    assert train_main(["--output", str(run), "--resume", "--max-steps", "3"]) == 0
    assert log_steps(run) == ["2", "3"]


def test_ddp_over_nccl_in_one_process(tmp_path):
    """One rank of a NCCL process group: DistributedDataParallel's broadcast and gradient all-reduce on the GPU."""
    import torch.distributed as dist

    torch.cuda.set_device(CUDA)
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1)
    try:
        model = nn.parallel.DistributedDataParallel(nn.Conv2d(3, 1, 3).to(CUDA), device_ids=[CUDA])
        model(torch.randn(2, 3, 16, 16, device=CUDA)).mean().backward()
        total = torch.ones(1, device=CUDA)
        dist.all_reduce(total)
        assert total.item() == 1 and all(p.grad is not None for p in model.parameters())
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason=f"NCCL needs one GPU per process; this machine has {torch.cuda.device_count()}")
def test_torchrun_two_processes_over_nccl(tmp_path):
    data, run = synthetic_data(tmp_path / "data"), tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "COVIDLesionSegTraining.train"]
    completed = subprocess.run([*command, *train_arguments(data, run, "--max-steps", "2")], capture_output=True, text=True, timeout=300,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    info = json.loads((run / "run_info.json").read_text())
    assert info["processes"] == 2 and info["steps_per_epoch"] == 3  # 12 slices over 2 processes at batch 2
    assert log_steps(run) == ["2"]
