"""``TrainConfig``: every choice of a training run, saved as ``config.json`` and in each checkpoint.

The defaults are the paper's protocol: ResAttUnet with an ImageNet-pretrained ResNet34 encoder,
BCEWithLogitsLoss, Adam (lr 1e-4), batch size 2, 200 epochs, 256² slices, the checkpoint with the best
validation loss kept, the paper's slice-level split, no augmentation (the paper mentions none).
:meth:`TrainConfig.differences_from_paper` lists what a run changes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from COVIDLesionSegLib.models import MODELS
from COVIDLesionSegLib.preprocessing import LOW_RESOLUTION_SCALES, PreprocessingConfig

from .augment import check_augment_mode
from .data import HEAVY_DISEASE_SHARE, check_channels, check_orientation
from .splits import SplitSpec

PRECISIONS = ("fp32", "bf16", "fp16", "auto")  # "auto": bf16 autocast on CUDA, fp32 elsewhere
PLAIN_ENCODER_MODELS = ("unet", "attunet")  # take ``widths``
RESNET_ENCODER_MODELS = ("resunet", "resattunet")  # take ``encoder_weights``


# soft Dice per slice (averaged over the batch), or pooled over the batch's slices: a lesion-free slice then adds its
# false lesion to the batch's Dice like any false positive, where per slice its Dice is ~0 whatever it predicts
DICE_MODES = ("per-slice", "batch")


@dataclass(frozen=True)
class TrainConfig:
    data_dir: str  # the covid19-ct-seg-20cases-png256 folder
    output_dir: str  # the run folder: config, log, curves, checkpoints
    model: str = "resattunet"  # key of COVIDLesionSegLib.models.MODELS
    model_widths: tuple[int, ...] | None = None  # plain-encoder widths (unet/attunet); None = 64…1024
    encoder_weights: str = "imagenet"  # resnet encoders: "none", "imagenet" or a local resnet34 weights file
    channels: tuple[str, ...] = ("lesion",)  # output channels: ("lesion",) or ("lesion", "lung")
    image_size: int = 256  # network input side, pixels
    augment: str = "none"  # "none" | "flip" | "robust"
    dice_weight: float = 0.0  # loss = BCEWithLogits + dice_weight × soft Dice; 0 = the paper's BCE
    dice_mode: str = "per-slice"  # soft Dice of each slice, averaged (v1–v4), or "batch": pooled over the batch's slices
    learning_rate: float = 1e-4  # Adam
    final_lr_steps: int = 0  # the last this many steps of max_steps are taken at final_lr (0: one learning rate throughout)
    final_lr: float | None = None  # Adam's learning rate over those final steps
    batch_size: int = 2  # per process
    epochs: int = 200
    max_steps: int | None = None  # stop after this many optimizer steps (even mid-epoch); None = no budget
    validate_every_steps: int | None = None  # validate, log, keep best every N steps instead of each epoch end; None = per epoch
    split: SplitSpec = field(default_factory=SplitSpec)
    seed: int = 0  # model initialisation, sample order and augmentation
    orientation: str = "as-stored"  # manifest slices "as-stored" (v1: Radiopaedia upside down) or "radiological"
    field_of_view: str = "full"  # PreprocessingConfig.field_of_view: "full" (v1) or "body" (crop to the body box)
    negatives_dir: str | None = None  # lesion-free HU volumes (chest-ct-hu-no-covid); None = lesion slices only
    negative_fraction: float = 0.0  # share of each epoch drawn from negatives_dir
    negative_holdout: tuple[str, ...] = ()  # negatives_dir patients never trained on (false-positive tests)
    negative_validation: tuple[str, ...] = ()  # negatives_dir patients validated on (checkpoint choice sees false lesion), never trained on
    dependent_density: float = 0.0  # probability that a lesion-free slice is rendered with synthetic dependent density (negatives.py)
    thick_slices: float = 0.0  # probability that a lesion-free slice is rendered as a 5–10 mm slab (negatives.slab_hu)
    coarse_reconstructions: float = 0.0  # probability that it is rendered as a coarse, thick scan (negatives.coarse_hu)
    low_resolution: float = 0.0  # probability that a training slice is shown at a lower resolution (augment.lower_resolution)
    low_resolution_min_scale: float = LOW_RESOLUTION_SCALES[0]  # its scales: this (0.6 unless lowered) to 0.9 of the resolution
    vertical_flip: float = 0.0  # probability that a training slice is shown upside down (anterior–posterior), its masks with it
    heavy_disease_repeat: int = 1  # times per epoch a lesion slice with ≥ 25 % of its lung lesioned is shown (data.HEAVY_DISEASE_SHARE)
    weight_average_decay: float | None = None  # checkpoints hold an exponential moving average of the weights (e.g. 0.99); None = off
    init_from: str | None = None  # checkpoint (file or registry name) whose weights start the run (fine-tuning); None = fresh
    init_recipe: dict | None = None  # that checkpoint's train_config (recorded by training): the stage this run fine-tunes
    device: str = "auto"  # "auto" (CUDA if available), "cpu", "cuda", "cuda:1", …
    num_workers: int = 0  # DataLoader worker processes per training process
    # Mixed precision: "fp32" (none; the default, so configs saved before this field keep their meaning), "bf16"
    # (bf16 autocast, CUDA only), "fp16" (fp16 autocast + GradScaler, CUDA only) or "auto" (bf16 on CUDA, fp32 on
    # CPU; what covidlesionseg-train and covidlesionseg-reproduce ask for unless told otherwise).
    precision: str = "fp32"

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; valid: {', '.join(MODELS)}")
        if self.model_widths is not None:
            if self.model not in PLAIN_ENCODER_MODELS:
                raise ValueError(f"model_widths applies to {PLAIN_ENCODER_MODELS} only, not {self.model!r}")
            object.__setattr__(self, "model_widths", tuple(int(width) for width in self.model_widths))
        object.__setattr__(self, "channels", check_channels(self.channels))
        check_augment_mode(self.augment)
        check_orientation(self.orientation)
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; valid: {', '.join(PRECISIONS)}")
        object.__setattr__(self, "negative_holdout", tuple(self.negative_holdout))
        object.__setattr__(self, "negative_validation", tuple(self.negative_validation))
        if self.negative_validation and not self.negatives_dir:
            raise ValueError("negative_validation needs negatives_dir")
        if both := sorted(set(self.negative_validation) & set(self.negative_holdout)):
            raise ValueError(f"patients both held out and validated on: {both}")
        if (self.negatives_dir is None) != (self.negative_fraction == 0.0) or not 0.0 <= self.negative_fraction < 1.0:
            raise ValueError("negatives_dir and a negative_fraction in (0, 1) go together (or neither)")
        for name in ("low_resolution", "vertical_flip"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a probability, got {getattr(self, name)}")
        if int(self.heavy_disease_repeat) != self.heavy_disease_repeat or self.heavy_disease_repeat < 1:
            raise ValueError(f"heavy_disease_repeat must be a whole number ≥ 1, got {self.heavy_disease_repeat}")
        if not 0.0 < self.low_resolution_min_scale <= LOW_RESOLUTION_SCALES[1]:
            raise ValueError(f"low_resolution_min_scale must be in (0, {LOW_RESOLUTION_SCALES[1]}], got {self.low_resolution_min_scale}")
        if self.dice_mode not in DICE_MODES:
            raise ValueError(f"unknown dice_mode {self.dice_mode!r}; valid: {', '.join(DICE_MODES)}")
        if self.weight_average_decay is not None and not 0.0 < self.weight_average_decay < 1.0:
            raise ValueError(f"weight_average_decay must be in (0, 1) or None, got {self.weight_average_decay}")
        for name in ("dependent_density", "thick_slices", "coarse_reconstructions"):  # renderings of the lesion-free slices
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0 or (value > 0 and not self.negatives_dir):
                raise ValueError(f"{name} is a probability applied to negatives_dir's slices, got {value}")
        for name in ("image_size", "batch_size", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "validate_every_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1 (or None), got {getattr(self, name)}")
        if self.learning_rate <= 0 or self.dice_weight < 0 or self.num_workers < 0:
            raise ValueError("learning_rate must be > 0, dice_weight ≥ 0 and num_workers ≥ 0")
        if self.final_lr_steps:
            if self.max_steps is None or not 0 < self.final_lr_steps < self.max_steps or not (self.final_lr or 0) > 0:
                raise ValueError(f"final_lr_steps ({self.final_lr_steps}) must be fewer than max_steps ({self.max_steps}), "
                                 f"with a final_lr > 0 (got {self.final_lr})")
        elif self.final_lr is not None:
            raise ValueError(f"final_lr ({self.final_lr}) needs final_lr_steps > 0 (got {self.final_lr_steps})")

    def learning_rate_at(self, step: int) -> float:
        """Adam's learning rate for optimizer step ``step`` (counted from 0): ``final_lr`` over the last ``final_lr_steps``
        of the ``max_steps`` budget, ``learning_rate`` before."""
        if self.final_lr_steps and step >= self.max_steps - self.final_lr_steps:
            return self.final_lr
        return self.learning_rate

    def low_resolution_scales(self) -> tuple[float, float]:
        """Smallest and largest scale of the lower-resolution rendering (``low_resolution``)."""
        return self.low_resolution_min_scale, LOW_RESOLUTION_SCALES[1]

    def effective_precision(self, device_type: str) -> str:
        """``precision`` on a device of type ``device_type`` ("cpu", "cuda"): "auto" resolved."""
        if self.precision == "auto":
            return "bf16" if device_type == "cuda" else "fp32"
        return self.precision

    def preprocessing(self) -> PreprocessingConfig:
        return PreprocessingConfig(size=self.image_size, field_of_view=self.field_of_view)

    def model_kwargs(self, for_checkpoint: bool = False) -> dict:
        """Constructor kwargs of the network. ``for_checkpoint`` drops the encoder weights source:
        a checkpoint carries all weights, so rebuilding it must not download or read any."""
        kwargs = {"in_channels": self.preprocessing().input_channels, "out_channels": len(self.channels)}
        if self.model in PLAIN_ENCODER_MODELS and self.model_widths is not None:
            kwargs["widths"] = list(self.model_widths)
        if self.model in RESNET_ENCODER_MODELS:
            kwargs["encoder_weights"] = "none" if for_checkpoint else self.encoder_weights
        return kwargs

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        unknown = set(values) - {item.name for item in fields(cls)}
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {sorted(unknown)}")
        values = dict(values)
        values["split"] = SplitSpec(**values.get("split", {}))
        return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in values.items()})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def differences_from_paper(self, device_type: str | None = None) -> list[str]:
        """One line per setting that departs from the paper's protocol (empty when it follows it).

        ``device_type`` ("cpu", "cuda") resolves ``precision="auto"``; without it "auto" is not listed (run_info.json and
        the reproduction's results, which know the device, list what it became)."""
        paper = TrainConfig(data_dir=self.data_dir, output_dir=self.output_dir)
        differences = []
        for name, paper_value in (
            ("model", paper.model),
            ("channels", paper.channels),
            ("image_size", paper.image_size),
            ("augment", paper.augment),
            ("learning_rate", paper.learning_rate),
            ("batch_size", paper.batch_size),
            ("epochs", paper.epochs),
        ):
            if getattr(self, name) != paper_value:
                differences.append(f"{name}: {getattr(self, name)!r} (paper: {paper_value!r})")
        if self.model in RESNET_ENCODER_MODELS and self.encoder_weights != paper.encoder_weights:
            differences.append(f"encoder_weights: {self.encoder_weights!r} (paper: ImageNet-pretrained ResNet34)")
        if self.model_widths is not None:
            differences.append(f"model_widths: {self.model_widths} (paper: 64…1024)")
        if self.dice_weight:
            pooled = ", pooled over each batch" if self.dice_mode == "batch" else ""
            differences.append(f"loss: BCEWithLogits + {self.dice_weight} × soft Dice{pooled} (paper: BCEWithLogitsLoss only)")
        if self.max_steps is not None:
            differences.append(f"max_steps: {self.max_steps} optimizer steps budget (paper: {paper.epochs} full epochs)")
        if self.final_lr_steps:
            differences.append(f"final_lr: the last {self.final_lr_steps} steps at learning rate {self.final_lr:g} (paper: one rate)")
        if self.validate_every_steps is not None:
            differences.append(
                f"validate_every_steps: validation every {self.validate_every_steps} optimizer steps (paper: after each epoch)"
            )
        if self.orientation != paper.orientation:
            differences.append(f"orientation: {self.orientation!r} (paper: slices as published, 367 Radiopaedia slices upside down)")
        if self.field_of_view != paper.field_of_view:
            differences.append(f"field_of_view: {self.field_of_view!r}, each volume cut to its body box (paper: whole slice)")
        if self.negatives_dir:
            differences.append(
                f"lesion-free HU slices from {self.negatives_dir}: {self.negative_fraction:.0%} of each epoch (paper: lesion slices only)"
            )
        if self.weight_average_decay is not None:
            differences.append(f"weight_average_decay: checkpoints hold a moving average of weights (decay {self.weight_average_decay})")
        if self.low_resolution:
            differences.append(f"low_resolution: {self.low_resolution:.0%} of training slices shown at "
                               f"{self.low_resolution_min_scale:g}–{LOW_RESOLUTION_SCALES[1]:g} of their resolution")
        if self.vertical_flip:
            differences.append(f"vertical_flip: {self.vertical_flip:.0%} of training slices shown upside down")
        if self.heavy_disease_repeat > 1:
            differences.append(f"heavy_disease_repeat: lesion slices with ≥ {HEAVY_DISEASE_SHARE:.0%} of the lung lesioned shown "
                               f"{self.heavy_disease_repeat}× per epoch")
        if self.dependent_density:
            differences.append(f"dependent_density: {self.dependent_density:.0%} of lesion-free slices with synthetic dependent density")
        if self.thick_slices:
            differences.append(f"thick_slices: {self.thick_slices:.0%} of lesion-free slices shown as 5–10 mm slabs")
        if self.coarse_reconstructions:
            differences.append(f"coarse_reconstructions: {self.coarse_reconstructions:.0%} of lesion-free slices shown as 5–10 mm "
                               "slabs with 2.5–4 mm pixels")
        precision = self.effective_precision(device_type or "cpu")
        if precision != "fp32":
            meaning = {"bf16": "bf16 autocast", "fp16": "fp16 autocast with loss scaling"}
            differences.append(f"precision: {precision!r}, {meaning[precision]} (paper: not stated; fp32 assumed)")
        if self.split.kind != "paper":
            differences.append(f"split: {self.split.describe()} (paper: 224 + 10 slices drawn by slice)")
        return differences
