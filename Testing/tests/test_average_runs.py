"""``covidlesionseg-average-runs``: the mean of several seeds' weights as one run folder (a model soup)."""

from dataclasses import replace

import pytest
import torch

from COVIDLesionSegLib.checkpoints import Checkpoint, load_checkpoint, save_checkpoint
from COVIDLesionSegLib.models import build_model
from COVIDLesionSegTraining.average_runs import main as average_main
from COVIDLesionSegTraining.config import TrainConfig

RECIPE = {"data_dir": "d", "model": "unet", "model_widths": (4, 8, 16, 32, 64), "encoder_weights": "none", "channels": ("lesion", "lung")}


def write_run(folder, seed: int, **changes) -> Checkpoint:
    config = TrainConfig(output_dir=str(folder), seed=seed, **{**RECIPE, **changes})
    torch.manual_seed(seed)
    network = build_model(config.model, **config.model_kwargs(for_checkpoint=True))
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):  # running statistics differ between runs too
            module.running_mean.uniform_(-1, 1)
            module.num_batches_tracked.fill_(10 + seed)
    checkpoint = Checkpoint(config.model, config.model_kwargs(for_checkpoint=True), network.state_dict(), list(config.channels),
                            config.preprocessing(), config.to_dict(), {"step": 300})
    folder.mkdir()
    config.save(folder / "config.json")
    save_checkpoint(checkpoint, folder / "last.safetensors")
    return checkpoint


def test_soup_is_the_mean_of_the_seeds_weights_and_refuses_other_recipes(tmp_path, capsys):
    runs = [write_run(tmp_path / f"s{seed}", seed, device=("cpu", "cuda", "auto")[seed]) for seed in range(3)]  # where they ran
    output = tmp_path / "soup"
    assert average_main(["--runs", *(str(tmp_path / f"s{seed}") for seed in range(3)), "--output", str(output)]) == 0
    soup = load_checkpoint(output / "last.safetensors")
    for name, tensor in runs[0].state_dict.items():
        expected = sum(run.state_dict[name] for run in runs) / 3 if tensor.is_floating_point() else tensor
        torch.testing.assert_close(soup.state_dict[name], expected)
    assert soup.metrics["step"] == 300 and len(soup.metrics["averaged_from"]) == 3
    assert TrainConfig.load(output / "config.json") == replace(TrainConfig.load(tmp_path / "s0" / "config.json"), output_dir=str(output))
    soup.build()  # a network that loads
    with pytest.raises(FileExistsError, match="not empty"):
        average_main(["--runs", str(tmp_path / "s0"), str(tmp_path / "s1"), "--output", str(output)])
    write_run(tmp_path / "other-lr", 1, learning_rate=3e-4)
    with pytest.raises(ValueError, match="learning_rate"):
        average_main(["--runs", str(tmp_path / "s0"), str(tmp_path / "other-lr"), "--output", str(tmp_path / "mixed")])
    with pytest.raises(ValueError, match="at least two"):
        average_main(["--runs", str(tmp_path / "s0"), "--output", str(tmp_path / "one")])
