"""Lesion-free training slices from chest CT volumes in Hounsfield units (``chest-ct-hu-no-covid``).

The slice set of COVID-19-CT-Seg holds only lesion-bearing slices from the middle of each volume; a
network trained on it alone has never seen a healthy lung, an apex or base, or a slice without lung.
:class:`NegativeVolumeDataset` adds such slices:

- each volume is read, put in radiological orientation and prepared by the very function inference
  uses (:func:`~COVIDLesionSegLib.preprocessing.prepare_volume`: field-of-view crop, HU window, resize,
  min–max, CLAHE), so the network sees HU-derived slices exactly as inference makes them;
- the lesion target is empty; the lung target is the classical lung mask
  (:func:`~COVIDLesionSegLib.classical_lung.classical_lung_mask`), cut and resized like the image;
- slices holding a lung tumour (the folder's ``tumour_masks/``), and one slice on either side, are left
  out: a tumour is an opacity but not COVID-19, so it must not be taught as "no lesion";
- ``exclude_patients`` keeps patients out (the held-out false-positive test patients); ``only_patients``
  keeps only those (lesion-free validation patients).

:class:`MixedSliceDataset` puts them beside the lesion slices at a chosen share of every epoch.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from torch.utils.data import Dataset

from COVIDLesionSegLib.classical_lung import classical_lung_mask
from COVIDLesionSegLib.io import read_image, to_radiological
from COVIDLesionSegLib.preprocessing import PreprocessingConfig, crop_slice, prepare_volume, resize_mask

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


def prepare_negative_case(case: NegativeCase, preprocessing: PreprocessingConfig) -> tuple[np.ndarray, np.ndarray]:
    """One lesion-free volume as the network sees it: ``(uint8 [z, size, size]`` from the inference preprocessing,
    ``bool [z, size, size]`` classical lung mask cut and resized like it), radiologically oriented."""
    image = to_radiological(read_image(case.volume))
    hu = sitk.GetArrayFromImage(image)
    prepared, box = prepare_volume(hu, preprocessing)
    lung = classical_lung_mask(hu, image.GetSpacing())
    return prepared, np.stack([resize_mask(crop_slice(plane, box), preprocessing) for plane in lung])


class NegativeVolumeDataset(SliceDataset):
    """Every tumour-free axial slice of the lesion-free volumes in ``root``: patients in ``exclude_patients`` left
    out; if ``only_patients`` is given, only those.

    Items are those of :class:`~.data.SliceDataset` with an all-zero lesion target.
    """

    def __init__(self, root: str | Path, exclude_patients: Sequence[str] = (), only_patients: Sequence[str] | None = None, **options):
        super().__init__(**options)
        cases = read_negative_cases(root)
        unknown = sorted(set(exclude_patients).union(only_patients or ()) - {case.patient for case in cases})
        if unknown:
            raise ValueError(f"patients {unknown} are not in {Path(root) / 'manifest.csv'}")
        if only_patients is not None:
            cases = [case for case in cases if case.patient in only_patients]
        self.images: list[np.ndarray] = []  # per kept slice: uint8 [size, size]
        self.lungs: list[np.ndarray] = []  # per kept slice: bool [size, size]
        self.slices: list[tuple[str, int]] = []  # (case, z)
        for case in cases:
            if case.patient in exclude_patients:
                continue
            prepared, lung = prepare_negative_case(case, self.preprocessing)
            for z in np.flatnonzero(tumour_free_slices(case, len(prepared))):
                self.images.append(prepared[z])
                self.lungs.append(lung[z])
                self.slices.append((case.case, int(z)))
        self.cases = list(dict.fromkeys(case for case, _ in self.slices))

    def __len__(self) -> int:
        return len(self.slices)

    def load_slice(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lung = self.lungs[index]
        return self.images[index], np.zeros_like(lung), lung

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
