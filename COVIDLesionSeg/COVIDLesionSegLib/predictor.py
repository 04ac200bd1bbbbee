"""Slice-by-slice inference of a trained network on whole CT volumes.

``Predictor`` loads a checkpoint once and serves many volumes::

    predictor = Predictor.default()                      # the shipped model, CUDA when available
    lesion = predictor.predict_volume(volume)            # volume[z, y, x] → uint8 0/1, same shape
    masks = predictor.predict_masks(volume)              # {"lesion": ..., "lung": ...} with a lung channel
    result = predictor.segment_image(sitk_image)         # masks as images on the input's exact grid

Each axial slice goes through the training preprocessing (``preprocessing``), the network runs in
batches (:mod:`.backends`: PyTorch, fp16 autocast on CUDA; or ONNX Runtime on the CPU), sigmoid probabilities are resized back
to the slice size and thresholded at 0.5 (the lesion at ``GuardRails.lesion_threshold``, 0.6 by default). With a lung
channel, lesions are kept only inside the lung and the lung mask is made to include its lesions. :class:`GuardRails`
(named options, recorded in the CLI's ``summary.json``) clean the masks in 3D where the voxel size is known
(``segment_image``).

**Memory**: the volume is streamed (:meth:`Predictor.stream_probabilities`): what is decided once per volume
(the body field-of-view box, the HU test) is computed from the whole volume without copying it, then slices
are preprocessed, run and put back on the slice grid :data:`CHUNK_BATCHES` batches at a time, and each slice's
probabilities are handed on at once. ``predict_masks`` and ``segment_image`` keep only uint8 masks of the whole
volume (and, when asked, the lesion probability as uint8 255 × p); only ``predict_probabilities`` keeps float32
probabilities of the whole volume, since that is what it returns. The batches are those of the whole-volume
computation (the same slices together), so the outputs are bit for bit those of preparing every slice first.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
import SimpleITK as sitk

from . import io
from .backends import (  # predict_in_batches and resolve_device: imported from here by COVIDLesionSegTraining and the tests
    OnnxRuntimeBackend,
    TorchBackend,
    open_backend,
    predict_in_batches,  # noqa: F401
    resolve_device,  # noqa: F401
)
from .checkpoints import Checkpoint, locate_model, sha256_of
from .classical_lung import classical_lung_mask
from .components import ChunkedComponents
from .preprocessing import (
    LOW_RESOLUTION_SCALES,
    CropBox,
    PreprocessingConfig,
    body_crop_box,
    crop_slice,
    is_hounsfield,
    network_grid_share,
    resize_slice,
    slice_to_uint8,
    to_network_input,
    uncrop_probabilities,
)
from .resources import default_model_name
from .statistics import DEFAULT_HIGH_OPACITY_THRESHOLD_HU, LesionStatistics, VoxelGrid, lesion_statistics

logger = logging.getLogger(__name__)
ProgressCallback = Callable[[int, int], None]  # (slices done, slices total)
SliceConsumer = Callable[[int, np.ndarray], None]  # (z, probabilities[channel, y, x] float32 of slice z)
CHUNK_BATCHES = 4  # batches of slices preprocessed together: bounded memory, whole batches as before
PROBABILITY_DTYPES = ("float32", "uint8")  # segment_image's lesion probability: p, or round(255 × p) as written to disk


def masks_from_probabilities(probabilities: dict[str, np.ndarray], lesion_threshold: float = 0.5) -> dict[str, np.ndarray]:
    """``{channel: probabilities}`` → ``{channel: uint8 0/1 mask}``: the lesion where p ≥ ``lesion_threshold``, every
    other channel at 0.5; with a lung channel the lesion is kept inside the lung (the lung channel was trained to
    include its lesions)."""
    masks = {channel: (p >= (lesion_threshold if channel == "lesion" else 0.5)).astype(np.uint8) for channel, p in probabilities.items()}
    if "lung" in masks:
        masks["lesion"] &= masks["lung"]
    return masks


def lesion_probability_of_slice(probabilities: dict[str, np.ndarray]) -> np.ndarray:
    """float32 lesion probability, 0 where the lung channel (when there is one) is below 0.5."""
    lesion = probabilities["lesion"]
    return lesion * (probabilities["lung"] >= 0.5) if "lung" in probabilities else lesion


def quantized_probability(probability: np.ndarray) -> np.ndarray:
    """Probabilities (0…1) → uint8 round(255 × p), half up, in float64 (``io.write_probability_map``'s rule)."""
    return np.clip(np.floor(np.asarray(probability, dtype=np.float64) * 255.0 + 0.5), 0, 255).astype(np.uint8)


def release_free_memory() -> None:
    """Give the memory the C allocator keeps after the network's batches (freed activations of every thread's arena)
    back to the system, so that the guard rails, statistics and writers that follow do not add to it (glibc's
    ``malloc_trim``; nothing elsewhere)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            pass


def cropped_minimum(volume: np.ndarray, box: CropBox | None) -> float:
    """The minimum of ``volume[z, y, x]`` cropped to ``box`` as :func:`preprocessing.prepare_volume` crops it (padded with
    the volume's minimum where the box leaves the image), without making the cropped copy."""
    if box is None:
        return float(np.min(volume))
    height, width = volume.shape[1:]
    top, left = max(box.top, 0), max(box.left, 0)
    bottom, right = min(box.top + box.side, height), min(box.left + box.side, width)
    inside = volume[:, top:bottom, left:right]
    padded = box.top < 0 or box.left < 0 or box.top + box.side > height or box.left + box.side > width
    lowest = float(np.min(inside)) if inside.size else np.inf
    return min(lowest, float(np.min(volume))) if padded else lowest


def slice_preparation(volume: np.ndarray, config: PreprocessingConfig, box: CropBox | None,
                      preprocessed: bool) -> Callable[[np.ndarray], np.ndarray]:
    """One slice of ``volume`` → the network's uint8 ``[size, size]`` slice, exactly as
    :func:`preprocessing.prepare_volume` makes it for the whole volume (crop to ``box``, padded with the volume's
    minimum; the HU decision made once on the cropped volume), slice by slice."""
    if preprocessed:
        return lambda plane: resize_slice(crop_slice(plane, box, 0), config.size)
    fill = float(np.min(volume)) if box is not None else 0.0
    hounsfield = cropped_minimum(volume, box) < config.hu_detect_below  # preprocessing.is_hounsfield of the cropped volume
    return lambda plane: slice_to_uint8(crop_slice(plane, box, fill), config, hounsfield)


@dataclass(frozen=True)
class GuardRails:
    """Inference-time checks against false lesions, each off at 0 / False / None (``lesion_threshold``: 0.5). The
    defaults (what the CLI, the API and the Slicer module use) are the setting ``covidlesionseg-guard-rails``
    recommended on the five fold models of the v5 recipe: see ``Training/results/guard-rails-v5-contrast/guard_rails.md``
    (``lesion_min_hu`` cuts false lesion but loses more than 0.01 lesion Dice on the folds' HU rendering, so it is not
    on by default).

    - ``lung_min_ml``: keep only 3D connected components of the lung mask of at least this volume (a real
      lung is hundreds of mL; stray "lung" on bowel gas or outside the chest is small), lesion inside them;
    - ``lesion_min_ml``: drop 3D lesion components smaller than this;
    - ``flip_tta``: average the logits of each slice and of its left–right mirror (2× network time);
    - ``hu_lung_prior``: for HU input only, lesion only inside the classical lung mask
      (:mod:`.classical_lung`), dilated by ``HU_PRIOR_DILATION_MM`` in-plane;
    - ``lesion_min_hu``: for HU input only, lesion only where the CT, smoothed in-plane (Gaussian, σ
      ``HU_SMOOTHING_MM``), is at least this dense. Ground glass is by definition denser than aerated lung
      (about −850 HU); a lesion painted on aerated lung is not one. None: off.
    - ``lesion_min_contrast_hu``: for HU input only, drop 3D lesion components that are on average less than this many
      HU denser than the lung around them (:func:`contrasted_enough`; the CT smoothed as for ``lesion_min_hu``). Ground
      glass stands out from the lung beside it; the gradual density of dependent lung, or a lesion painted on evenly
      aerated lung, does not. None: off.
    - ``lesion_threshold``: lesion where the network's lesion probability is at least this (0.5: the network's own
      decision, off); higher marks less lesion, false and true alike.
    """

    lung_min_ml: float = 0.0
    lesion_min_ml: float = 0.5
    flip_tta: bool = False
    hu_lung_prior: bool = False
    lesion_min_hu: float | None = None
    lesion_threshold: float = 0.6
    lesion_min_contrast_hu: float | None = 75.0

    def __post_init__(self):
        for name in ("lung_min_ml", "lesion_min_ml"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite volume ≥ 0 mL, got {value}")
        if self.lesion_min_hu is not None and not -1024 <= self.lesion_min_hu <= 0:
            raise ValueError(f"lesion_min_hu must be between -1024 and 0 HU (or None: off), got {self.lesion_min_hu}")
        if self.lesion_min_contrast_hu is not None and not 0 < self.lesion_min_contrast_hu <= 1000:
            raise ValueError(
                f"lesion_min_contrast_hu must be between 0 (exclusive) and 1000 HU (or None: off), got {self.lesion_min_contrast_hu}"
            )
        if not 0 < self.lesion_threshold < 1:
            raise ValueError(f"lesion_threshold must be a probability between 0 and 1 (exclusive), got {self.lesion_threshold}")

    def to_dict(self) -> dict:
        return asdict(self)


# Every guard rail off, spelt out so that a change of GuardRails' defaults (or a new rail, on by default) cannot slip in.
NO_GUARD_RAILS = GuardRails(lung_min_ml=0.0, lesion_min_ml=0.0, flip_tta=False, hu_lung_prior=False, lesion_min_hu=None,
                            lesion_threshold=0.5, lesion_min_contrast_hu=None)
HU_PRIOR_DILATION_MM = 10.0
HU_SMOOTHING_MM = 1.5  # lesion_min_hu compares the CT smoothed this much (σ, in-plane): noise must not punch holes in a lesion
CONTRAST_RING_MM = 10.0  # lesion_min_contrast_hu compares a lesion component with the lung up to this far around it, in-plane
CONTRAST_RING_MIN_VOXELS = 20  # with less lung than this around it (a lesion filling its lung), a component is kept


def components_at_least(mask: np.ndarray, voxel_ml: float, min_ml: float) -> np.ndarray:
    """uint8 ``mask[z, y, x]`` without its 3D connected components (26-connected) below ``min_ml``.

    The components are labelled a chunk of slices at a time inside the mask's bounding box
    (:class:`~.components.ChunkedComponents`: the 32-bit labels of the whole volume would be 4 bytes per voxel)."""
    kept = np.zeros(mask.shape, dtype=np.uint8)
    if not mask.any():
        return kept
    components = ChunkedComponents(mask, fully_connected=True)
    _, rows, columns = components.box
    for start, large in components.component_values(components.sums[:, 0] * voxel_ml >= min_ml):
        kept[start : start + len(large), rows, columns] = large
    return kept


def apply_guard_rails(
    masks: dict[str, np.ndarray], guard_rails: GuardRails, grid: VoxelGrid, ct_hu: np.ndarray | None
) -> dict[str, np.ndarray]:
    """The 3D guard rails on ``masks`` (uint8 ``[z, y, x]`` from :func:`masks_from_probabilities`) of a volume on ``grid``."""
    masks = dict(masks)
    if guard_rails.lung_min_ml > 0 and "lung" in masks:
        masks["lung"] = components_at_least(masks["lung"], grid.voxel_ml, guard_rails.lung_min_ml)
        masks["lesion"] = masks["lesion"] & masks["lung"]
    if guard_rails.hu_lung_prior and ct_hu is not None:
        prior = classical_lung_mask(ct_hu, grid.spacing_mm).astype(np.uint8)
        radius = max(1, round(HU_PRIOR_DILATION_MM / grid.spacing_mm[0]))
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        masks["lesion"] = masks["lesion"] & np.stack([cv2.dilate(plane, kernel) for plane in prior])
    if guard_rails.lesion_min_hu is not None and ct_hu is not None:
        masks["lesion"] = dense_enough(masks["lesion"], ct_hu, grid.spacing_mm, guard_rails.lesion_min_hu)
    if guard_rails.lesion_min_contrast_hu is not None and ct_hu is not None and "lung" in masks:
        masks["lesion"] = contrasted_enough(masks["lesion"], masks["lung"], ct_hu, grid.spacing_mm, guard_rails.lesion_min_contrast_hu)
    if guard_rails.lesion_min_ml > 0:
        masks["lesion"] = components_at_least(masks["lesion"], grid.voxel_ml, guard_rails.lesion_min_ml)
    return masks


def smoothed_plane(plane_hu: np.ndarray, spacing_mm: tuple[float, float, float]) -> np.ndarray:
    """float32 ``plane_hu[y, x]`` Gaussian-smoothed with σ ``HU_SMOOTHING_MM`` (``spacing_mm`` is x, y, z)."""
    sigma_x, sigma_y = (HU_SMOOTHING_MM / spacing for spacing in spacing_mm[:2])
    return cv2.GaussianBlur(plane_hu.astype(np.float32), (0, 0), sigmaX=sigma_x, sigmaY=sigma_y)


def dense_enough(lesion: np.ndarray, ct_hu: np.ndarray, spacing_mm: tuple[float, float, float], min_hu: float) -> np.ndarray:
    """uint8 ``lesion[z, y, x]`` kept where ``ct_hu`` (same shape, HU), Gaussian-smoothed in-plane with σ
    ``HU_SMOOTHING_MM`` (``spacing_mm`` is x, y, z), is at least ``min_hu``. One slice at a time, lesion slices only."""
    kept = lesion.copy()
    for z in np.flatnonzero(lesion.any(axis=(1, 2))):
        kept[z] &= (smoothed_plane(ct_hu[z], spacing_mm) >= min_hu).astype(np.uint8)
    return kept


def contrasted_enough(
    lesion: np.ndarray, lung: np.ndarray, ct_hu: np.ndarray, spacing_mm: tuple[float, float, float], min_contrast_hu: float
) -> np.ndarray:
    """uint8 ``lesion[z, y, x]`` without its 3D components (26-connected) whose mean smoothed CT
    (:func:`smoothed_plane`) is less than ``min_contrast_hu`` above the mean of their *ring*: the ``lung`` voxels
    outside every lesion within ``CONTRAST_RING_MM`` in-plane of the component, on its slices. A component with fewer
    than ``CONTRAST_RING_MIN_VOXELS`` ring voxels is kept. Where the rings of two components overlap, the shared
    voxels count for the component reached later in a raster scan."""
    if not lesion.any():
        return lesion.copy()
    components = ChunkedComponents(lesion, fully_connected=True)
    _, rows, columns = components.box
    radius_x, radius_y = (max(1, round(CONTRAST_RING_MM / spacing)) for spacing in spacing_mm[:2])
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius_x + 1, 2 * radius_y + 1))
    _, height, width = lesion.shape
    ring_rows = slice(max(0, rows.start - radius_y), min(height, rows.stop + radius_y))  # the box grown by the ring
    ring_columns = slice(max(0, columns.start - radius_x), min(width, columns.stop + radius_x))
    inner = (slice(rows.start - ring_rows.start, rows.stop - ring_rows.start),
             slice(columns.start - ring_columns.start, columns.stop - ring_columns.start))
    numbers = np.zeros(len(components.sums), dtype=np.float32)  # float32 for cv2.dilate: exact up to 2**24 components
    numbers[components.roots] = np.arange(1, len(components.roots) + 1)
    totals = np.zeros((4, len(components.roots) + 1))  # per component number (0: none): voxels, HU sum; inside, then ring
    for start, values in components.component_values(numbers):
        for z, plane in enumerate(values, start):
            grown = np.zeros((ring_rows.stop - ring_rows.start, ring_columns.stop - ring_columns.start), dtype=np.float32)
            grown[inner] = plane
            outside = (lung[z, ring_rows, ring_columns] > 0) & (lesion[z, ring_rows, ring_columns] == 0)
            hu = smoothed_plane(ct_hu[z], spacing_mm)[ring_rows, ring_columns].ravel()
            for row, numbered in ((0, grown), (2, np.where(outside, cv2.dilate(grown, kernel), 0))):
                flat = numbered.astype(np.int64).ravel()
                totals[row] += np.bincount(flat, minlength=totals.shape[1])
                totals[row + 1] += np.bincount(flat, weights=hu, minlength=totals.shape[1])
    with np.errstate(invalid="ignore", divide="ignore"):
        contrast = totals[1] / totals[0] - totals[3] / totals[2]
    keep = (totals[2] < CONTRAST_RING_MIN_VOXELS) | (contrast >= min_contrast_hu)
    per_root = np.zeros(len(components.sums), dtype=np.uint8)
    per_root[components.roots] = keep[1:]
    kept = np.zeros(lesion.shape, dtype=np.uint8)
    for start, values in components.component_values(per_root):
        kept[start : start + len(values), rows, columns] = values
    return kept


def coarsest_trained_share(train_config: dict) -> float:
    """The coarsest :func:`~.preprocessing.network_grid_share` at which a checkpoint's recipe (``train_config``) showed
    training slices: the smallest ``--low-resolution`` scale where it used one, else 1 (the 256² slices as they are)."""
    if not train_config.get("low_resolution"):
        return 1.0
    return float(train_config.get("low_resolution_min_scale", LOW_RESOLUTION_SCALES[0]))


def coarse_input_warning(volume: np.ndarray, config: PreprocessingConfig, train_config: dict) -> str | None:
    """Why ``volume[z, y, x]`` is coarser in plane than anything the checkpoint trained on, or None when it is not."""
    side, share = network_grid_share(volume, config)
    coarsest = coarsest_trained_share(train_config)
    if share >= coarsest:
        return None
    return (f"coarse in plane: the {side} pixels across what the network sees fill its {config.size}² grid "
            f"at {share:.2f} of its resolution, coarser than any slice this model trained on ({coarsest:g}); coarse "
            "reconstructions get more false lesion (model card, 'at 128²'): check each lesion by eye")


@dataclass
class SegmentationResult:
    """Masks (uint8 0/1 ``sitk.Image`` on the input's grid, keyed by channel) and their statistics; with
    ``segment_image(return_probabilities=True)`` also the lesion probability (float32, same grid; see there).
    ``warnings``: why the result deserves less trust than the model card's figures (:func:`coarse_input_warning`)."""

    masks: dict[str, sitk.Image]
    statistics: LesionStatistics
    lesion_probability: sitk.Image | None = None
    warnings: list[str] = field(default_factory=list)


class Predictor:
    """A loaded network plus the preprocessing it was trained with; the network runs in ``backend``
    (:mod:`.backends`: PyTorch, or ONNX Runtime on the CPU)."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        device: str = "auto",
        batch_size: int = 8,
        name: str = "",
        sha256: str = "",
        guard_rails: GuardRails | None = None,
        backend: TorchBackend | OnnxRuntimeBackend | None = None,
    ):
        """``backend``: where the network runs; None = the checkpoint's network in PyTorch on ``device`` (then
        ``checkpoint`` must hold the tensors)."""
        self.checkpoint = replace(checkpoint, state_dict={})  # the weights live in the backend; a second copy is not kept
        self.guard_rails = guard_rails or GuardRails()
        self.channels = list(checkpoint.channels)
        self.preprocessing = checkpoint.preprocessing
        self.batch_size = batch_size
        self.name = name or checkpoint.model_name
        self.sha256 = sha256
        self.backend = backend or TorchBackend(checkpoint.build(), device)
        self.device = self.backend.device  # "cpu", "cuda", …

    @classmethod
    def from_checkpoint(
        cls, source: str | Path, device: str = "auto", batch_size: int = 8, guard_rails: GuardRails | None = None, backend: str = "torch"
    ) -> Predictor:
        """``source`` is a registry name (``Resources/models.json``) or a checkpoint file path; ``backend`` one of
        ``backends.BACKENDS`` (default "torch": the outputs of earlier versions, bit for bit; the CLI's default is "auto")."""
        path, name = locate_model(source)
        sha256 = sha256_of(path)
        network, checkpoint = open_backend(path, sha256, backend, device)
        return cls(checkpoint, device, batch_size, name=name, sha256=sha256, guard_rails=guard_rails, backend=network)

    @classmethod
    def default(
        cls, device: str = "auto", batch_size: int = 8, guard_rails: GuardRails | None = None, backend: str = "torch"
    ) -> Predictor:
        """The shipped default model of the registry."""
        return cls.from_checkpoint(default_model_name(), device, batch_size, guard_rails, backend)

    def stream_probabilities(
        self, volume: np.ndarray, consume: SliceConsumer, on_progress: ProgressCallback | None = None, preprocessed: bool = False
    ) -> None:
        """Run the network over ``volume[z, y, x]`` and call ``consume(z, probabilities[channel, y, x])`` (float32, on
        the slice grid) for every slice in order, holding only :data:`CHUNK_BATCHES` batches of slices at a time (one
        batch in the first chunk, so that the first slices are done soon after the start).

        The field-of-view box and the HU decision are made once from the whole volume, without copying it;
        ``preprocessed`` as in :meth:`predict_probabilities`."""
        box = body_crop_box(volume, self.preprocessing)
        prepare = slice_preparation(volume, self.preprocessing, box, preprocessed)
        total, height, width = volume.shape
        start = 0
        while start < total:
            batches = 1 if start == 0 else CHUNK_BATCHES  # the first batch's slices come without waiting for three more
            stop = min(start + batches * self.batch_size, total)
            inputs = to_network_input(np.stack([prepare(plane) for plane in volume[start:stop]]), self.preprocessing)

            def put_back(offset: int, batch: np.ndarray, first: int = start) -> None:
                for index, slice_probabilities in enumerate(batch):
                    consume(first + offset + index, uncrop_probabilities(slice_probabilities, box, height, width))

            progress = None if on_progress is None else lambda done, _, first=start: on_progress(first + done, total)
            self.batch_size = self.backend.run(inputs, self.batch_size, put_back, progress, self.guard_rails.flip_tta)
            start = stop

    def predict_probabilities(
        self, volume: np.ndarray, on_progress: ProgressCallback | None = None, preprocessed: bool = False
    ) -> dict[str, np.ndarray]:
        """``volume[z, y, x]`` (or one 2D slice) → ``{channel: float32 probabilities of the volume's shape}``.

        ``preprocessed``: ``volume`` is uint8 slices that already went through the recipe's windowing,
        min–max and CLAHE (like the shared PNG training slices); they are only cropped to the body (recipes
        with ``field_of_view`` ``"body"``) and resized to the network size (``preprocessing.prepare_volume``).
        This keeps float32 probabilities of every channel for the whole volume: for masks, :meth:`predict_masks`
        needs far less memory."""
        volume, squeeze = self.as_volume(volume, preprocessed)
        probabilities = np.zeros((len(self.channels), *volume.shape), dtype=np.float32)

        def store(z: int, slice_probabilities: np.ndarray) -> None:
            probabilities[:, z] = slice_probabilities

        self.stream_probabilities(volume, store, on_progress, preprocessed)
        return {channel: probabilities[index][0] if squeeze else probabilities[index] for index, channel in enumerate(self.channels)}

    def as_volume(self, volume: np.ndarray, preprocessed: bool) -> tuple[np.ndarray, bool]:
        """``volume`` as a ``[z, y, x]`` array (no copy) and whether it was one 2D slice; wrong shapes and types raise."""
        volume = np.asarray(volume)
        squeeze = volume.ndim == 2
        volume = volume[None] if squeeze else volume
        if volume.ndim != 3:
            raise ValueError(f"expected a [z, y, x] volume or a 2D slice, got shape {volume.shape}")
        if preprocessed and volume.dtype != np.uint8:
            raise ValueError(f"preprocessed slices must be uint8 (the recipe's output), got {volume.dtype}")
        return volume, squeeze

    def stream_masks(
        self,
        volume: np.ndarray,
        on_progress: ProgressCallback | None = None,
        preprocessed: bool = False,
        probability_dtype: str | None = None,
    ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """``({channel: uint8 0/1 mask}, lesion probability or None)`` of ``volume[z, y, x]`` before the guard rails,
        thresholded slice by slice (:func:`masks_from_probabilities` per slice): the volume's float probabilities are
        never held. ``probability_dtype`` ("float32" or "uint8" = round(255 × p)) also keeps the lesion probability,
        0 outside the lung (:func:`lesion_probability_of_slice`)."""
        if probability_dtype not in (None, *PROBABILITY_DTYPES):
            raise ValueError(f"probability_dtype must be one of {PROBABILITY_DTYPES}, got {probability_dtype!r}")
        masks = {channel: np.zeros(volume.shape, dtype=np.uint8) for channel in self.channels}
        lesion_probability = None if probability_dtype is None else np.zeros(volume.shape, dtype=probability_dtype)

        def threshold(z: int, slice_probabilities: np.ndarray) -> None:
            by_channel = dict(zip(self.channels, slice_probabilities))
            for channel, mask in masks_from_probabilities(by_channel, self.guard_rails.lesion_threshold).items():
                masks[channel][z] = mask
            if lesion_probability is not None:
                probability = lesion_probability_of_slice(by_channel)
                lesion_probability[z] = quantized_probability(probability) if probability_dtype == "uint8" else probability

        self.stream_probabilities(volume, threshold, on_progress, preprocessed)
        release_free_memory()
        return masks, lesion_probability

    def predict_masks(
        self,
        volume: np.ndarray,
        on_progress: ProgressCallback | None = None,
        preprocessed: bool = False,
        grid: VoxelGrid | None = None,
        probabilities: dict[str, np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        """``{channel: uint8 0/1 mask}``; with a lung channel the lesion is kept inside the lung, and the lung includes it.

        ``preprocessed`` as in :meth:`predict_probabilities`. With the volume's ``grid`` (its voxel size) the
        3D guard rails apply too; without it only ``flip_tta`` does. ``probabilities``: those of
        :meth:`predict_probabilities` for ``volume``, when already computed (the network is not run again)."""
        volume, squeeze = self.as_volume(volume, preprocessed)
        if probabilities is not None:
            masks = masks_from_probabilities({channel: p[None] if squeeze else p for channel, p in probabilities.items()},
                                           self.guard_rails.lesion_threshold)
        else:
            masks, _ = self.stream_masks(volume, on_progress, preprocessed)
        if grid is not None and not squeeze:
            masks = self.guarded(masks, volume, grid, preprocessed)
        return {channel: mask[0] for channel, mask in masks.items()} if squeeze else masks

    def guarded(
        self, masks: dict[str, np.ndarray], volume: np.ndarray, grid: VoxelGrid, preprocessed: bool = False
    ) -> dict[str, np.ndarray]:
        """:func:`apply_guard_rails` on the masks of ``volume[z, y, x]`` (its CT values serve the HU lung prior)."""
        ct_hu = volume if not preprocessed and is_hounsfield(volume, self.preprocessing) else None
        return apply_guard_rails(masks, self.guard_rails, grid, ct_hu)

    def predict_volume(self, volume: np.ndarray, return_probabilities: bool = False, on_progress: ProgressCallback | None = None):
        """The lesion mask (uint8 0/1, shape of ``volume``); with ``return_probabilities`` also its probabilities."""
        if not return_probabilities:
            return self.predict_masks(volume, on_progress)["lesion"]
        probabilities = self.predict_probabilities(volume, on_progress)
        return masks_from_probabilities(probabilities, self.guard_rails.lesion_threshold)["lesion"], probabilities["lesion"]

    def segment_image(
        self,
        image: sitk.Image,
        include_lung: bool = True,
        on_progress: ProgressCallback | None = None,
        high_opacity_threshold_hu: float = DEFAULT_HIGH_OPACITY_THRESHOLD_HU,
        return_probabilities: bool = False,
        probability_dtype: str = "float32",
    ) -> SegmentationResult:
        """Segment a validated 3D ``sitk.Image`` in radiological orientation; masks come back on its exact grid.

        Statistics (``statistics`` module) always use the lung channel when the model has one; ``include_lung``
        only decides whether the lung mask is returned (and so written). The HU measures are computed when the
        input is in HU by the checkpoint's own test (``preprocessing.is_hounsfield``). ``return_probabilities``
        adds ``lesion_probability``: the network's lesion probability, 0 where the lung channel is below 0.5, so
        that it is ≥ the lesion threshold (0.5 by default) exactly on the lesion mask before the other guard rails;
        float32, or with ``probability_dtype`` "uint8" round(255 × p) as ``io.write_probability_map`` writes it (a
        quarter of the memory)."""
        oriented = io.to_radiological(image)
        ct = sitk.GetArrayViewFromImage(oriented)
        grid = VoxelGrid.of_image(oriented)
        coarse = coarse_input_warning(ct, self.preprocessing, self.checkpoint.train_config)
        if return_probabilities:
            masks, probability = self.stream_masks(ct, on_progress, probability_dtype=probability_dtype)
            masks = self.guarded(masks, ct, grid)
        else:
            masks, probability = self.predict_masks(ct, on_progress, grid=grid), None
        ct_hu = ct if is_hounsfield(ct, self.preprocessing) else None
        statistics = lesion_statistics(masks["lesion"], grid, masks.get("lung"), ct_hu, high_opacity_threshold_hu)
        del oriented, ct, ct_hu  # a reoriented copy of the CT is not needed any more
        written = {}
        for channel in list(masks):  # one channel at a time back on the input grid, each array let go once turned
            mask = masks.pop(channel)
            if include_lung or channel != "lung":
                written[channel] = io.restore_orientation(grid.image_of(mask), image)
            del mask
        lesion_probability = None if probability is None else io.restore_orientation(grid.image_of(probability), image)
        return SegmentationResult(written, statistics, lesion_probability, [coarse] if coarse else [])
