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

The parameters live in :class:`PreprocessingConfig`, which is written into every checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np


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
