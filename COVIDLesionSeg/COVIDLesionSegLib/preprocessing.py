"""Slice preprocessing shared by training and inference — the one source of truth.

It reproduces how the training slices in ``covid19-ct-seg-20cases-png256`` were made (that data set's
README, "How the source repository made these PNGs"), so a CT volume seen at inference looks like the
slices the network learned from:

1. **Orientation** — slices are taken in radiological display orientation: anterior at the top of the
   image, patient right on the image left. For a SimpleITK image this is the LPS-aligned array
   ``[z, y, x]`` (see :func:`COVIDLesionSegLib.io.to_radiological`); the PNGs were made the same way.
2. **Intensity window (HU inputs only)** — a slice whose minimum is below ``hu_detect_below`` is taken to
   be in Hounsfield units and is clipped to ``hu_window`` (−1250…250 HU). That is the lung window the
   Radiopaedia half of the training data was published in; it also removes padding such as −3024 HU
   outside a circular field of view, which would otherwise squeeze the lung into a few grey levels in
   step 4. 8-bit inputs (already windowed, like the training PNGs) are left as they are.
3. **Resize** to ``size``×``size`` (256²) with bicubic interpolation (OpenCV ``INTER_CUBIC``), as the
   source notebook did, before normalisation.
4. **Per-slice min–max** to [0, 1], then ×255 truncated to uint8: each slice is stretched by its own range.
5. **CLAHE** (OpenCV, ``clipLimit`` 7, OpenCV's default 8×8 tiles) to equalise local contrast.
6. **Network input** — uint8 / 255, the grey channel repeated to ``input_channels`` (3, the ImageNet
   ResNet layout), then normalised with ImageNet mean/std so ImageNet encoder weights see what they expect.

Masks follow steps 1 and 3 with the same resize and are thresholded at ``mask_threshold`` (0.25) as in the
source notebook. Network outputs go back with :func:`resize_probabilities` (bilinear) before thresholding.

**Field of view** (``field_of_view``, v2 recipes): ``"body"`` crops every slice of a volume to one square
box around the body (:func:`body_crop_box`: tissue threshold, opening, largest component of the z
projection, ``body_margin`` on each side), padded with the volume's minimum where the box leaves the
image, before steps 2–5; so a 500 mm and a 300 mm reconstruction show the lungs at a similar size.
The box is decided once per volume, so every slice keeps the same scale. ``"full"`` (v1 checkpoints,
which predate the field) uses the whole slice. :func:`prepare_volume` is steps 1–5 with the crop;
:func:`uncrop_probabilities` puts the network's output back on the slice.

The parameters live in :class:`PreprocessingConfig`, which is written into every checkpoint.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import cv2
import numpy as np

FIELDS_OF_VIEW = ("full", "body")
BODY_THRESHOLD_HU = -500.0  # tissue above, air below (HU volumes)
BODY_THRESHOLD_FRACTION = 0.45  # the same for other volumes, as a fraction of their value range
OPENING_RADIUS = 0.02  # of the slice side: removes the table, field-of-view rim and lines from the body mask
LOW_RESOLUTION_SCALES = (0.6, 0.9)  # training's --low-resolution scales (unless lowered), of the network grid's resolution


@dataclass(frozen=True)
class CropBox:
    """A square region of a slice in input pixels, ``[top, top + side) × [left, left + side)``; it may
    extend beyond the image (padded)."""

    top: int
    left: int
    side: int


@dataclass(frozen=True)
class PreprocessingConfig:
    size: int = 256
    hu_window: tuple[float, float] = (-1250.0, 250.0)
    hu_detect_below: float = -500.0
    clahe_clip_limit: float = 7.0
    clahe_tile_grid: tuple[int, int] = (8, 8)
    input_channels: int = 3
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    mask_threshold: float = 0.25
    field_of_view: str = "full"  # "full" (v1) or "body": crop each volume to its body box first
    body_margin: float = 0.05  # "body": margin on each side, fraction of the box side

    def __post_init__(self):
        if self.field_of_view not in FIELDS_OF_VIEW:
            raise ValueError(f"field_of_view must be one of {FIELDS_OF_VIEW}, got {self.field_of_view!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> PreprocessingConfig:
        known = {key: tuple(value) if isinstance(value, list) else value for key, value in values.items()}
        unknown = set(known) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown preprocessing fields {sorted(unknown)}")
        return cls(**known)


def is_hounsfield(slice_or_volume: np.ndarray, config: PreprocessingConfig) -> bool:
    """True when values go below ``hu_detect_below`` (air in HU is about −1000; 8-bit data never is)."""
    return float(np.min(slice_or_volume)) < config.hu_detect_below


def slice_to_uint8(ct_slice: np.ndarray, config: PreprocessingConfig, hounsfield: bool | None = None) -> np.ndarray:
    """Steps 2–5 for one slice ``[H, W]`` of any numeric type → ``[size, size]`` uint8 (CLAHE-equalised).

    ``hounsfield`` says whether to apply the HU window; None decides from this slice's own minimum.
    Callers with a whole volume decide once per volume (see :func:`volume_to_uint8`).
    """
    image = np.asarray(ct_slice, dtype=np.float32)
    if hounsfield is None:
        hounsfield = is_hounsfield(image, config)
    if hounsfield:
        image = np.clip(image, *config.hu_window)
    if image.min() == image.max():  # a blank slice stays blank (CLAHE would invent tile patterns on it)
        return np.zeros((config.size, config.size), dtype=np.uint8)
    image = resize_slice(image, config.size)
    low, high = float(image.min()), float(image.max())
    image_u8 = ((image - low) / max(high - low, 1e-12) * 255).astype(np.uint8)
    clahe = cv2.createCLAHE(clipLimit=config.clahe_clip_limit, tileGridSize=tuple(config.clahe_tile_grid))
    return clahe.apply(image_u8)


def resize_slice(image: np.ndarray, size: int) -> np.ndarray:
    """Step 3 alone: ``[H, W]`` → ``[size, size]`` with bicubic interpolation (uint8 input saturates)."""
    if image.shape == (size, size):
        return image
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_CUBIC)


def volume_to_uint8(volume: np.ndarray, config: PreprocessingConfig) -> np.ndarray:
    """Steps 2–5 for every slice of ``volume[z, y, x]`` → ``[z, size, size]`` uint8.

    The HU decision is made once for the whole volume, so a slice that happens to contain no air is still
    windowed like its neighbours.
    """
    hounsfield = is_hounsfield(volume, config)
    return np.stack([slice_to_uint8(ct_slice, config, hounsfield) for ct_slice in volume])


def to_network_input(slices_u8: np.ndarray, config: PreprocessingConfig) -> np.ndarray:
    """Step 6: ``[N, H, W]`` uint8 → ``[N, input_channels, H, W]`` float32, ImageNet-normalised."""
    grey = slices_u8.astype(np.float32)[:, None] / 255.0
    channels = np.repeat(grey, config.input_channels, axis=1)
    mean = np.asarray(config.mean[: config.input_channels], dtype=np.float32)[None, :, None, None]
    std = np.asarray(config.std[: config.input_channels], dtype=np.float32)[None, :, None, None]
    return (channels - mean) / std


def resize_mask(mask: np.ndarray, config: PreprocessingConfig) -> np.ndarray:
    """A binary mask slice ``[H, W]`` → ``[size, size]`` bool, resized like the image (bicubic, > threshold)."""
    image = np.asarray(mask > 0, dtype=np.float32)
    if image.shape != (config.size, config.size):
        image = cv2.resize(image, (config.size, config.size), interpolation=cv2.INTER_CUBIC)
    return image > config.mask_threshold


def resize_probabilities(probabilities: np.ndarray, height: int, width: int) -> np.ndarray:
    """Network probabilities ``[C, size, size]`` → ``[C, height, width]`` (bilinear), values in [0, 1]."""
    if probabilities.shape[-2:] == (height, width):
        return probabilities
    return np.stack([cv2.resize(channel, (width, height), interpolation=cv2.INTER_LINEAR) for channel in probabilities])


BODY_BOX_THREADS = min(4, os.cpu_count() or 1)
BODY_BOX_MAX_SLICES = 200  # above it the box is decided from this many evenly spaced slices (all training volumes have fewer)
BODY_BOX_JUDGED_SIDE = 256  # slices at least twice as large are judged shrunk by a whole factor to about this side


def body_crop_box(volume: np.ndarray, config: PreprocessingConfig) -> CropBox | None:
    """The square box around the body of ``volume[z, y, x]`` (HU or 8-bit), or None for ``"full"`` or when no
    body is found.

    Each slice is smoothed (Gaussian, σ = 0.8 % of its side, against CLAHE noise); tissue is ≥ −500 HU in
    HU volumes, else above 45 % of the volume's value range (−575 HU in the lung window). The tissue is
    opened (radius ``OPENING_RADIUS``: the table, lines, the field-of-view rim go), its largest connected
    component (holes filled) is the body; the bounding box of the bodies of all slices is squared about
    its centre and widened by ``body_margin`` on each side. A volume of more than ``BODY_BOX_MAX_SLICES`` slices
    (thin sections) is judged from that many evenly spaced slices, the first and last among them: neighbouring thin
    slices show nearly the same body, and the time before the first slice stays bounded. Slices of at least twice
    ``BODY_BOX_JUDGED_SIDE`` (512² CT) are judged after shrinking by a whole factor (area mean, k × k pixels to one),
    a quarter of the work, and their box is found to within that factor: the network sees the box at 256² anyway.
    """
    if config.field_of_view == "full":
        return None
    volume = np.asarray(volume)
    volume = volume[None] if volume.ndim == 2 else volume
    factor = max(1, min(volume.shape[-2:]) // BODY_BOX_JUDGED_SIDE)
    height, width = (side // factor for side in volume.shape[-2:])
    if is_hounsfield(volume, config):
        threshold = BODY_THRESHOLD_HU
    else:
        low, high = float(volume.min()), float(volume.max())
        threshold = low + BODY_THRESHOLD_FRACTION * (high - low) if high > low else np.inf
    radius = max(1, round(OPENING_RADIUS * max(height, width)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))

    def body_extent(plane: np.ndarray) -> tuple[int, int, int, int] | None:
        """(top, bottom, left, right), inclusive, of the slice's body: the bounding box of the largest component, which
        filling its holes would not change (a hole lies inside the component's box)."""
        image = plane.astype(np.float32)
        if factor > 1:  # the whole factor's blocks of the top-left part; a remainder under ``factor`` pixels is left out
            image = cv2.resize(image[: height * factor, : width * factor], (width, height), interpolation=cv2.INTER_AREA)
        tissue = cv2.GaussianBlur(image, (0, 0), 0.008 * max(height, width)) >= threshold
        count, _, stats, _ = cv2.connectedComponentsWithStats(cv2.morphologyEx(tissue.astype(np.uint8), cv2.MORPH_OPEN, kernel))
        if count > 1:
            largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
            if stats[largest, cv2.CC_STAT_AREA] >= 0.01 * height * width:
                left, top, box_width, box_height = (int(value) * factor for value in stats[largest, :4])
                return top, top + box_height - 1, left, left + box_width - 1
        return None

    # OpenCV lets go of the GIL: the slices (most of the time before a volume's first batch) go over BODY_BOX_THREADS
    # threads; the box of the bodies' union is the union of each slice's box, in any order
    judged = np.linspace(0, len(volume) - 1, min(len(volume), BODY_BOX_MAX_SLICES)).round().astype(int)
    with ThreadPoolExecutor(max_workers=max(1, min(BODY_BOX_THREADS, len(judged)))) as pool:
        extents = [extent for extent in pool.map(lambda z: body_extent(volume[z]), judged) if extent is not None]
    if not extents:
        return None
    top, bottom = min(extent[0] for extent in extents), max(extent[1] for extent in extents)
    left, right = min(extent[2] for extent in extents), max(extent[3] for extent in extents)
    box_height, box_width = bottom - top + 1, right - left + 1
    side = round(max(box_width, box_height) * (1 + 2 * config.body_margin))
    return CropBox(top=round(top + box_height / 2 - side / 2), left=round(left + box_width / 2 - side / 2), side=side)


def crop_slice(image: np.ndarray, box: CropBox | None, fill: float = 0) -> np.ndarray:
    """``image[H, W]`` cut to ``box`` → ``[side, side]``, ``fill`` where the box leaves the image; as is for None."""
    if box is None:
        return image
    height, width = image.shape
    out = np.full((box.side, box.side), fill, dtype=image.dtype)
    top, left = max(box.top, 0), max(box.left, 0)
    bottom, right = min(box.top + box.side, height), min(box.left + box.side, width)
    if bottom > top and right > left:
        out[top - box.top : bottom - box.top, left - box.left : right - box.left] = image[top:bottom, left:right]
    return out


def network_grid_share(volume: np.ndarray, config: PreprocessingConfig) -> tuple[int, float]:
    """How finely the network sees ``volume[z, y, x]``: the side in input pixels of what is resized to the network
    grid (the body box with its margin, or for ``"full"`` and a volume without a body the whole slice's longer side),
    and that side as a share of ``config.size``. Below 1 the network grid holds more pixels than the input gave it:
    the training slices (256², body box with margin) are shown at about 1, and ``--low-resolution`` renders them
    down to its smallest scale (:data:`LOW_RESOLUTION_SCALES`)."""
    box = body_crop_box(volume, config)
    side = box.side if box is not None else max(np.shape(volume)[-2:])
    return side, side / config.size


def prepare_volume(volume: np.ndarray, config: PreprocessingConfig, preprocessed: bool = False) -> tuple[np.ndarray, CropBox | None]:
    """Steps 1–5 with the field-of-view crop: ``volume[z, y, x]`` → ``(uint8 [z, size, size], box or None)``.

    ``preprocessed``: the slices already are the recipe's uint8 output (the PNG training slices); they are
    only cropped (padded with 0) and resized, since a second min–max + CLAHE would change them.
    """
    box = body_crop_box(volume, config)
    if preprocessed:
        return np.stack([resize_slice(crop_slice(plane, box, 0), config.size) for plane in volume]), box
    return volume_to_uint8(crop_volume(volume, box), config), box


def crop_volume(volume: np.ndarray, box: CropBox | None) -> np.ndarray:
    """``volume[z, y, x]`` cut to ``box`` slice by slice → ``[z, side, side]``, padded with the volume's minimum where
    the box leaves the image (the field-of-view crop of :func:`prepare_volume`); as is for None."""
    if box is None:
        return volume
    fill = float(np.min(volume))
    return np.stack([crop_slice(plane, box, fill) for plane in volume])


def uncrop_probabilities(probabilities: np.ndarray, box: CropBox | None, height: int, width: int) -> np.ndarray:
    """Network output ``[C, size, size]`` → ``[C, height, width]`` on the slice; 0 outside ``box``."""
    if box is None:
        return resize_probabilities(probabilities, height, width)
    on_box = resize_probabilities(probabilities, box.side, box.side)
    out = np.zeros((len(probabilities), height, width), dtype=np.float32)
    top, left = max(box.top, 0), max(box.left, 0)
    bottom, right = min(box.top + box.side, height), min(box.left + box.side, width)
    if bottom > top and right > left:
        out[:, top:bottom, left:right] = on_box[:, top - box.top : bottom - box.top, left - box.left : right - box.left]
    return out
