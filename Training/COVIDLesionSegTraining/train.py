"""The training loop, and ``covidlesionseg-train``.

One linear loop: split → datasets → model → Adam → epochs of optimizer steps → validation → checkpoints.
A run folder (``TrainConfig.output_dir``) holds:

- ``config.json`` — the :class:`~.config.TrainConfig`; ``run_info.json`` — differences from the paper,
  the split (slice counts, volumes, warnings), device, processes, steps per epoch;
- ``log.csv`` — one row per validation: after each epoch (and the partial epoch a step budget ends), or
  every ``validate_every_steps`` optimizer steps and at the end when that is set: ``epoch`` (epochs
  completed, fractional), ``step``, ``train_loss`` (mean over the steps since the previous row),
  ``val_loss``, ``val_dice`` (pooled Dice of the first channel at probability 0.5), ``seconds`` (since the
  previous row: training and validation); ``loss_curves.png`` drawn from it;
- ``best.safetensors`` (lowest validation loss) and ``last.safetensors``, written with the core's
  :func:`~COVIDLesionSegLib.checkpoints.save_checkpoint`; ``last.state.safetensors`` +
  ``last.state.json`` hold what resuming needs besides the weights (optimizer tensors, RNG state, epoch,
  step, position inside the epoch, best validation loss) — no pickles.

Sample order is a seeded permutation per epoch (``DistributedSampler``), and augmentation is seeded per
sample, so ``--resume`` continues exactly where ``last`` stopped, even mid-epoch. ``last`` is written with
every log row and on SIGINT/SIGTERM (after the current step).

Several processes (GPUs) use the same command under ``torchrun``: one process per device,
DistributedDataParallel, a per-process batch of ``batch_size``; rank 0 writes the files.
``torchrun --nproc-per-node 4 -m COVIDLesionSegTraining.train --data … --output …``

On CUDA (the CPU path is unchanged): ``precision`` "bf16"/"auto" trains under bf16 autocast, "fp16" under fp16
autocast with a GradScaler (its scale is saved in ``last.state.json``); weights, optimizer and loss stay fp32.
A training or validation set whose items are fixed (no augmentation, no lesion-free mix) and small enough is
preprocessed once and kept on the GPU, batches gathered there; the loss is summed on the GPU and read once
per log row, so a bf16 step makes no host round trip (fp16's GradScaler reads its overflow check at each step).
:class:`RunControl` sets how a run is executed without changing what it learns: a wall-clock deadline (stop,
validate, save: a cut run resumes), how often ``last``, ``best`` and the curves are written, the progress bar.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import logging
import math
import os
import signal
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, DistributedSampler
from tqdm import tqdm

from COVIDLesionSegLib.checkpoints import Checkpoint, atomic_output, load_checkpoint, locate_model, save_checkpoint
from COVIDLesionSegLib.models import build_model, count_parameters
from COVIDLesionSegLib.predictor import resolve_device

from .config import DICE_MODES, PRECISIONS, TrainConfig
from .data import ManifestSliceDataset, with_heavy_disease_repeated
from .evaluate import confusion_counts, metrics_from_counts
from .negatives import MixedSliceDataset, NegativeVolumeDataset
from .splits import Split, make_split

logger = logging.getLogger(__name__)

LOG_COLUMNS = ("epoch", "step", "train_loss", "val_loss", "val_dice", "seconds")
# Fields a resumed run may change; any other difference from the saved config.json is refused.
RESUMABLE_CHANGES = ("max_steps", "epochs", "num_workers", "device", "data_dir", "precision", "init_recipe")  # init_recipe: kept
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
DEVICE_DATA_FRACTION = 0.25  # a fixed dataset is kept on the GPU when it needs at most this share of its memory


@dataclass(frozen=True)
class RunControl:
    """How a run is executed, beyond its :class:`TrainConfig`; nothing here changes what is learned.

    - ``deadline``: ``time.time()`` after which training stops at the next step, validates, logs and saves
      (``stopped == "time_limit"``); the run is unfinished and ``--resume`` continues it. None: no limit.
    - ``save_every_seconds``: write ``last``, ``best`` and ``loss_curves.png`` at a log row only when this long has
      passed since they were last written (and always when training stops); a better validation loss in between is
      kept as a copy in memory until then. 0: at every log row (each epoch at 200 epochs: hundreds of MB each time).
    - ``progress_bar``: the tqdm bar (off in parallel workers).
    """

    deadline: float | None = None
    save_every_seconds: float = 0.0
    progress_bar: bool = True


@dataclass
class TrainingProgress:
    """Where training stands; saved as ``last.state.json``."""

    epoch: int = 0  # epochs completed
    batches_done: int = 0  # optimizer steps done inside epoch ``epoch``
    step: int = 0  # optimizer steps done in all
    best_val_loss: float = math.inf
    best_step: int = -1
    processes: int = 1  # training processes the epoch's samples are sharded over


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def training_device(name: str, local_rank: int = 0) -> torch.device:
    """The core's device choice (``"auto"`` = CUDA if available); under torchrun CUDA means ``cuda:<local_rank>``."""
    device = resolve_device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def start_distributed(device_name: str) -> tuple[DistributedContext, torch.device]:
    """Join the ``torchrun`` process group when ``WORLD_SIZE`` > 1 (NCCL on CUDA, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistributedContext(), training_device(device_name)
    context = DistributedContext(int(os.environ["RANK"]), world_size, int(os.environ["LOCAL_RANK"]))
    device = training_device(device_name, context.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return context, device


def set_cpu_threads(context: DistributedContext) -> None:
    """Share this machine's cores among the local training processes (intra-op threads), unless ``OMP_NUM_THREADS``
    sets the count: on cores that another job is using, fewer threads can be many times faster (OpenMP threads wait
    for each other)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return  # torch took its thread count from it at start-up
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", context.world_size))
    torch.set_num_threads(max(1, cores // local_processes))


def soft_dice_loss(logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0, per_slice: bool = True) -> torch.Tensor:
    """1 − soft Dice of ``[N, C, H, W]`` logits against targets, per channel: per sample and averaged
    (``per_slice``), or over all the batch's pixels at once; ``smooth`` in pixels."""
    probabilities = torch.sigmoid(logits)
    if not per_slice:
        probabilities, targets = probabilities.transpose(0, 1).unsqueeze(0), targets.transpose(0, 1).unsqueeze(0)
    probabilities, targets = probabilities.flatten(2), targets.flatten(2)
    overlap = (probabilities * targets).sum(-1)
    dice = (2 * overlap + smooth) / (probabilities.sum(-1) + targets.sum(-1) + smooth)
    return 1 - dice.mean()


class SegmentationLoss(nn.Module):
    """BCEWithLogits (mean over pixels, the paper's loss) + ``dice_weight`` × soft Dice (``dice_mode``: see
    :data:`~.config.DICE_MODES`)."""

    def __init__(self, dice_weight: float = 0.0, dice_mode: str = "per-slice"):
        super().__init__()
        self.dice_weight = dice_weight
        self.per_slice = dice_mode == "per-slice"

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = F.binary_cross_entropy_with_logits(logits, targets)
        if self.dice_weight:
            loss = loss + self.dice_weight * soft_dice_loss(logits, targets, per_slice=self.per_slice)
        return loss


def epoch_order(dataset_size: int, epoch: int, seed: int, context: DistributedContext) -> list[int]:
    """This process's sample indices for ``epoch``: a permutation seeded by (seed, epoch), sharded by rank."""
    sampler = DistributedSampler(range(dataset_size), num_replicas=context.world_size, rank=context.rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return list(sampler)


def sum_over_processes(values: list[float], device: torch.device, context: DistributedContext) -> list[float]:
    if not context.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


class DeviceSlices:
    """Every item of a fixed dataset (no augmentation), preprocessed once and stacked on ``device``; batches are
    gathered there by index, so no step reads, preprocesses or copies a slice."""

    def __init__(self, dataset, device: torch.device):
        items = [dataset[index] for index in range(len(dataset))]
        self.device = device
        self.images = torch.stack([item["image"] for item in items]).to(device, memory_format=torch.channels_last)
        self.targets = torch.stack([item["target"] for item in items]).to(device)

    @staticmethod
    def fits(dataset, device: torch.device, image_channels: int, size: int) -> bool:
        """Whether ``dataset`` is fixed (augmentation "none", lesion slices only) and needs at most
        ``DEVICE_DATA_FRACTION`` of the GPU's memory."""
        if device.type != "cuda" or not isinstance(dataset, ManifestSliceDataset) or dataset.augment != "none":
            return False
        needed = len(dataset) * (image_channels + len(dataset.channels)) * size * size * 4
        return needed <= DEVICE_DATA_FRACTION * torch.cuda.get_device_properties(device).total_memory

    def batches(self, order: Sequence[int], batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(images, targets)`` batches in ``order``; the order goes to the GPU once."""
        index = torch.as_tensor(list(order), dtype=torch.int64).to(self.device)
        for start in range(0, len(index), batch_size):
            chosen = index[start : start + batch_size]
            images = self.images.index_select(0, chosen).contiguous(memory_format=torch.channels_last)
            yield images, self.targets.index_select(0, chosen)


def loader_batches(loader: DataLoader, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for batch in loader:
        images = batch["image"].to(device, non_blocking=True, memory_format=torch.channels_last)
        yield images, batch["target"].to(device, non_blocking=True)


@torch.no_grad()
def validate(
    model: nn.Module,
    dataset: ManifestSliceDataset,
    loss_function: nn.Module,
    device: torch.device,
    batch_size: int,
    context: DistributedContext,
    autocast=None,
    cached: DeviceSlices | None = None,
) -> tuple[float, float]:
    """Mean validation loss per slice and pooled Dice of the first channel, over all processes' shards.

    Sums stay on ``device`` until the end (one host round trip); ``autocast`` (a context) wraps the forward pass;
    ``cached`` holds ``dataset`` on the GPU."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    slices, counts = 0, torch.zeros(4, dtype=torch.int64, device=device)
    indices = list(range(context.rank, len(dataset), context.world_size))
    if cached is not None:
        batches = cached.batches(indices, batch_size)
    else:
        chunks = (indices[start : start + batch_size] for start in range(0, len(indices), batch_size))
        batches = loader_batches((collate([dataset[index] for index in chunk]) for chunk in chunks), device)
    for images, targets in batches:
        with autocast or nullcontext():
            logits = model(images)
        logits = logits.float()
        loss_sum += loss_function(logits, targets).double() * len(images)
        slices += len(images)
        counts += confusion_counts(logits[:, 0] > 0, targets[:, 0] > 0.5).sum(0)
    loss_sum, slices, *summed_counts = sum_over_processes([loss_sum.item(), slices, *counts.tolist()], device, context)
    model.train()
    return loss_sum / slices, metrics_from_counts(summed_counts)["F1"]


def collate(items: list[dict]) -> dict:
    return {"image": torch.stack([item["image"] for item in items]), "target": torch.stack([item["target"] for item in items])}


class StopRequest:
    """Turns the first SIGINT/SIGTERM into a request to stop after the current step; a second one kills."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self) -> StopRequest:
        for signal_number in (signal.SIGINT, signal.SIGTERM):
            self._previous[signal_number] = signal.signal(signal_number, self._handle)
        return self

    def _handle(self, signal_number, frame) -> None:
        self.requested = True
        signal.signal(signal_number, self._previous[signal_number])
        logger.warning("stop requested: finishing this step, then saving last.safetensors (signal again to abort)")

    def __exit__(self, *exc_info) -> None:
        for signal_number, handler in self._previous.items():
            signal.signal(signal_number, handler)


def save_training_state(
    run_dir: Path, optimizer: torch.optim.Optimizer, progress: TrainingProgress, scaler=None, training_weights: dict | None = None
) -> None:
    """``last.state.safetensors`` (optimizer tensors, RNG states; ``training_weights``, the weights being trained, when
    the checkpoints hold their moving average) and ``last.state.json`` (the rest, with the fp16 GradScaler's state if
    any)."""
    from safetensors.torch import save_file

    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for parameter_id, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{parameter_id}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{parameter_id}.{key}"] = value
    tensors["rng.torch"] = torch.get_rng_state()
    for name, tensor in (training_weights or {}).items():
        tensors[f"training_weights.{name}"] = tensor.detach().cpu().contiguous()
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{index}": rng for index, rng in enumerate(torch.cuda.get_rng_state_all())})
    with atomic_output(run_dir / "last.state.safetensors") as temporary:
        save_file(tensors, str(temporary))
    document = {"progress": asdict(progress), "param_groups": state["param_groups"], "optimizer_scalars": scalars}
    if scaler is not None:
        document["grad_scaler"] = scaler.state_dict()
    with atomic_output(run_dir / "last.state.json") as temporary:
        temporary.write_text(json.dumps(document, indent=1))


def load_training_state(
    run_dir: Path, optimizer: torch.optim.Optimizer, scaler=None, trained_model: nn.Module | None = None
) -> TrainingProgress:
    """Restore the optimizer, RNG (and GradScaler) states written by :func:`save_training_state`, and the weights being
    trained into ``trained_model`` (runs whose checkpoints hold a moving average); returns the progress."""
    from safetensors.torch import load_file

    document = json.loads((run_dir / "last.state.json").read_text())
    tensors = load_file(str(run_dir / "last.state.safetensors"))
    state: dict[int, dict] = {}
    for name, tensor in tensors.items():
        if name.startswith("optimizer."):
            _, parameter_id, key = name.split(".", 2)
            state.setdefault(int(parameter_id), {})[key] = tensor
    for name, value in document["optimizer_scalars"].items():
        parameter_id, key = name.split(".", 1)
        state.setdefault(int(parameter_id), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": document["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[name] for name in sorted(name for name in tensors if name.startswith("rng.cuda."))]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    if scaler is not None and document.get("grad_scaler"):
        scaler.load_state_dict(document["grad_scaler"])
    if trained_model is not None:
        prefix = "training_weights."
        weights = {name[len(prefix) :]: tensor for name, tensor in tensors.items() if name.startswith(prefix)}
        if not weights:
            raise ValueError(f"{run_dir / 'last.state.safetensors'} holds no training weights to continue the averaged run from")
        trained_model.load_state_dict(weights)
    return TrainingProgress(**document["progress"])


def trim_log(path: Path, step: int) -> None:
    """Drop ``log.csv`` rows after ``step`` (written after the last save of a run that then crashed)."""
    if not path.is_file():
        return
    with open(path, newline="") as stream:
        rows = list(csv.DictReader(stream))
    kept = [row for row in rows if int(row["step"]) <= step]
    if len(kept) < len(rows):
        path.unlink()
        for row in kept:
            append_log_row(path, row)


def append_log_row(path: Path, row: dict) -> None:
    new = not path.is_file()
    with open(path, "a", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=LOG_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def plot_loss_curves(log_path: Path, image_path: Path) -> None:
    """``loss_curves.png``: training and validation loss, and validation Dice, against epochs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(log_path, newline="") as stream:
        rows = list(csv.DictReader(stream))
    epochs = [float(row["epoch"]) for row in rows]
    figure, (loss_axes, dice_axes) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axes.plot(epochs, [float(row["train_loss"]) for row in rows], marker=".", label="training")
    loss_axes.plot(epochs, [float(row["val_loss"]) for row in rows], marker=".", label="validation")
    loss_axes.set(xlabel="epoch", ylabel="loss", title="Loss")
    loss_axes.legend()
    dice_axes.plot(epochs, [float(row["val_dice"]) for row in rows], marker=".", color="tab:green")
    dice_axes.set(xlabel="epoch", ylabel="Dice", title="Validation Dice (pooled, threshold 0.5)", ylim=(0, 1))
    figure.tight_layout()
    with atomic_output(image_path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
    plt.close(figure)


class WeightAverage:
    """An exponential moving average of a network's weights: after each optimizer step every floating tensor of the
    state (parameters and batch-norm statistics) becomes ``decay × average + (1 − decay) × current``; integer
    buffers are copied. ``network`` (a copy of the model, in eval mode) is what a run with
    ``weight_average_decay`` validates and saves; the model itself trains on."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.network = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        current = model.state_dict()
        for name, average in self.network.state_dict().items():
            if average.is_floating_point():
                average.lerp_(current[name], 1.0 - self.decay)
            else:
                average.copy_(current[name])


def start_from_weights(model: nn.Module, config: TrainConfig) -> TrainConfig:
    """Load ``config.init_from``'s weights (a checkpoint file or registry name) into ``model``: fine-tuning.
    Returns ``config`` with ``init_recipe``, the checkpoint's own ``train_config``, recorded.

    The checkpoint must hold the same network, output channels and preprocessing as ``config``."""
    path, _ = locate_model(config.init_from)
    checkpoint = load_checkpoint(path)
    expected = {"network": config.model, "model arguments": config.model_kwargs(for_checkpoint=True), "channels": list(config.channels),
                "preprocessing": config.preprocessing()}
    found = {"network": checkpoint.model_name, "model arguments": checkpoint.model_kwargs, "channels": list(checkpoint.channels),
             "preprocessing": checkpoint.preprocessing}
    differing = [f"{name}: {found[name]!r} (this run: {expected[name]!r})" for name in expected if found[name] != expected[name]]
    if differing:
        raise ValueError(f"{path}: cannot start from this checkpoint; " + "; ".join(differing))
    model.load_state_dict({name: tensor.float() for name, tensor in checkpoint.state_dict.items()})
    logger.info("starting from the weights of %s", path)
    return replace(config, init_recipe=checkpoint.train_config or None)


def check_resumable(saved: TrainConfig, requested: TrainConfig) -> None:
    saved_values, requested_values = saved.to_dict(), requested.to_dict()
    changed = [name for name in saved_values if name not in RESUMABLE_CHANGES and saved_values[name] != requested_values[name]]
    if changed:
        details = "; ".join(f"{name}: saved {saved_values[name]!r}, now {requested_values[name]!r}" for name in changed)
        raise ValueError(f"cannot resume with a different configuration ({details}); only {', '.join(RESUMABLE_CHANGES)} may change")


def train(config: TrainConfig, resume: bool = False, control: RunControl | None = None) -> dict:
    """Train as ``config`` says (resuming from ``output_dir/last`` if ``resume``); returns the final progress.

    Returns ``{"run_dir", "step", "epoch", "best_val_loss", "best_step", "stopped"}`` where ``stopped`` is
    ``"epochs"``, ``"max_steps"``, ``"time_limit"`` (``control.deadline``) or ``"signal"``.
    """
    control = control or RunControl()
    context, device = start_distributed(config.device)
    if not context.distributed:
        return train_process(config, resume, context, device, control)
    try:
        result = train_process(config, resume, context, device, control)
        dist.barrier()  # leave together: a gloo group torn down while a peer still runs aborts that peer
        return result
    finally:
        dist.destroy_process_group()


def record_run_start(
    config: TrainConfig,
    split: Split,
    parameters: int,
    steps_per_epoch: int,
    device: torch.device,
    context: DistributedContext,
    resumed_at_step: int | None,
    execution: dict | None = None,
) -> None:
    """Write ``config.json`` and ``run_info.json`` (updated on resume) and log the split's warnings and the
    departures from the paper."""
    run_dir = Path(config.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config.save(run_dir / "config.json")
    info_path = run_dir / "run_info.json"
    if resumed_at_step is None:
        info = {
            "differences_from_paper": config.differences_from_paper(device.type),
            "split": split.summary(),
            "parameters": parameters,
            "steps_per_epoch": steps_per_epoch,
            "resumed_at_steps": [],
        }
    else:
        info = json.loads(info_path.read_text())
        info["resumed_at_steps"].append(resumed_at_step)
    info.update(device=str(device), processes=context.world_size, torch=torch.__version__, **(execution or {}))
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    for warning in split.warnings:
        logger.warning("warning: %s", warning)
    for difference in config.differences_from_paper(device.type):
        logger.info("differs from the paper: %s", difference)


def train_process(config: TrainConfig, resume: bool, context: DistributedContext, device: torch.device, control: RunControl) -> dict:
    run_dir = Path(config.output_dir)
    if device.type == "cpu":
        set_cpu_threads(context)
    precision, autocast, scaler = mixed_precision(config, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if resume:
        if not (run_dir / "last.state.json").is_file():
            raise FileNotFoundError(f"{run_dir}: nothing to resume (no last.state.json); start without --resume")
        saved = TrainConfig.load(run_dir / "config.json")
        check_resumable(saved, config)
        if config.init_recipe is None:
            config = replace(config, init_recipe=saved.init_recipe)
    elif (run_dir / "last.safetensors").exists():
        raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --output")

    split = make_split(config.split, config.data_dir)
    preprocessing = config.preprocessing()
    options = {"channels": config.channels, "preprocessing": preprocessing, "seed": config.seed}
    augmentation = {"augment": config.augment, "low_resolution": config.low_resolution, "vertical_flip": config.vertical_flip,
                    "low_resolution_scales": config.low_resolution_scales()}
    train_records = with_heavy_disease_repeated(split.train, config.heavy_disease_repeat)
    train_set = ManifestSliceDataset(train_records, orientation=config.orientation, **augmentation, **options)
    if context.is_main and config.heavy_disease_repeat > 1:
        logger.info("heavy disease: %d training slices shown %d× per epoch", (len(train_records) - len(split.train))
                    // (config.heavy_disease_repeat - 1), config.heavy_disease_repeat)
    val_set = ManifestSliceDataset(split.val, orientation=config.orientation, **options)
    if config.negatives_dir:
        not_trained = (*config.negative_holdout, *config.negative_validation)
        negatives = NegativeVolumeDataset(config.negatives_dir, exclude_patients=not_trained, **augmentation,
                                          dependent_density=config.dependent_density, thick_slices=config.thick_slices,
                                          coarse_reconstructions=config.coarse_reconstructions, **options)
        train_set = MixedSliceDataset(train_set, negatives, config.negative_fraction, config.seed)
        if context.is_main:
            logger.info("lesion-free slices: %d from %s, %d per epoch", len(negatives), ", ".join(negatives.cases),
                        train_set.negative_count)
    if config.negative_validation:
        val_negatives = NegativeVolumeDataset(config.negatives_dir, only_patients=config.negative_validation, **options)
        val_set = ConcatDataset([val_set, val_negatives])
        if context.is_main:
            logger.info("validation: %d lesion-free slices from %s", len(val_negatives), ", ".join(val_negatives.cases))

    torch.manual_seed(config.seed)
    model = build_model(config.model, **config.model_kwargs()).to(device, memory_format=torch.channels_last)
    if config.init_from and not resume:
        config = start_from_weights(model, config)
    average = WeightAverage(model, config.weight_average_decay) if config.weight_average_decay is not None else None
    published = model if average is None else average.network  # the network validated and saved
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, **({"fused": True} if device.type == "cuda" else {}))
    progress = TrainingProgress()
    if resume:
        last = load_checkpoint(run_dir / "last.safetensors")
        published.load_state_dict(last.state_dict)
        progress = load_training_state(run_dir, optimizer, scaler, None if average is None else model)
        trim_log(run_dir / "log.csv", progress.step)
        if progress.batches_done and progress.processes != context.world_size:
            raise ValueError(
                f"{run_dir}: stopped inside an epoch with {progress.processes} process(es); "
                f"resume it with the same number, not {context.world_size}"
            )
        if last.metrics.get("step") != progress.step:
            raise ValueError(
                f"{run_dir}: last.safetensors (step {last.metrics.get('step')}) and last.state.json (step {progress.step}) disagree"
            )
    progress.processes = context.world_size
    network = (
        nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) if context.distributed else model
    )
    loss_function = SegmentationLoss(config.dice_weight, config.dice_mode)
    steps_per_epoch = math.ceil(len(epoch_order(len(train_set), 0, config.seed, context)) / config.batch_size)
    total_steps = min(config.epochs * steps_per_epoch, config.max_steps or math.inf)
    image_channels = preprocessing.input_channels
    train_cache = DeviceSlices(train_set, device) if DeviceSlices.fits(train_set, device, image_channels, config.image_size) else None
    val_cache = DeviceSlices(val_set, device) if DeviceSlices.fits(val_set, device, image_channels, config.image_size) else None
    execution = {"precision": precision, "data_on_device": {"train": train_cache is not None, "val": val_cache is not None}}

    if context.is_main:
        record_run_start(
            config, split, count_parameters(model), steps_per_epoch, device, context, progress.step if resume else None, execution
        )
        logger.info(
            "%s on %s ×%d: %d train / %d val slices, %d steps per epoch, %d steps to go",
            config.model,
            device,
            context.world_size,
            len(train_set),
            len(val_set),
            steps_per_epoch,
            max(0, total_steps - progress.step),
        )

    pending_best: list = []  # (state dict copy, metrics) of a best model not yet written (RunControl.save_every_seconds)
    last_saved = time.monotonic()

    def save_last(metrics: dict) -> None:
        nonlocal last_saved
        if pending_best:
            state_dict, best_metrics = pending_best.pop()
            save_checkpoint(checkpoint_of(published, config, best_metrics, state_dict), run_dir / "best.safetensors")
        save_training_state(run_dir, optimizer, progress, scaler, None if average is None else model.state_dict())
        save_checkpoint(checkpoint_of(published, config, metrics), run_dir / "last.safetensors")
        last_saved = time.monotonic()

    def past_deadline() -> float:
        return float(control.deadline is not None and time.time() >= control.deadline)

    stopped = "epochs"
    # training loss summed since the previous log row, on the device: read once per row, not at every step
    loss_sum, batches, started = torch.zeros((), dtype=torch.float64, device=device), 0, time.perf_counter()
    bar = tqdm(
        total=total_steps,
        initial=min(progress.step, total_steps),
        unit="step",
        disable=not (context.is_main and control.progress_bar),
        dynamic_ncols=True,
    )
    with StopRequest() as stop:
        while progress.epoch < config.epochs:
            if progress.step >= total_steps:
                stopped = "max_steps"
                break
            train_set.set_epoch(progress.epoch)
            order = epoch_order(len(train_set), progress.epoch, config.seed, context)[progress.batches_done * config.batch_size :]
            if train_cache is not None:
                batches_of_epoch = train_cache.batches(order, config.batch_size)
            else:
                loader = DataLoader(
                    train_set, batch_size=config.batch_size, sampler=order, num_workers=config.num_workers, pin_memory=device.type == "cuda"
                )
                batches_of_epoch = loader_batches(loader, device)
            network.train()
            for images, targets in batches_of_epoch:
                for group in optimizer.param_groups:
                    group["lr"] = config.learning_rate_at(progress.step)
                with autocast or nullcontext():
                    logits = network(images)
                loss = loss_function(logits.float(), targets)
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
                if average is not None:
                    average.update(model)
                progress.step += 1
                progress.batches_done += 1
                loss_sum, batches = loss_sum + loss.detach().double(), batches + 1
                bar.update(1)
                if device.type == "cpu":  # reading the loss would wait for the GPU at every step
                    bar.set_postfix(epoch=progress.epoch + 1, loss=f"{loss.item():.4f}")
                signal_stop, time_stop = sum_over_processes([float(stop.requested), past_deadline()], device, context)
                if signal_stop:
                    stopped = "signal"
                    break
                if time_stop:
                    stopped = "time_limit"
                    break
                if progress.step >= total_steps:
                    stopped = "max_steps"
                    break
                if config.validate_every_steps and progress.step % config.validate_every_steps == 0:
                    break  # validate now; the next pass of the while loop continues this epoch
            if stopped == "signal":
                if context.is_main:
                    save_last({"step": progress.step, "epoch": progress.epoch + progress.batches_done / steps_per_epoch})
                break
            if progress.batches_done >= steps_per_epoch:
                progress.epoch, progress.batches_done = progress.epoch + 1, 0
            between_validations = config.validate_every_steps and progress.step % config.validate_every_steps
            if between_validations and stopped == "epochs" and progress.epoch < config.epochs:
                continue  # an epoch ended between two validations
            loss_sum, batches = sum_over_processes([loss_sum.item(), batches], device, context)
            val_loss, val_dice = validate(published, val_set, loss_function, device, config.batch_size, context, autocast, val_cache)
            row = {
                "epoch": round(progress.epoch + progress.batches_done / steps_per_epoch, 4),
                "step": progress.step,
                "train_loss": loss_sum / batches if batches else float("nan"),  # none: resumed where only validation was left
                "val_loss": val_loss,
                "val_dice": val_dice,
                "seconds": round(time.perf_counter() - started, 2),
            }
            metrics = {name: row[name] for name in LOG_COLUMNS if name != "seconds"}
            if val_loss < progress.best_val_loss:
                progress.best_val_loss, progress.best_step = val_loss, progress.step
                if context.is_main and control.save_every_seconds > 0:
                    pending_best[:] = [({name: value.detach().clone() for name, value in published.state_dict().items()}, metrics)]
                elif context.is_main:
                    save_checkpoint(checkpoint_of(published, config, metrics), run_dir / "best.safetensors")
            if context.is_main:
                append_log_row(run_dir / "log.csv", row)
                final = stopped != "epochs" or progress.epoch >= config.epochs
                if final or time.monotonic() - last_saved >= control.save_every_seconds:
                    plot_loss_curves(run_dir / "log.csv", run_dir / "loss_curves.png")
                    save_last(metrics)
                bar.set_postfix(epoch=row["epoch"], loss=f"{row['train_loss']:.4f}")
                bar.write(
                    f"epoch {row['epoch']:g} step {row['step']}: train {row['train_loss']:.4f}, val {val_loss:.4f}, val Dice {val_dice:.3f}"
                )
            loss_sum, batches, started = torch.zeros((), dtype=torch.float64, device=device), 0, time.perf_counter()
            if stopped in ("max_steps", "time_limit"):
                break
    bar.close()
    if context.is_main:
        logger.info(
            "stopped (%s) at step %d; best validation loss %.4f at step %d; run folder %s",
            stopped,
            progress.step,
            progress.best_val_loss,
            progress.best_step,
            run_dir,
        )
    return {"run_dir": str(run_dir), "stopped": stopped, **asdict(progress)}


def mixed_precision(config: TrainConfig, device: torch.device) -> tuple[str, object | None, object | None]:
    """``(precision, autocast context or None, GradScaler or None)`` of ``config`` on ``device``; bf16/fp16 need CUDA
    (bf16 autocast on these CPUs is about 100× slower than fp32)."""
    precision = config.effective_precision(device.type)
    if precision != "fp32" and device.type != "cuda":
        raise ValueError(f"precision {precision!r} is for CUDA; on {device.type} train in fp32 (precision 'fp32' or 'auto')")
    autocast = torch.autocast("cuda", dtype=AUTOCAST_DTYPES[precision]) if precision in AUTOCAST_DTYPES else None
    if precision != "fp16":
        return precision, autocast, None
    # the fp16 loss scaler: torch.amp.GradScaler since torch 2.3, torch.cuda.amp before
    scaler = torch.amp.GradScaler("cuda") if hasattr(torch.amp, "GradScaler") else torch.cuda.amp.GradScaler()
    return precision, autocast, scaler


def checkpoint_of(model: nn.Module, config: TrainConfig, metrics: dict, state_dict: dict | None = None) -> Checkpoint:
    return Checkpoint(
        model_name=config.model,
        model_kwargs=config.model_kwargs(for_checkpoint=True),
        state_dict=model.state_dict() if state_dict is None else state_dict,
        channels=list(config.channels),
        preprocessing=config.preprocessing(),
        train_config=config.to_dict(),
        metrics=metrics,
    )


def build_parser() -> argparse.ArgumentParser:
    from COVIDLesionSegLib.models import MODELS
    from COVIDLesionSegLib.preprocessing import FIELDS_OF_VIEW

    from .augment import AUGMENT_MODES
    from .data import CHANNEL_NAMES, ORIENTATIONS
    from .splits import SPLIT_KINDS

    defaults = TrainConfig(data_dir="", output_dir="")
    parser = argparse.ArgumentParser(
        prog="covidlesionseg-train",
        description="Train a lesion segmentation network on the COVID-19-CT-Seg PNG slices. Defaults follow the paper; "
        "the same command runs on several GPUs under torchrun.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--data", dest="data_dir", help="the covid19-ct-seg-20cases-png256 folder (manifest.csv); required unless --resume")
    parser.add_argument("--output", dest="output_dir", required=True, help="run folder (config, log, curves, checkpoints)")
    parser.add_argument(
        "--resume",
        action="store_true",
        default=False,
        help="continue the run in --output from last.safetensors; options not given are taken from its config.json",
    )
    group = parser.add_argument_group("model and loss")
    group.add_argument("--model", choices=list(MODELS), help=f"network (default {defaults.model})")
    group.add_argument(
        "--widths", dest="model_widths", type=int, nargs="+", help="plain-encoder widths for unet/attunet (default 64 128 256 512 1024)"
    )
    group.add_argument(
        "--encoder-weights", help=f"resnet encoders: none, imagenet or a resnet34 weights file (default {defaults.encoder_weights})"
    )
    group.add_argument("--channels", nargs="+", choices=CHANNEL_NAMES, help="output channels (default lesion)")
    group.add_argument("--dice-weight", type=float, help="loss = BCE + this × soft Dice (default 0: BCE only)")
    group.add_argument("--dice-mode", choices=DICE_MODES,
                       help="soft Dice of each slice averaged (default), or pooled over the batch: lesion-free slices then count")
    group = parser.add_argument_group("optimisation")
    group.add_argument(
        "--lr", dest="learning_rate", type=float, metavar="LR", help=f"Adam learning rate (default {defaults.learning_rate})"
    )
    group.add_argument("--batch-size", type=int, help=f"slices per step and process (default {defaults.batch_size})")
    group.add_argument("--epochs", type=int, help=f"(default {defaults.epochs})")
    group.add_argument("--max-steps", type=int, help="stop after this many optimizer steps, even mid-epoch (default: no budget)")
    group.add_argument("--final-lr-steps", type=int, metavar="N", help="take the last N steps of --max-steps at --final-lr (default 0)")
    group.add_argument("--final-lr", type=float, metavar="LR", help="Adam learning rate of those final steps")
    group.add_argument(
        "--validate-every-steps",
        type=int,
        metavar="N",
        help="validate, log and keep the best checkpoint every N optimizer steps instead of after each epoch (default: each epoch)",
    )
    group.add_argument("--image-size", type=int, help=f"network input side in pixels (default {defaults.image_size})")
    group.add_argument("--augment", choices=AUGMENT_MODES, help=f"(default {defaults.augment})")
    group.add_argument("--seed", type=int, help=f"initialisation, sample order, augmentation (default {defaults.seed})")
    group.add_argument(
        "--weight-average-decay",
        type=float,
        metavar="D",
        help="validate and save an exponential moving average of the weights (decay D per step, e.g. 0.99); default off",
    )
    group.add_argument(
        "--low-resolution",
        type=float,
        metavar="P",
        help="probability that a training slice is shown at 0.6–0.9 of its resolution, as a wider field of view is after the body crop "
        "(default 0)",
    )
    group.add_argument(
        "--low-resolution-min-scale",
        type=float,
        metavar="S",
        help="smallest scale of --low-resolution (default 0.6; a 128² chest reconstruction, cut to its body box, is at about 0.54)",
    )
    group.add_argument(
        "--vertical-flip",
        type=float,
        metavar="P",
        help="probability that a training slice is shown upside down (anterior–posterior), its masks with it (default 0)",
    )
    group.add_argument(
        "--heavy-disease-repeat",
        type=int,
        metavar="R",
        help="show each lesion slice whose lesion covers at least 25 %% of its lung R times per epoch (default 1)",
    )
    group = parser.add_argument_group("data recipe")
    group.add_argument("--orientation", choices=ORIENTATIONS,
                       help=f"manifest slices as stored or all radiological (default {defaults.orientation})")
    group.add_argument("--field-of-view", choices=FIELDS_OF_VIEW,
                       help=f"whole slice or each volume's body box (default {defaults.field_of_view})")
    group.add_argument("--negatives", dest="negatives_dir", help="folder of lesion-free HU volumes (chest-ct-hu-no-covid) to mix in")
    group.add_argument("--negative-fraction", type=float, help="share of each epoch drawn from --negatives, e.g. 0.25")
    group.add_argument("--negative-holdout", nargs="+", metavar="PATIENT", help="--negatives patients never trained on")
    group.add_argument(
        "--negative-validation",
        nargs="+",
        metavar="PATIENT",
        help="--negatives patients added to the validation slices (so the kept checkpoint is judged on false lesion too), never trained on",
    )
    group.add_argument(
        "--dependent-density",
        type=float,
        metavar="P",
        help="probability that a --negatives slice is shown with synthetic gravity-dependent density in its lung (default 0)",
    )
    group.add_argument(
        "--thick-slices",
        type=float,
        metavar="P",
        help="probability that a --negatives slice is shown as a thicker reconstruction: its HU averaged over a 5–10 mm slab (default 0)",
    )
    group.add_argument(
        "--coarse-reconstructions",
        type=float,
        metavar="P",
        help="probability that a --negatives slice is shown as a coarse, thick reconstruction: a 5–10 mm slab with 2.5–4 mm "
        "pixels (default 0)",
    )
    group.add_argument(
        "--init-from", metavar="CHECKPOINT", help="start from this checkpoint's weights (file or registry name): fine-tuning; same network"
    )
    group = parser.add_argument_group("split")
    group.add_argument("--split", choices=SPLIT_KINDS, help="(default paper)")
    group.add_argument("--fold", type=int, help="fold of patient-kfold or benchmark (default 0)")
    group.add_argument("--num-folds", type=int, help="folds of patient-kfold (default 5)")
    group.add_argument("--holdout-groups", nargs="+", metavar="GROUP", help="split_group values to hold out as test (holdout)")
    group.add_argument("--split-seed", type=int, help="seed of the paper split's draw and of the validation groups (default 0)")
    group.add_argument("--val-fraction", type=float, help="validation share of the training slices (default 0.1)")
    group = parser.add_argument_group("machine")
    group.add_argument("--device", help="auto (CUDA if available), cpu, cuda, cuda:N (default auto)")
    group.add_argument("--num-workers", type=int, help=f"data loader processes per training process (default {defaults.num_workers})")
    group.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="mixed precision: auto (bf16 autocast on CUDA, fp32 on CPU; the default of a new run), fp32, bf16, fp16 "
        "(fp16 autocast + loss scaling); bf16/fp16 need CUDA. A resumed run keeps its own unless given",
    )
    group = parser.add_argument_group("execution (not part of the run's configuration)")
    group.add_argument(
        "--time-limit-minutes",
        type=float,
        help="stop after this much wall-clock time (validate, log, save); --resume continues the run",
    )
    group.add_argument(
        "--save-every-seconds",
        type=float,
        help="write last/best/curves at most this often (and when training stops); default 0: at every log row",
    )
    return parser


SPLIT_OPTIONS = {
    "split": "kind",
    "fold": "fold",
    "num_folds": "num_folds",
    "holdout_groups": "holdout_groups",
    "split_seed": "seed",
    "val_fraction": "val_fraction",
}


def config_from_arguments(arguments: dict, base: TrainConfig | None = None) -> TrainConfig:
    """A :class:`TrainConfig` from parsed options (only those given), on top of ``base`` if any."""
    values = base.to_dict() if base else {}
    split = values.pop("split", {})
    for option, field_name in SPLIT_OPTIONS.items():
        if option in arguments:
            split[field_name] = arguments.pop(option)
    values.update(arguments)
    if not values.get("data_dir"):
        raise ValueError("--data is required (the covid19-ct-seg-20cases-png256 folder)")
    return TrainConfig.from_dict({**values, "split": split})


def main(argv: Sequence[str] | None = None) -> int:
    arguments = vars(build_parser().parse_args(argv))
    resume = arguments.pop("resume")
    time_limit = arguments.pop("time_limit_minutes", None)
    control = RunControl(
        deadline=None if time_limit is None else time.time() + 60 * time_limit,
        save_every_seconds=arguments.pop("save_every_seconds", 0.0),
    )
    if not resume:
        arguments.setdefault("precision", "auto")
    logging.basicConfig(level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING, format="%(message)s")
    base = None
    if resume:
        saved = Path(arguments["output_dir"]) / "config.json"
        if not saved.is_file():
            raise SystemExit(f"--resume: {saved} not found; is --output the folder of an earlier run?")
        base = TrainConfig.load(saved)
    result = train(config_from_arguments(arguments, base), resume=resume, control=control)
    return 130 if result["stopped"] == "signal" else 0


if __name__ == "__main__":
    raise SystemExit(main())
