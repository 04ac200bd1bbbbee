"""``covidlesionseg-average-runs``: one network whose weights are the mean of several runs' (a "model soup").

::

    covidlesionseg-average-runs --runs runs/a-s0 runs/a-s1 runs/a-s2 --checkpoint last --output runs/a-soup

Averaging weights is meaningful only for networks in one basin of the loss: runs fine-tuned from the same
checkpoint with the same recipe, differing only in their seed. So the runs' ``config.json`` must agree on
everything but ``seed``, ``output_dir`` and where they ran (``device``, ``num_workers``), and their
checkpoints on the network, channels and preprocessing. Every floating tensor is averaged, batch-norm
running statistics included; integer tensors (batch counts) are the first run's.

The output is a run folder that :mod:`.compare_runs`, :mod:`.evaluate` and the CLI's ``--weights`` take:
``<checkpoint>.safetensors`` (metrics: ``step`` of the runs, ``averaged_from``), ``config.json`` (the first
run's, its ``output_dir`` the new folder) and ``averaged_from.json``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from COVIDLesionSegLib.checkpoints import Checkpoint, atomic_output, load_checkpoint, save_checkpoint

from .config import TrainConfig

ALLOWED_DIFFERENCES = ("seed", "output_dir", "device", "num_workers")


def average_checkpoints(checkpoints: Sequence[Checkpoint]) -> Checkpoint:
    """The first checkpoint with every floating tensor replaced by the mean over ``checkpoints``."""
    first = checkpoints[0]
    for other in checkpoints[1:]:
        for name in ("model_name", "model_kwargs", "channels", "preprocessing"):
            if getattr(other, name) != getattr(first, name):
                raise ValueError(f"the checkpoints differ in {name}: {getattr(first, name)!r} and {getattr(other, name)!r}")
        if other.state_dict.keys() != first.state_dict.keys():
            raise ValueError("the checkpoints hold different tensors")
    state = {
        name: sum(checkpoint.state_dict[name] for checkpoint in checkpoints) / len(checkpoints) if tensor.is_floating_point() else tensor
        for name, tensor in first.state_dict.items()
    }
    return replace(first, state_dict=state)


def average_runs(run_dirs: Sequence[Path], checkpoint: str, output_dir: Path) -> Path:
    """Write the soup of ``run_dirs``' ``<checkpoint>.safetensors`` as a run folder ``output_dir``; returns the checkpoint path."""
    if len(run_dirs) < 2:
        raise ValueError("averaging needs at least two runs")
    configs = [TrainConfig.load(Path(run_dir) / "config.json") for run_dir in run_dirs]
    first = configs[0].to_dict()
    for run_dir, config in zip(run_dirs[1:], configs[1:], strict=True):
        differing = sorted(name for name, value in config.to_dict().items() if name not in ALLOWED_DIFFERENCES and value != first[name])
        if differing:
            raise ValueError(f"{run_dir} differs from {run_dirs[0]} in {', '.join(differing)}: only runs of one recipe that differ "
                             f"in no more than {', '.join(ALLOWED_DIFFERENCES)} can be averaged")
    sources = [str(Path(run_dir) / f"{checkpoint}.safetensors") for run_dir in run_dirs]
    checkpoints = [load_checkpoint(source) for source in sources]
    soup = average_checkpoints(checkpoints)
    steps = sorted({item.metrics.get("step") for item in checkpoints}, key=str)
    soup = replace(soup, metrics={"step": steps[0] if len(steps) == 1 else steps, "averaged_from": sources})
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"{output_dir} is not empty; choose another --output")
    output_dir.mkdir(parents=True, exist_ok=True)
    with atomic_output(output_dir / "config.json") as temporary:
        replace(configs[0], output_dir=str(output_dir)).save(temporary)
    with atomic_output(output_dir / "averaged_from.json") as temporary:
        temporary.write_text(json.dumps({"checkpoint": checkpoint, "runs": [str(run_dir) for run_dir in run_dirs]}, indent=2) + "\n")
    return save_checkpoint(soup, output_dir / f"{checkpoint}.safetensors")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="covidlesionseg-average-runs", description=__doc__.splitlines()[0].split(": ", 1)[1])
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="run folders of one recipe, differing in --seed only")
    parser.add_argument("--checkpoint", choices=("best", "last"), default="last", help="which checkpoint of each run (default last)")
    parser.add_argument("--output", type=Path, required=True, help="the new run folder")
    arguments = parser.parse_args(argv)
    print(average_runs(arguments.runs, arguments.checkpoint, arguments.output))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
