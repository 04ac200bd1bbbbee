"""Slice augmentation: ``"none"``, ``"flip"`` (left–right) or ``"robust"``.

Augmentation works on the preprocessed 8-bit slice ``image`` ``[H, W]`` uint8 and its masks
``[C, H, W]`` bool, before :func:`~COVIDLesionSegLib.preprocessing.to_network_input`, and returns the
same shapes and types. Every random number comes from the ``numpy.random.Generator`` passed in, so an
item is reproducible from its seed.

``"robust"`` prepares the shipped model for CT it was not trained on — raw HU volumes, 8-bit lung-window
exports, other scanners, kernels and fields of view (parameters in :class:`RobustAugmentation`):

1. intensity, mimicking other windows and reconstruction kernels: random gamma, contrast/brightness,
   Gaussian noise, then Gaussian blur (smooth kernel) or unsharp masking (sharp kernel);
2. geometry: a random small rotation, scale and translation — or, sometimes, a zoom-out that pads with
   black as a larger reconstruction field of view would — image bilinear, masks nearest-neighbour;
3. a left–right flip;
4. sometimes a circular field-of-view mask (black outside a random circle; labels cut there too);
5. sometimes the core's :func:`~COVIDLesionSegLib.preprocessing.slice_to_uint8` again (min–max + CLAHE),
   which inference always ends with, so the network sees what inference makes of such an input.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from COVIDLesionSegLib.preprocessing import PreprocessingConfig, slice_to_uint8

AUGMENT_MODES = ("none", "flip", "robust")


@dataclass(frozen=True)
class RobustAugmentation:
    """Probabilities and ranges of the ``"robust"`` mode; intensities are fractions of the 0–255 range."""

    gamma_probability: float = 0.5
    gamma_range: tuple[float, float] = (0.67, 1.5)
    contrast_probability: float = 0.5
    contrast_range: tuple[float, float] = (0.75, 1.3)
    brightness_range: tuple[float, float] = (-0.1, 0.1)
    noise_probability: float = 0.3
    noise_sigma_range: tuple[float, float] = (0.005, 0.04)
    blur_probability: float = 0.15
    blur_sigma_range: tuple[float, float] = (0.5, 1.2)  # pixels
    sharpen_probability: float = 0.15
    sharpen_amount_range: tuple[float, float] = (0.5, 1.5)
    affine_probability: float = 0.7
    rotation_degrees: float = 10.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    translation_fraction: float = 0.05  # of the image size
    zoom_out_probability: float = 0.2  # replaces the scale above
    zoom_out_range: tuple[float, float] = (0.6, 0.9)
    flip_probability: float = 0.5
    circular_fov_probability: float = 0.2
    circular_fov_radius_range: tuple[float, float] = (0.42, 0.55)  # of the image size
    reclahe_probability: float = 0.5


ROBUST = RobustAugmentation()


def check_augment_mode(mode: str) -> str:
    if mode not in AUGMENT_MODES:
        raise ValueError(f"unknown augment mode {mode!r}; valid: {', '.join(AUGMENT_MODES)}")
    return mode


def augment_slice(
    image: np.ndarray,
    masks: np.ndarray,
    rng: np.random.Generator,
    mode: str,
    preprocessing: PreprocessingConfig,
    params: RobustAugmentation = ROBUST,
) -> tuple[np.ndarray, np.ndarray]:
    """Augment ``image`` ``[H, W]`` uint8 and ``masks`` ``[C, H, W]`` bool together; returns new arrays."""
    check_augment_mode(mode)
    if mode == "none":
        return image, masks
    if mode == "robust":
        image = change_intensity(image, rng, params)
        image, masks = random_affine(image, masks, rng, params)
    if rng.random() < params.flip_probability:
        image, masks = image[:, ::-1], masks[:, :, ::-1]
    if mode == "robust":
        if rng.random() < params.circular_fov_probability:
            image, masks = circular_field_of_view(image, masks, rng, params)
        if rng.random() < params.reclahe_probability:
            image = slice_to_uint8(image, preprocessing, hounsfield=False)
    return np.ascontiguousarray(image), np.ascontiguousarray(masks)


LOW_RESOLUTION_STREAM = 13  # lower_resolution's random numbers are drawn apart from the augmentation's (seed, epoch, index)
VERTICAL_FLIP_STREAM = 17  # and so are the vertical flip's
# lower_resolution's scales: preprocessing.LOW_RESOLUTION_SCALES (inference warns below them), as
# RobustAugmentation.zoom_out_range: fields of view up to 1/0.6 of the training slices' (the default;
# TrainConfig.low_resolution_min_scale lowers the smallest scale, e.g. to 0.4 for 128² reconstructions)


def lower_resolution(image: np.ndarray, scale: float) -> np.ndarray:
    """``image`` [H, W] uint8 shrunk to ``scale`` of its size (area average) and enlarged back (bicubic, as
    :func:`~COVIDLesionSegLib.preprocessing.resize_slice`): what a wider field of view looks like once inference has
    cut a volume to its body box and resized it, the body having covered fewer pixels."""
    height, width = image.shape
    small = cv2.resize(image, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)


def change_intensity(image: np.ndarray, rng: np.random.Generator, params: RobustAugmentation) -> np.ndarray:
    """Gamma, contrast/brightness, noise, then blur or sharpen, on intensities scaled to [0, 1]."""
    values = image.astype(np.float32) / 255.0
    if rng.random() < params.gamma_probability:
        low, high = np.log(params.gamma_range)
        values = values ** np.float32(np.exp(rng.uniform(low, high)))
    if rng.random() < params.contrast_probability:
        contrast, brightness = rng.uniform(*params.contrast_range), rng.uniform(*params.brightness_range)
        values = (values - 0.5) * np.float32(contrast) + np.float32(0.5 + brightness)
    if rng.random() < params.noise_probability:
        sigma = rng.uniform(*params.noise_sigma_range)
        values = values + rng.normal(0.0, sigma, values.shape).astype(np.float32)
    kernel_draw = rng.random()
    if kernel_draw < params.blur_probability:
        values = cv2.GaussianBlur(values, (0, 0), rng.uniform(*params.blur_sigma_range))
    elif kernel_draw < params.blur_probability + params.sharpen_probability:
        amount = rng.uniform(*params.sharpen_amount_range)
        values = values + np.float32(amount) * (values - cv2.GaussianBlur(values, (0, 0), 1.0))
    return (np.clip(values, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def random_affine(
    image: np.ndarray, masks: np.ndarray, rng: np.random.Generator, params: RobustAugmentation
) -> tuple[np.ndarray, np.ndarray]:
    """Rotate/scale about the centre and translate; zoom-outs pad with black (0)."""
    zoom_out = rng.random() < params.zoom_out_probability
    if not zoom_out and rng.random() >= params.affine_probability:
        return image, masks
    height, width = image.shape
    scale = rng.uniform(*(params.zoom_out_range if zoom_out else params.scale_range))
    angle = rng.uniform(-params.rotation_degrees, params.rotation_degrees)
    shift = rng.uniform(-params.translation_fraction, params.translation_fraction, size=2) * (width, height)
    matrix = cv2.getRotationMatrix2D((width / 2 - 0.5, height / 2 - 0.5), angle, scale)
    matrix[:, 2] += shift
    warped = cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    warped_masks = np.stack(
        [
            cv2.warpAffine(
                mask.astype(np.uint8), matrix, (width, height), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=0
            )
            for mask in masks
        ]
    ).astype(bool)
    return warped, warped_masks


def circular_field_of_view(
    image: np.ndarray, masks: np.ndarray, rng: np.random.Generator, params: RobustAugmentation
) -> tuple[np.ndarray, np.ndarray]:
    """Black out (and unlabel) everything outside a random circle, as a scanner's reconstruction FOV does."""
    height, width = image.shape
    size = min(height, width)
    radius = rng.uniform(*params.circular_fov_radius_range) * size
    centre_y, centre_x = (np.array([height, width]) - 1) / 2 + rng.uniform(-0.03, 0.03, size=2) * size
    rows, columns = np.ogrid[:height, :width]
    outside = (rows - centre_y) ** 2 + (columns - centre_x) ** 2 > radius**2
    image = np.where(outside, np.uint8(0), image)
    masks = masks & ~outside
    return image, masks
