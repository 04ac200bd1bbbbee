"""Lesion measurements from binary masks on the image grid.

Definitions (also in the README and the Slicer help):
- lesion volume (mL) = lesion voxel count × voxel volume (mm³) / 1000;
- lesion slices = number of axial slices (along the array's first axis) holding at least one lesion voxel;
- lung volume (mL) = lung voxel count × voxel volume / 1000, where the lung mask includes its lesions;
- lesion % of lung = 100 × lesion volume / lung volume; not available without a lung mask or when the
  lung mask is empty.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class LesionStatistics:
    lesion_ml: float
    lesion_slices: int
    lung_ml: float | None = None
    lesion_percent_of_lung: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def lesion_statistics(lesion: np.ndarray, spacing_mm: tuple[float, float, float], lung: np.ndarray | None = None) -> LesionStatistics:
    """Measure ``lesion[z, y, x]`` (nonzero = lesion) with voxel ``spacing_mm`` (x, y, z); ``lung`` optional, same shape."""
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    lesion = np.asarray(lesion) > 0
    lesion_ml = float(lesion.sum()) * voxel_ml
    lesion_slices = int(np.count_nonzero(lesion.reshape(lesion.shape[0], -1).any(axis=1)))
    if lung is None:
        return LesionStatistics(lesion_ml, lesion_slices)
    lung = np.asarray(lung) > 0
    if lung.shape != lesion.shape:
        raise ValueError(f"lung mask shape {lung.shape} differs from lesion mask shape {lesion.shape}")
    lung_ml = float(lung.sum()) * voxel_ml
    percent = 100.0 * lesion_ml / lung_ml if lung_ml > 0 else None
    return LesionStatistics(lesion_ml, lesion_slices, lung_ml, percent)
