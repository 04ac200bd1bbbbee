"""A classical lung mask for CT in Hounsfield units — no network.

Used to label the lung channel of the lesion-free training volumes (which come without lung masks) and,
at inference on HU input, as an optional prior (``GuardRails.hu_lung_prior``).

:func:`classical_lung_mask` on ``hu[z, y, x]`` (LPS-aligned array, as ``io.to_radiological`` gives):

1. **Air** is HU < −400.
2. **Outside air** — each slice's air components that touch the image border (room air, the padding
   outside a circular field of view, air under the table) — is removed.
3. The remaining air is split into **3D connected components**. A component is lung when it holds at
   least ``MIN_LUNG_ML`` and less than ``MAX_GAS_FRACTION`` of its voxels are below −950 HU: lung
   parenchyma mixes air with tissue (about −850 HU), whereas bowel and stomach gas is nearly pure air.
4. **Airways**: on each slice, components of the lung mask smaller than ``MAX_AIRWAY_AREA_MM2`` whose
   mean is below ``AIRWAY_MEAN_HU`` (the trachea and main bronchi, pure air in a wall) are removed.
5. **Holes** of each slice (vessels, nodules, consolidation enclosed by lung) are filled.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import SimpleITK as sitk

AIR_BELOW_HU = -400.0
PURE_AIR_BELOW_HU = -950.0
MIN_LUNG_ML = 20.0
MAX_GAS_FRACTION = 0.35
MAX_AIRWAY_AREA_MM2 = 1000.0
AIRWAY_MEAN_HU = -930.0


def classical_lung_mask(hu: np.ndarray, spacing_mm: Sequence[float]) -> np.ndarray:
    """Lung mask ``bool [z, y, x]`` of ``hu[z, y, x]`` (Hounsfield units); ``spacing_mm`` is (x, y, z)."""
    hu = np.asarray(hu)
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    pixel_mm2 = float(spacing_mm[0]) * float(spacing_mm[1])
    inside_air = np.stack([without_border_components(plane) for plane in hu < AIR_BELOW_HU])
    components = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(inside_air.astype(np.uint8))))
    labels = components.ravel()
    count = int(labels.max())
    sizes = np.bincount(labels, minlength=count + 1)
    pure_air = np.bincount(labels, weights=(hu < PURE_AIR_BELOW_HU).ravel(), minlength=count + 1)
    lung_labels = [
        label
        for label in range(1, count + 1)
        if sizes[label] * voxel_ml >= MIN_LUNG_ML and pure_air[label] < MAX_GAS_FRACTION * sizes[label]
    ]
    lung = np.isin(components, lung_labels)
    for z, plane in enumerate(lung):
        lung[z] = fill_holes(without_airways(plane, hu[z], pixel_mm2))
    return lung


def without_border_components(mask: np.ndarray) -> np.ndarray:
    """``mask[H, W]`` bool without its 4-connected components that touch the image border."""
    count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=4)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return (labels > 0) & ~np.isin(labels, border)


def without_airways(mask: np.ndarray, hu: np.ndarray, pixel_mm2: float) -> np.ndarray:
    """``mask[H, W]`` without small components of nearly pure air (trachea, main bronchi)."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if count < 2:
        return mask
    means = np.bincount(labels.ravel(), weights=hu.ravel().astype(np.float64), minlength=count) / np.maximum(stats[:, cv2.CC_STAT_AREA], 1)
    small = stats[:, cv2.CC_STAT_AREA] * pixel_mm2 < MAX_AIRWAY_AREA_MM2
    airways = [label for label in range(1, count) if small[label] and means[label] < AIRWAY_MEAN_HU]
    return mask & ~np.isin(labels, airways)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask[H, W]`` with every background region that does not touch the border filled."""
    return mask | without_border_components(~mask)
