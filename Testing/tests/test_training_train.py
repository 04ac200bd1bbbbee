"""Training end to end on a handful of real slices at 64²: the four models, checkpoints, resume, torchrun, CLIs."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from COVIDLesionSegLib.checkpoints import load_checkpoint
from COVIDLesionSegTraining import train as train_module
from COVIDLesionSegTraining.config import TrainConfig
from COVIDLesionSegTraining.evaluate import evaluate_checkpoint
from COVIDLesionSegTraining.evaluate import main as evaluate_main
from COVIDLesionSegTraining.splits import SplitSpec
from COVIDLesionSegTraining.train import main as train_main
from COVIDLesionSegTraining.train import train

TINY_WIDTHS = (4, 8, 16, 32, 64)
HOLDOUT = SplitSpec("holdout", holdout_groups=("radiopaedia_7_85703_0",))


def tiny_config(data_dir, output_dir, **changes) -> TrainConfig:
    values = {
        "model": "unet",
        "model_widths": TINY_WIDTHS,
        "channels": ("lesion", "lung"),
        "image_size": 64,
        "max_steps": 2,
        "split": HOLDOUT,
        "device": "cpu",
    }
    values.update(changes)
    return TrainConfig(data_dir=str(data_dir), output_dir=str(output_dir), **values)


def read_log(run_dir) -> list[dict]:
    with open(run_dir / "log.csv", newline="") as stream:
        return list(csv.DictReader(stream))


def test_defaults_are_the_papers_protocol():
    config = TrainConfig(data_dir="d", output_dir="o")
    assert (config.model, config.encoder_weights, config.learning_rate, config.batch_size, config.epochs) == (
        "resattunet",
        "imagenet",
        1e-4,
        2,
        200,
    )
    assert (config.image_size, config.dice_weight, config.split.kind, config.channels) == (256, 0.0, "paper", ("lesion",))
    assert config.differences_from_paper() == []


def test_config_round_trips_through_json_and_lists_its_departures(tmp_path):
    config = TrainConfig(
        data_dir="d",
        output_dir="o",
        encoder_weights="none",
        channels=("lesion", "lung"),
        augment="robust",
        dice_weight=1.0,
        learning_rate=3e-4,
        batch_size=4,
        max_steps=100,
        split=SplitSpec("holdout", holdout_groups=("coronacases_004",)),
    )
    config.save(tmp_path / "config.json")
    assert TrainConfig.load(tmp_path / "config.json") == config
    differences = "\n".join(config.differences_from_paper())
    for word in ("channels", "augment", "soft Dice", "learning_rate", "batch_size", "max_steps", "holdout", "encoder_weights"):
        assert word in differences
    assert config.model_kwargs()["encoder_weights"] == "none"
    assert TrainConfig(data_dir="d", output_dir="o").model_kwargs(for_checkpoint=True)["encoder_weights"] == "none"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model": "segformer"}, "unknown model"),
        ({"model": "resattunet", "model_widths": (4, 8)}, "model_widths"),
        ({"augment": "heavy"}, "augment"),
        ({"max_steps": 0}, "max_steps"),
        ({"channels": ()}, "channels"),
        ({"final_lr_steps": 5, "final_lr": 1e-5}, "fewer than max_steps"),  # no budget to end
        ({"max_steps": 10, "final_lr_steps": 10, "final_lr": 1e-5}, "fewer than max_steps"),
        ({"max_steps": 10, "final_lr_steps": 2}, "final_lr > 0"),
        ({"final_lr": 1e-5}, "needs final_lr_steps"),
    ],
)
def test_invalid_configs_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(data_dir="d", output_dir="o", **changes)


@pytest.mark.parametrize("model", ["unet", "attunet", "resunet", "resattunet"])
def test_each_model_trains_saves_reloads_and_evaluates(tiny_data, tmp_path, model):
    widths = TINY_WIDTHS if model in ("unet", "attunet") else None
    config = tiny_config(tiny_data, tmp_path / "run", model=model, model_widths=widths, encoder_weights="none")
    result = train(config)
    run_dir = tmp_path / "run"
    assert result["stopped"] == "max_steps" and result["step"] == 2
    for name in ("config.json", "run_info.json", "log.csv", "loss_curves.png", "best.safetensors", "last.safetensors", "last.state.json"):
        assert (run_dir / name).is_file(), name
    checkpoint = load_checkpoint(run_dir / "best.safetensors")
    assert checkpoint.model_name == model and checkpoint.channels == ["lesion", "lung"]
    assert checkpoint.preprocessing.size == 64 and checkpoint.metrics["step"] == 2
    assert TrainConfig.from_dict(checkpoint.train_config) == config
    network = checkpoint.build()
    assert network(torch.zeros(1, 3, 64, 64)).shape == (1, 2, 64, 64)
    summary = evaluate_checkpoint(run_dir / "best.safetensors", tiny_data, tmp_path / "eval", device="cpu")
    lesion = summary["channels"]["lesion"]
    assert summary["subset"] == "test" and lesion["slices"] == 3
    assert set(lesion["per_volume"]) == {"radiopaedia_7_85703_0"}
    assert sum(lesion["counts"].values()) == 3 * 256 * 256  # evaluated against the stored 256² labels
    assert (tmp_path / "eval" / "summary.json").is_file() and (tmp_path / "eval" / "per_slice.csv").is_file()


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "last.safetensors").state_dict


def test_resume_after_a_budget_or_a_signal_continues_exactly(tiny_data, tmp_path, monkeypatch):
    straight = train(tiny_config(tiny_data, tmp_path / "straight", max_steps=5, augment="robust"))
    assert straight["step"] == 5 and straight["epoch"] == 1  # 3 steps per epoch: stopped inside epoch 2

    budget = tmp_path / "budget"
    assert train(tiny_config(tiny_data, budget, max_steps=2, augment="robust"))["step"] == 2
    resumed = train(tiny_config(tiny_data, budget, max_steps=5, augment="robust"), resume=True)
    assert resumed["step"] == 5
    assert [row["step"] for row in read_log(budget)] == ["2", "3", "5"]
    assert json.loads((budget / "run_info.json").read_text())["resumed_at_steps"] == [2]

    calls = []
    original_forward = train_module.SegmentationLoss.forward

    def forward_then_interrupt(self, logits, targets):
        calls.append(1)
        if len(calls) == 2:  # during the second optimizer step
            signal.raise_signal(signal.SIGINT)
        return original_forward(self, logits, targets)

    interrupted = tmp_path / "interrupted"
    with monkeypatch.context() as patch:
        patch.setattr(train_module.SegmentationLoss, "forward", forward_then_interrupt)
        stopped = train(tiny_config(tiny_data, interrupted, max_steps=5, augment="robust"))
    assert stopped["stopped"] == "signal" and stopped["step"] == 2
    assert json.loads((interrupted / "last.state.json").read_text())["progress"]["batches_done"] == 2
    assert train(tiny_config(tiny_data, interrupted, max_steps=5, augment="robust"), resume=True)["step"] == 5

    expected = final_weights(tmp_path / "straight")
    for run_dir in (budget, interrupted):
        weights = final_weights(run_dir)
        assert all(torch.equal(weights[name], expected[name]) for name in expected), run_dir.name


def test_weight_average_is_a_moving_average_of_parameters_and_batch_norm_statistics():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    average = train_module.WeightAverage(model, decay=0.75)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.add_(4)  # parameters, running statistics and the batch count all move
    average.update(model)
    for name, tensor in average.network.state_dict().items():
        expected = before[name] + 4 if name.endswith("num_batches_tracked") else before[name] + 0.25 * 4
        torch.testing.assert_close(tensor, expected)
    assert not average.network.training and not any(parameter.requires_grad for parameter in average.network.parameters())
    with pytest.raises(ValueError, match="weight_average_decay"):
        TrainConfig(data_dir="d", output_dir="o", weight_average_decay=1.0)


def test_an_averaged_run_saves_the_average_and_resumes_exactly(tiny_data, tmp_path):
    averaged = {"weight_average_decay": 0.5, "augment": "robust"}
    train(tiny_config(tiny_data, tmp_path / "straight", max_steps=4, **averaged))
    train(tiny_config(tiny_data, tmp_path / "budget", max_steps=2, **averaged))
    train(tiny_config(tiny_data, tmp_path / "budget", max_steps=4, **averaged), resume=True)
    expected = final_weights(tmp_path / "straight")
    resumed = final_weights(tmp_path / "budget")
    assert all(torch.equal(resumed[name], expected[name]) for name in expected)
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "straight" / "last.state.safetensors"))
    trained = {name.removeprefix("training_weights."): tensor for name, tensor in state.items() if name.startswith("training_weights.")}
    assert trained.keys() == expected.keys()
    assert any(not torch.equal(trained[name], expected[name]) for name in expected)  # the checkpoint is the average, not the last step
    plain = train(tiny_config(tiny_data, tmp_path / "plain", max_steps=4, augment="robust"))
    assert plain["step"] == 4
    assert not any(name.startswith("training_weights.") for name in load_file(str(tmp_path / "plain" / "last.state.safetensors")))


def test_final_learning_rate_takes_the_last_steps_of_the_budget_and_resumes_exactly(tiny_data, tmp_path, monkeypatch):
    ending = {"max_steps": 4, "final_lr_steps": 2, "final_lr": 1e-6, "learning_rate": 1e-2}
    config = tiny_config(tiny_data, tmp_path / "o", **ending)
    assert [config.learning_rate_at(step) for step in range(4)] == [1e-2, 1e-2, 1e-6, 1e-6]
    assert "final_lr: the last 2 steps at learning rate 1e-06 (paper: one rate)" in config.differences_from_paper()
    train(tiny_config(tiny_data, tmp_path / "straight", **ending))
    state = json.loads((tmp_path / "straight" / "last.state.json").read_text(encoding="utf-8"))
    assert {group["lr"] for group in state["param_groups"]} == {1e-6}  # the rate of the last step
    train(tiny_config(tiny_data, tmp_path / "constant", max_steps=4, learning_rate=1e-2))
    weights, constant = final_weights(tmp_path / "straight"), final_weights(tmp_path / "constant")
    assert any(not torch.equal(weights[name], constant[name]) for name in weights)  # the final rate changed the last two steps

    calls = []
    original_forward = train_module.SegmentationLoss.forward

    def forward_then_interrupt(self, logits, targets):
        calls.append(1)
        if len(calls) == 3:  # during the third optimizer step, the first at the final rate
            signal.raise_signal(signal.SIGINT)
        return original_forward(self, logits, targets)

    with monkeypatch.context() as patch:
        patch.setattr(train_module.SegmentationLoss, "forward", forward_then_interrupt)
        assert train(tiny_config(tiny_data, tmp_path / "resumed", **ending))["step"] == 3
    assert train(tiny_config(tiny_data, tmp_path / "resumed", **ending), resume=True)["step"] == 4
    resumed = final_weights(tmp_path / "resumed")
    assert all(torch.equal(resumed[name], weights[name]) for name in weights)
    # stopped on an epoch's last step: resuming validates that epoch first, as the straight run did, with no training loss
    rows, straight_rows = read_log(tmp_path / "resumed"), read_log(tmp_path / "straight")
    assert [row["step"] for row in rows] == [row["step"] for row in straight_rows] == ["3", "4"]
    assert rows[0]["train_loss"] == "nan" and rows[0]["val_loss"] == straight_rows[0]["val_loss"]


def test_validation_every_n_steps_crosses_epochs_and_leaves_training_unchanged(tiny_data, tmp_path):
    train(tiny_config(tiny_data, tmp_path / "per_epoch", max_steps=5))
    every_two = tmp_path / "every_two"
    result = train(tiny_config(tiny_data, every_two, max_steps=5, validate_every_steps=2))
    assert result["step"] == 5 and result["best_step"] in (2, 4, 5)
    log = read_log(every_two)
    assert [row["step"] for row in log] == ["2", "4", "5"]  # 3 steps per epoch: no row at the epoch's end (step 3)
    assert [row["epoch"] for row in log] == ["0.6667", "1.3333", "1.6667"]
    expected, weights = final_weights(tmp_path / "per_epoch"), final_weights(every_two)
    assert all(torch.equal(weights[name], expected[name]) for name in expected)


def test_command_line_train_resume_and_evaluate(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    arguments = ["--data", str(tiny_data), "--output", str(run_dir), "--model", "attunet", "--widths", *map(str, TINY_WIDTHS)]
    arguments += ["--image-size", "64", "--max-steps", "1", "--split", "holdout", "--holdout-groups", "radiopaedia_7_85703_0"]
    assert train_main([*arguments, "--dice-weight", "1", "--lr", "3e-4", "--device", "cpu"]) == 0
    assert json.loads((run_dir / "config.json").read_text())["learning_rate"] == 3e-4
    with pytest.raises(FileExistsError, match="--resume"):
        train_main(arguments)
    assert train_main(["--output", str(run_dir), "--resume", "--max-steps", "2"]) == 0
    assert [row["step"] for row in read_log(run_dir)] == ["1", "2"]
    with pytest.raises(ValueError, match="learning_rate"):
        train_main(["--output", str(run_dir), "--resume", "--max-steps", "3", "--lr", "1e-3"])

    output = tmp_path / "evaluation"
    assert evaluate_main(["--checkpoint", str(run_dir / "best.safetensors"), "--output", str(output)]) == 0  # data from the checkpoint
    summary = json.loads((output / "summary.json").read_text())
    assert summary["split"]["holdout_groups"] == ["radiopaedia_7_85703_0"] and summary["channels"]["lesion"]["slices"] == 3


def test_torchrun_with_two_cpu_processes(tiny_data, tmp_path):
    run_dir = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["-m", "COVIDLesionSegTraining.train", "--data", str(tiny_data), "--output", str(run_dir), "--device", "cpu"]
    command += ["--model", "unet", "--widths", *map(str, TINY_WIDTHS), "--image-size", "64", "--max-steps", "2"]
    command += ["--split", "holdout", "--holdout-groups", "radiopaedia_7_85703_0"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120, env=environment)
    assert completed.returncode == 0, completed.stderr[-3000:]
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["processes"] == 2 and info["steps_per_epoch"] == 2  # 6 slices over 2 processes at batch 2
    assert [row["step"] for row in read_log(run_dir)] == ["2"]
    assert load_checkpoint(run_dir / "last.safetensors").metrics["step"] == 2


def test_batch_dice_counts_the_false_lesion_of_a_lesion_free_slice():
    """Per slice, a lesion-free slice's soft Dice is ~0 whatever it predicts (almost no gradient against false
    lesion); pooled over the batch, its false lesion lowers the batch's Dice like any false positive."""
    from COVIDLesionSegTraining.train import SegmentationLoss, soft_dice_loss

    targets = torch.zeros(2, 1, 256, 256)
    targets[0, 0, 100:132, 100:132] = 1  # slice 0: 1,024 lesion pixels; slice 1 lesion-free
    logits = torch.full_like(targets, -8.0)  # background p = 0.0003
    logits[0, 0, 100:132, 100:132] = 8.0
    logits[1, 0, :16, :16] = 0.0  # 256 uncertain (p = 0.5) false-lesion pixels on the lesion-free slice
    probabilities = torch.sigmoid(logits)
    pooled = (2 * (probabilities * targets).sum() + 1) / (probabilities.sum() + targets.sum() + 1)
    assert soft_dice_loss(logits, targets, per_slice=False).item() == pytest.approx(1 - pooled.item(), rel=1e-5)
    gradients = {}
    for mode in ("per-slice", "batch"):
        leaf = logits.clone().requires_grad_()
        SegmentationLoss(1.0, mode)(leaf, targets).backward()
        gradients[mode] = leaf.grad[1, 0, :16, :16].mean().item()
    assert gradients["batch"] > 5 * gradients["per-slice"] > 0  # pushes the false lesion down far harder


def test_dice_mode_is_a_recipe_option_of_training_and_cross_validation():
    from COVIDLesionSegTraining.crossval import build_parser as crossval_parser
    from COVIDLesionSegTraining.train import build_parser, config_from_arguments

    arguments = vars(build_parser().parse_args(["--data", "d", "--output", "o", "--dice-weight", "1", "--dice-mode", "batch"]))
    config = config_from_arguments({key: arguments[key] for key in ("data_dir", "output_dir", "dice_weight", "dice_mode")})
    assert TrainConfig.from_dict(config.to_dict()).dice_mode == "batch"
    pooled = "loss: BCEWithLogits + 1.0 × soft Dice, pooled over each batch (paper: BCEWithLogitsLoss only)"
    assert pooled in config.differences_from_paper()
    assert TrainConfig.from_dict({"data_dir": "d", "output_dir": "o"}).dice_mode == "per-slice"  # configs saved before it
    with pytest.raises(ValueError, match="dice_mode"):
        TrainConfig(data_dir="d", output_dir="o", dice_mode="volume")
    cv = crossval_parser().parse_args(["--recipe", "r", "--data", "d", "--runs", "x", "--output", "y", "--dice-mode", "batch"])
    assert cv.dice_mode == "batch"


def test_lesion_free_sampling_field_of_view_and_seed_are_cross_validation_changes():
    from COVIDLesionSegTraining.crossval import CLI_CHANGES, fold_config
    from COVIDLesionSegTraining.crossval import build_parser as crossval_parser

    arguments = ["--recipe", "r", "--data", "d", "--runs", "x", "--output", "y", "--negative-fraction", "0.5", "--dependent-density", "0.7"]
    args = crossval_parser().parse_args([*arguments, "--seed", "1", "--field-of-view", "full", "--thick-slices", "0.5",
                                         "--coarse-reconstructions", "0.4"])
    changes = {name: value for name in CLI_CHANGES if (value := getattr(args, name)) is not None}
    assert changes == {"negative_fraction": 0.5, "dependent_density": 0.7, "field_of_view": "full", "seed": 1, "thick_slices": 0.5,
                       "coarse_reconstructions": 0.4}
    recipe = TrainConfig(data_dir="d", output_dir="o", negatives_dir="n", negative_fraction=0.25, field_of_view="body").to_dict()
    config = fold_config(recipe, "d", "runs", fold=1, num_folds=5, changes=changes)
    assert (config.negative_fraction, config.dependent_density, config.negatives_dir, config.split.fold) == (0.5, 0.7, "n", 1)
    assert config.thick_slices == 0.5 and config.coarse_reconstructions == 0.4
    assert config.field_of_view == "full" and config.preprocessing().field_of_view == "full"
    assert config.seed == 1 and config.split.seed == TrainConfig(data_dir="d", output_dir="o").split.seed  # the same patients per fold
