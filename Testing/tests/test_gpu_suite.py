"""The GPU run prepared on the CPU: the suite's dry run end to end, and the training loop's GPU paths (data kept on the
device, loss scaling, deadline, throttled checkpoints) executed on the CPU, where they must not change what is learned."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from COVIDLesionSegLib.checkpoints import load_checkpoint
from COVIDLesionSegTraining import train as train_module
from COVIDLesionSegTraining.config import TrainConfig
from COVIDLesionSegTraining.splits import SplitSpec
from COVIDLesionSegTraining.train import RunControl, train, trim_log
from COVIDLesionSegTraining.train import main as train_main

ROOT = Path(__file__).resolve().parents[2]
TINY_WIDTHS = (4, 8, 16, 32, 64)


def tiny_config(data, output, **changes) -> TrainConfig:
    """A tiny U-Net at 64² holding out radiopaedia_7_85703_0: 6 train slices, 3 steps per epoch at batch 2."""
    values = {
        "model": "unet",
        "model_widths": TINY_WIDTHS,
        "channels": ("lesion", "lung"),
        "image_size": 64,
        "split": SplitSpec("holdout", holdout_groups=("radiopaedia_7_85703_0",)),
        "device": "cpu",
        **changes,
    }
    return TrainConfig(data_dir=str(data), output_dir=str(output), **values)


def log_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "log.csv", newline="") as stream:
        return list(csv.DictReader(stream))


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "last.safetensors").state_dict


def same_weights(first: Path, second: Path) -> bool:
    a, b = weights(first), weights(second)
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def test_configs_saved_before_precision_load_as_fp32_and_cpu_refuses_autocast(tiny_data, tmp_path):
    saved = tiny_config(tiny_data, tmp_path / "old").to_dict()
    del saved["precision"]
    assert TrainConfig.from_dict(saved).precision == "fp32"
    assert tiny_config(tiny_data, tmp_path, precision="auto").effective_precision("cpu") == "fp32"
    assert tiny_config(tiny_data, tmp_path, precision="auto").effective_precision("cuda") == "bf16"
    assert any(line.startswith("precision: 'bf16'") for line in tiny_config(tiny_data, tmp_path, precision="bf16").differences_from_paper())
    with pytest.raises(ValueError, match="precision"):
        tiny_config(tiny_data, tmp_path, precision="fp8")
    with pytest.raises(ValueError, match="is for CUDA"):
        train(tiny_config(tiny_data, tmp_path / "bf16", precision="bf16", max_steps=1))


def test_a_new_command_line_run_asks_for_auto_precision_and_trains_fp32_on_the_cpu(tiny_data, tmp_path):
    run = tmp_path / "run"
    arguments = ["--data", str(tiny_data), "--output", str(run), "--model", "unet", "--widths", *map(str, TINY_WIDTHS)]
    arguments += ["--image-size", "64", "--max-steps", "1", "--split", "holdout", "--holdout-groups", "radiopaedia_7_85703_0"]
    assert train_main([*arguments, "--device", "cpu"]) == 0
    assert json.loads((run / "config.json").read_text())["precision"] == "auto"
    info = json.loads((run / "run_info.json").read_text())
    assert info["precision"] == "fp32" and info["data_on_device"] == {"train": False, "val": False}
    assert not any("precision" in line for line in info["differences_from_paper"])


def test_command_line_time_limit_and_checkpoint_interval(tiny_data, tmp_path):
    run = tmp_path / "run"
    arguments = ["--data", str(tiny_data), "--output", str(run), "--model", "unet", "--widths", *map(str, TINY_WIDTHS), "--device", "cpu"]
    arguments += ["--image-size", "64", "--max-steps", "3", "--split", "holdout", "--holdout-groups", "radiopaedia_7_85703_0"]
    assert train_main([*arguments, "--time-limit-minutes", "0", "--save-every-seconds", "3600"]) == 0
    assert [row["step"] for row in log_rows(run)] == ["1"] and (run / "best.safetensors").is_file()
    saved = set(json.loads((run / "config.json").read_text()))
    assert not saved & {"deadline", "time_limit_minutes", "save_every_seconds"}  # how a run is executed is not its configuration
    assert train_main(["--output", str(run), "--resume"]) == 0
    assert [row["step"] for row in log_rows(run)] == ["1", "3"]


def test_a_deadline_stops_validates_saves_and_the_run_resumes_exactly(tiny_data, tmp_path):
    straight = tmp_path / "straight"
    train(tiny_config(tiny_data, straight, max_steps=4))
    cut = tmp_path / "cut"
    result = train(tiny_config(tiny_data, cut, max_steps=4), control=RunControl(deadline=time.time()))
    assert result["stopped"] == "time_limit" and result["step"] == 1  # at least one step, then the cut
    assert [row["step"] for row in log_rows(cut)] == ["1"] and (cut / "best.safetensors").is_file()
    assert train(tiny_config(tiny_data, cut, max_steps=4), resume=True)["stopped"] == "max_steps"
    assert [row["step"] for row in log_rows(cut)] == ["1", "3", "4"]
    assert same_weights(straight, cut)


def test_throttled_checkpoints_keep_the_best_in_memory_and_write_it_at_the_end(tiny_data, tmp_path):
    every_row, throttled = tmp_path / "every_row", tmp_path / "throttled"
    train(tiny_config(tiny_data, every_row, max_steps=4, validate_every_steps=1))
    result = train(tiny_config(tiny_data, throttled, max_steps=4, validate_every_steps=1), control=RunControl(save_every_seconds=3600))
    assert same_weights(every_row, throttled)
    assert log_rows(every_row) != [] and [r["val_loss"] for r in log_rows(every_row)] == [r["val_loss"] for r in log_rows(throttled)]
    best = load_checkpoint(throttled / "best.safetensors")
    assert best.metrics["step"] == result["best_step"] == load_checkpoint(every_row / "best.safetensors").metrics["step"]
    assert (throttled / "loss_curves.png").is_file()
    state = json.loads((throttled / "last.state.json").read_text())["progress"]
    assert state["step"] == 4 and state["best_step"] == result["best_step"]


def test_trim_log_drops_rows_after_the_saved_step(tmp_path):
    path = tmp_path / "log.csv"
    for step in (1, 2, 3):
        train_module.append_log_row(path, {"epoch": step, "step": step, "train_loss": 1, "val_loss": 1, "val_dice": 0, "seconds": 1})
    trim_log(path, 2)
    assert [row["step"] for row in log_rows(tmp_path)] == ["1", "2"]


def test_the_gpu_code_paths_run_on_the_cpu_and_learn_the_same(tiny_data, tmp_path, monkeypatch):
    """Data gathered from DeviceSlices instead of the DataLoader, and the GradScaler branch (a CPU GradScaler with
    scale 1), leave the weights of a plain fp32 run unchanged."""
    if not hasattr(torch.amp, "GradScaler"):
        pytest.skip("torch.amp.GradScaler (torch 2.3+) is needed for a CPU scaler")
    plain = tmp_path / "plain"
    train(tiny_config(tiny_data, plain, max_steps=4))

    def cpu_mixed_precision(config, device):
        return "fp16", None, torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=10**6)

    gpu_like = tmp_path / "gpu_like"
    with monkeypatch.context() as patch:
        patch.setattr(train_module.DeviceSlices, "fits", staticmethod(lambda *args: True))
        patch.setattr(train_module, "mixed_precision", cpu_mixed_precision)
        train(tiny_config(tiny_data, gpu_like, max_steps=2))
        train(tiny_config(tiny_data, gpu_like, max_steps=4), resume=True)
    info = json.loads((gpu_like / "run_info.json").read_text())
    assert info["data_on_device"] == {"train": True, "val": True} and info["precision"] == "fp16"
    assert json.loads((gpu_like / "last.state.json").read_text())["grad_scaler"]["scale"] == 1.0
    assert same_weights(plain, gpu_like)
    gpu_like_rows = {row["step"]: row["val_loss"] for row in log_rows(gpu_like)}  # steps 2 (the cut), 3 and 4
    assert all(gpu_like_rows[row["step"]] == row["val_loss"] for row in log_rows(plain))


def test_the_gpu_suite_dry_run_runs_every_stage(tmp_path):
    """``run_suite.sh --dry-run``: every stage on the CPU with synthetic data; the archive holds each stage's outputs."""
    out, work = tmp_path / "out", tmp_path / "work"
    environment = {**os.environ, "SUITE_WORK": str(work), "SUITE_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(["bash", str(ROOT / "Testing" / "gpu" / "run_suite.sh"), "--dry-run", str(out)],
                               capture_output=True, text=True, timeout=600, env=environment)  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-2000:]
    assert sorted(path.name for path in out.iterdir()) == ["results.tar.gz", "suite.log", "summary.md"]
    summary = (out / "summary.md").read_text()
    for stage in ("tests", "speed", "paper", "benchmark"):
        assert f"| {stage} | done |" in summary, summary
    with tarfile.open(out / "results.tar.gz") as archive:
        names = set(archive.getnames())
    for name in (
        "Testing/gpu/last-run/summary.md",
        "Testing/gpu/last-run/pytest.txt",
        "Testing/gpu/last-run/speed.md",
        "Training/results/paper-profile-paper-split/results.md",
        "Training/results/paper-profile-paper-split/fig7_predictions.png",
        "Training/results/paper-profile-paper-split/training/resattunet/log.csv",
        "Training/results/paper-profile-benchmark-fold0/results.md",
    ):
        assert "./" + name in names, name
    results = json.loads((work / "report" / "Training" / "results" / "paper-profile-paper-split" / "results.json").read_text())
    assert results["execution"]["jobs"] == 2 and results["execution"]["time_limit_minutes"] > 0
    assert set(results["models"]) == {"unet", "resunet", "attunet", "resattunet"} and not results["failed"]
    markdown = (work / "report" / "Training" / "results" / "paper-profile-paper-split" / "results.md").read_text()
    assert "trained 2 at a time" in markdown and "every run finished within it" in markdown


def test_prepare_carry_hides_large_tracked_files_for_the_call_and_restores_them(tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("prepare_carry", ROOT / "Testing" / "gpu" / "prepare_carry.py")
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    repository = tmp_path / "repository"
    (repository / "Resources").mkdir(parents=True)
    model = repository / "Resources" / "model.safetensors"
    model.write_bytes(os.urandom(6 * 2**20))
    (repository / "small.txt").write_text("small")
    (repository / ".gitignore").write_text("/runs/\n")
    for command in (["init", "-q"], ["add", "."], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "x"]):
        subprocess.run(["git", *command], cwd=repository, check=True)
    monkeypatch.setattr(prepare, "ROOT", repository)
    before, _ = prepare.travelling_bytes()
    prepare.hide_models(restore=False)
    assert model.stat().st_size == 0 and (repository / "runs" / "gpu-hold" / "Resources" / "model.safetensors").is_file()
    assert subprocess.run(["git", "status", "--porcelain"], cwd=repository, capture_output=True, text=True).stdout == ""
    assert prepare.travelling_bytes()[0] == before - 6 * 2**20
    prepare.hide_models(restore=True)
    assert model.stat().st_size == 6 * 2**20 and "S " not in prepare.git("ls-files", "-t")
