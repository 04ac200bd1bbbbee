"""Lesion-free training slices from chest CT volumes in Hounsfield units (``chest-ct-hu-no-covid``).

The slice set of COVID-19-CT-Seg holds only lesion-bearing slices from the middle of each volume; a
network trained on it alone has never seen a healthy lung, an apex or base, or a slice without lung.
:class:`NegativeVolumeDataset` adds such slices:

- each volume is read, put in radiological orientation and prepared by the functions inference uses
  (the steps of :func:`~COVIDLesionSegLib.preprocessing.prepare_volume`: field-of-view box and crop, then per
  slice HU window, resize, min–max, CLAHE), so the network sees HU-derived slices exactly as inference makes
  them (a test compares them with ``prepare_volume``);
- the lesion target is empty; the lung target is the classical lung mask
  (:func:`~COVIDLesionSegLib.classical_lung.classical_lung_mask`), cut and resized like the image;
- slices holding a lung tumour (the folder's ``tumour_masks/``), and one slice on either side, are left
  out: a tumour is an opacity but not COVID-19, so it must not be taught as "no lesion";
- ``exclude_patients`` keeps patients out (the held-out false-positive test patients); ``only_patients``
  keeps only those (lesion-free validation patients);
- ``dependent_density`` (a probability) renders a slice now and then from its HU with synthetic
  gravity-dependent density added in the lung (:func:`add_dependent_density`), still labelled "no lesion":
  the shipped models' false lesion on healthy lungs lies in this dependent, posterior density.
- ``thick_slices`` (a probability) renders a slice now and then as a thicker reconstruction would show it: the
  HU averaged over a slab of 5–10 mm around it (:func:`slab_hu`). Thick slices blur vessels and the diaphragm's dome
  into hazy density; with coarse pixels as well, the shipped v5 model marks five times the false lesion on the same
  lesion-free chests (``Training/results/thick-renderings-v5``).
- ``coarse_reconstructions`` (a probability) renders a slice as such a coarse, thick scan shows it: a 5–10 mm slab
  with 2.5–4 mm pixels (:func:`slab_hu`, then :func:`coarse_hu`), in HU before the inference preprocessing, as
  ``CTChest4.nrrd`` (3 mm pixels, 10 mm slices) reaches the network.

:class:`MixedSliceDataset` puts them beside the lesion slices at a chosen share of every epoch.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import SimpleITK as sitk
from torch.utils.data import Dataset

from COVIDLesionSegLib.classical_lung import classical_lung_mask
from COVIDLesionSegLib.io import read_image, to_radiological
from COVIDLesionSegLib.preprocessing import (
    PreprocessingConfig,
    body_crop_box,
    crop_slice,
    crop_volume,
    is_hounsfield,
    resize_mask,
    slice_to_uint8,
)

from .data import SliceDataset

TUMOUR_MARGIN_SLICES = 1


@dataclass(frozen=True)
class NegativeCase:
    """One volume of the lesion-free folder's ``manifest.csv``."""

    case: str
    patient: str
    volume: Path
    tumour_mask: Path | None


def read_negative_cases(root: str | Path) -> list[NegativeCase]:
    """The cases of ``root/manifest.csv`` (``chest-ct-hu-no-covid``), with absolute paths."""
    root = Path(root)
    manifest = root / "manifest.csv"
    if not manifest.is_file():
        raise FileNotFoundError(
            f"{manifest} not found; the negatives folder must be chest-ct-hu-no-covid (manifest.csv, volumes/, tumour_masks/)"
        )
    with open(manifest, newline="") as stream:
        rows = list(csv.DictReader(stream))
    cases = []
    for row in rows:
        tumour = root / "tumour_masks" / f"{row['case']}.nii.gz"
        volume = root / "volumes" / f"{row['case']}.nii.gz"
        cases.append(NegativeCase(row["case"], row["patient"], volume, tumour if tumour.is_file() else None))
    return cases


def tumour_free_slices(case: NegativeCase, depth: int) -> np.ndarray:
    """Bool ``[depth]``: the radiologically oriented slices at least ``TUMOUR_MARGIN_SLICES`` away from any tumour."""
    if case.tumour_mask is None:
        return np.ones(depth, dtype=bool)
    tumour = sitk.GetArrayFromImage(to_radiological(sitk.ReadImage(str(case.tumour_mask)))).any(axis=(1, 2))
    if len(tumour) != depth:
        raise ValueError(f"{case.tumour_mask}: {len(tumour)} slices, but its CT has {depth}")
    near = np.convolve(tumour.astype(int), np.ones(2 * TUMOUR_MARGIN_SLICES + 1, dtype=int), mode="same") > 0
    return ~near


@dataclass(frozen=True)
class PreparedNegative:
    """One lesion-free volume, radiologically oriented and cut to its field-of-view box.

    ``hu``: float32 ``[z, side, side]`` on the box at the scan's resolution (padded with the volume's
    minimum); ``lung``: bool, the classical lung mask on the same grid; ``row_mm``: the pixel height in mm;
    ``slice_mm``: the slice spacing in mm; ``hounsfield``: whether the volume is in HU (decided once per volume,
    as inference does). :meth:`render` turns a slice into what the network sees.
    """

    hu: np.ndarray
    lung: np.ndarray
    row_mm: float
    slice_mm: float
    hounsfield: bool
    preprocessing: PreprocessingConfig

    def render(self, z: int, hu: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Slice ``z`` (its CT values replaced by ``hu[side, side]`` if given) as uint8 ``[size, size]`` through the
        inference preprocessing (the slice of ``prepare_volume``), and its lung mask resized like it."""
        plane = self.hu[z] if hu is None else hu
        return slice_to_uint8(plane, self.preprocessing, self.hounsfield), resize_mask(self.lung[z], self.preprocessing)


def prepare_negative_case(case: NegativeCase, preprocessing: PreprocessingConfig) -> PreparedNegative:
    """Read ``case``'s HU volume, orient it, derive its classical lung mask and cut both to the body box."""
    image = to_radiological(read_image(case.volume))
    hu = sitk.GetArrayFromImage(image).astype(np.float32)
    lung = classical_lung_mask(hu, image.GetSpacing())
    box = body_crop_box(hu, preprocessing)
    hu = crop_volume(hu, box)
    lung = np.stack([crop_slice(plane, box) for plane in lung])
    spacing = image.GetSpacing()
    return PreparedNegative(hu, lung, float(spacing[1]), float(spacing[2]), is_hounsfield(hu, preprocessing), preprocessing)


THICK_SLICE_MM = (5.0, 10.0)  # slab thickness of --thick-slices, drawn uniformly: common thick reconstructions
THICK_SLICES_STREAM = 13  # its random numbers are drawn apart from the augmentation's and the dependent density's
COARSE_PIXEL_MM = (2.5, 4.0)  # pixel size of --coarse-reconstructions, drawn uniformly: 128² over a 320–510 mm field of view
COARSE_RECONSTRUCTIONS_STREAM = 19  # its random numbers are drawn apart from the others'


def slab_hu(hu: np.ndarray, z: int, slice_mm: float, thickness_mm: float, usable: np.ndarray) -> np.ndarray:
    """float32 ``[H, W]``: the CT ``hu[z, H, W]`` averaged over a slab ``thickness_mm`` thick centred on slice ``z``,
    as a thicker reconstruction shows it. Each slice (``slice_mm`` apart, each that thick) weighs by its overlap with
    the slab; slices outside the run of ``usable`` (bool ``[z]``) slices around ``z`` are left out (a slab must not
    reach a tumour or past the volume's end). A slab no thicker than one slice is slice ``z`` itself."""
    half_slices = thickness_mm / (2 * slice_mm)  # half the slab, in slices
    reach = int(np.ceil(half_slices - 0.5))
    low, high = z, z
    while low > max(0, z - reach) and usable[low - 1]:
        low -= 1
    while high < min(len(hu) - 1, z + reach) and usable[high + 1]:
        high += 1
    offsets = np.arange(low, high + 1) - z
    weights = np.clip(np.minimum(offsets + 0.5, half_slices) - np.maximum(offsets - 0.5, -half_slices), 0.0, 1.0)
    if len(offsets) == 1:
        return hu[z]
    return np.tensordot(weights / weights.sum(), hu[low : high + 1], axes=1).astype(np.float32)


def coarse_hu(plane: np.ndarray, row_mm: float, pixel_mm: float) -> np.ndarray:
    """float32 ``[n, n]``: the square HU plane ``plane[side, side]`` (pixels ``row_mm`` high) as a reconstruction with
    ``pixel_mm`` pixels shows it, each new pixel the mean of the area it covers (``n`` = side × row_mm / pixel_mm,
    rounded; the plane itself when that is not fewer pixels). Inference then resizes it to the network grid like
    any slice, as it does a coarse scan's body box."""
    side = plane.shape[-1]
    pixels = max(1, round(side * row_mm / pixel_mm))
    if pixels >= side:
        return plane
    return cv2.resize(plane.astype(np.float32), (pixels, pixels), interpolation=cv2.INTER_AREA)


@dataclass(frozen=True)
class DependentDensity:
    """Ranges of :func:`add_dependent_density` (each slice draws uniformly from them)."""

    amplitude_hu: tuple[float, float] = (100.0, 450.0)  # added at the dependent pleura
    decay_mm: tuple[float, float] = (4.0, 25.0)  # e-folding distance up from the dependent pleura
    gradient_hu: tuple[float, float] = (0.0, 80.0)  # gentle anterior → posterior gradient over the whole lung
    modulation: tuple[float, float] = (0.3, 1.0)  # left–right variation of the amplitude (fraction)
    modulation_knots: int = 6  # control points of that variation across the slice


DEPENDENT_DENSITY = DependentDensity()
DEPENDENT_DENSITY_STREAM = 11  # its random numbers are drawn apart from the augmentation's (seed, epoch, index)


def add_dependent_density(
    hu: np.ndarray, lung: np.ndarray, row_mm: float, rng: np.random.Generator, params: DependentDensity = DEPENDENT_DENSITY
) -> np.ndarray:
    """HU to add to ``hu[H, W]`` for synthetic gravity-dependent density inside ``lung[H, W]`` (float32 ``[H, W]``).

    Supine CT shows healthy lung denser towards the back (radiological slices: the bottom rows), most at the
    dependent pleura (subsegmental atelectasis, up to several hundred HU): an exponential band
    ``A·exp(−d/λ)`` along each column, ``d`` the distance in mm down to where the lung ends, varied
    left–right, plus a linear gradient over the lung's height. Dense tissue (vessels, walls) is left as it
    is: the addition fades from full below −600 HU to none above −100 HU.
    """
    height, width = hu.shape
    cells_below = np.zeros((height, width), dtype=np.float32)  # lung pixels from each pixel down to the lung's edge
    cells_below[-1] = lung[-1]
    for row in range(height - 2, -1, -1):
        cells_below[row] = np.where(lung[row], cells_below[row + 1] + 1, 0)
    distance_mm = np.maximum(cells_below - 0.5, 0) * row_mm
    amplitude, decay, gradient = (rng.uniform(*r) for r in (params.amplitude_hu, params.decay_mm, params.gradient_hu))
    knots = rng.uniform(*params.modulation, size=params.modulation_knots)
    across = np.interp(np.arange(width), np.linspace(0, width - 1, params.modulation_knots), knots).astype(np.float32)
    added = np.float32(amplitude) * np.exp(-distance_mm / np.float32(decay)) * across[None, :]
    rows = np.flatnonzero(lung.any(axis=1))
    if len(rows) > 1:
        depth = np.clip((np.arange(height, dtype=np.float32) - rows[0]) / (rows[-1] - rows[0]), 0, 1)
        added += np.float32(gradient) * depth[:, None]
    fade = np.clip((-100.0 - hu) / 500.0, 0.0, 1.0).astype(np.float32)
    return np.where(lung, added * fade, np.float32(0))


class NegativeVolumeDataset(SliceDataset):
    """Every tumour-free axial slice of the lesion-free volumes in ``root``: patients in ``exclude_patients`` left
    out; if ``only_patients`` is given, only those. ``dependent_density``: the probability that an item is
    rendered with :func:`add_dependent_density`; ``thick_slices``: that it is rendered as a slab of
    ``THICK_SLICE_MM`` (:func:`slab_hu`; with both, the density is added to the slab); ``coarse_reconstructions``: that
    it is rendered as a slab of ``THICK_SLICE_MM`` with pixels of ``COARSE_PIXEL_MM`` (in place of a plain slab; any
    density is added before the pixels are coarsened). Each is drawn from its own stream of (seed, epoch, index), so
    the other augmentation draws stay as without it.

    Items are those of :class:`~.data.SliceDataset` with an all-zero lesion target.
    """

    def __init__(
        self,
        root: str | Path,
        exclude_patients: Sequence[str] = (),
        only_patients: Sequence[str] | None = None,
        dependent_density: float = 0.0,
        thick_slices: float = 0.0,
        coarse_reconstructions: float = 0.0,
        **options,
    ):
        super().__init__(**options)
        renderings = {"dependent_density": dependent_density, "thick_slices": thick_slices,
                      "coarse_reconstructions": coarse_reconstructions}
        for name, value in renderings.items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} is a probability, got {value}")
        self.dependent_density, self.thick_slices, self.coarse_reconstructions = dependent_density, thick_slices, coarse_reconstructions
        cases = read_negative_cases(root)
        unknown = sorted(set(exclude_patients).union(only_patients or ()) - {case.patient for case in cases})
        if unknown:
            raise ValueError(f"patients {unknown} are not in {Path(root) / 'manifest.csv'}")
        if only_patients is not None:
            cases = [case for case in cases if case.patient in only_patients]
        self.images: list[np.ndarray] = []  # per kept slice: uint8 [size, size]
        self.lungs: list[np.ndarray] = []  # per kept slice: bool [size, size]
        self.slices: list[tuple[str, int]] = []  # (case, z)
        self.volumes: dict[str, tuple[PreparedNegative, np.ndarray]] = {}  # kept only to render anew: volume, usable slices
        for case in cases:
            if case.patient in exclude_patients:
                continue
            volume = prepare_negative_case(case, self.preprocessing)
            usable = tumour_free_slices(case, len(volume.hu))
            for z in np.flatnonzero(usable):
                image, lung = volume.render(z)
                self.images.append(image)
                self.lungs.append(lung)
                self.slices.append((case.case, int(z)))
            if any(renderings.values()):
                self.volumes[case.case] = (volume, usable)
        self.cases = list(dict.fromkeys(case for case, _ in self.slices))

    def __len__(self) -> int:
        return len(self.slices)

    def load_slice(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lung = self.lungs[index]
        image = self.images[index]
        if self.volumes:
            case, z = self.slices[index]
            volume, usable = self.volumes[case]
            hu = None
            thick = np.random.default_rng((self.seed, self.epoch, index, THICK_SLICES_STREAM))
            coarse = np.random.default_rng((self.seed, self.epoch, index, COARSE_RECONSTRUCTIONS_STREAM))
            coarse_pixel_mm = coarse.uniform(*COARSE_PIXEL_MM) if coarse.random() < self.coarse_reconstructions else None
            if coarse_pixel_mm is not None:
                hu = slab_hu(volume.hu, z, volume.slice_mm, coarse.uniform(*THICK_SLICE_MM), usable)
            elif thick.random() < self.thick_slices:
                hu = slab_hu(volume.hu, z, volume.slice_mm, thick.uniform(*THICK_SLICE_MM), usable)
            dense = np.random.default_rng((self.seed, self.epoch, index, DEPENDENT_DENSITY_STREAM))
            if dense.random() < self.dependent_density and volume.hounsfield and volume.lung[z].any():
                plane = volume.hu[z] if hu is None else hu
                hu = plane + add_dependent_density(plane, volume.lung[z], volume.row_mm, dense)
            if coarse_pixel_mm is not None:
                hu = coarse_hu(hu, volume.row_mm, coarse_pixel_mm)
            if hu is not None:
                image, _ = volume.render(z, hu)
        return image, np.zeros_like(lung), lung

    def volume_id(self, index: int) -> str:
        return self.slices[index][0]

    def position(self, index: int) -> int:
        return self.slices[index][1]


class MixedSliceDataset(Dataset):
    """``positives`` (every item, every epoch) plus lesion-free items making ``negative_fraction`` of the epoch.

    Length ``n + m`` with ``m = round(n × f / (1 − f))``; the ``m`` negative items of an epoch are drawn
    without replacement (cycling when ``m`` exceeds the pool) from a permutation seeded by (seed, epoch).
    """

    def __init__(self, positives: SliceDataset, negatives: SliceDataset, negative_fraction: float, seed: int = 0):
        if not 0.0 < negative_fraction < 1.0:
            raise ValueError(f"negative_fraction must be in (0, 1), got {negative_fraction}")
        if len(negatives) == 0:
            raise ValueError("no lesion-free slices to mix in")
        self.positives, self.negatives, self.seed = positives, negatives, seed
        self.negative_count = round(len(positives) * negative_fraction / (1.0 - negative_fraction))
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.positives.set_epoch(epoch)
        self.negatives.set_epoch(epoch)
        order = np.random.default_rng((self.seed, epoch, 7)).permutation(len(self.negatives))
        self.negative_order = np.resize(order, self.negative_count)

    def __len__(self) -> int:
        return len(self.positives) + self.negative_count

    def __getitem__(self, index: int) -> dict:
        if index < len(self.positives):
            return self.positives[index]
        return {**self.negatives[int(self.negative_order[index - len(self.positives)])], "index": index}
