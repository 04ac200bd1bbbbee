"""Quantification a radiologist can put in a report, from the lesion and lung masks of one CT volume.

The measures follow the commercial CT pneumonia analysis radiologists know (Siemens "CT Pneumonia
Analysis", Chaganti et al., Radiology: AI 2020: lung and opacity volumes, percentage of opacity for both
lungs and each side, percentage of high opacity, mean/SD HU) and the MosMedData severity scale CT-0…CT-4.

Everything is defined once, here, as data that the CLI's ``summary.csv`` columns, its ``summary.json``
sidecar and help text, the visual report, the README and the Slicer table quote:

- :data:`MEASURES` — each measure's name (= :class:`LesionStatistics` field = CSV column), label, unit
  and definition, in report order;
- :data:`SEVERITY_DEFINITIONS` / :data:`SEVERITY_LIMITS` — the MosMed categories from percent_opacity;
- :data:`NOT_AVAILABLE_RULE` — when a measure is ``None`` (an empty CSV cell, "n/a" in the report);
- :data:`LEFT_RIGHT_RULE` — how lung voxels are assigned to the patient's right and left, in physical
  LPS coordinates rather than image columns, so flipped, permuted and oblique volumes come out right.

Masks are arrays ``[z, y, x]`` with ``z`` the axial-slice axis (the radiological orientation the
:class:`~COVIDLesionSegLib.predictor.Predictor` works in); their geometry is a :class:`VoxelGrid`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import SimpleITK as sitk

from .components import ChunkedComponents

DEFAULT_HIGH_OPACITY_THRESHOLD_HU = -200.0
SEVERITY_LIMITS = (("CT-1", 25.0), ("CT-2", 50.0), ("CT-3", 75.0), ("CT-4", math.inf))  # category: PO below the limit
SEVERITY_DEFINITIONS = {
    "CT-0": "no lesion (percent_opacity = 0)",
    "CT-1": "0 < percent_opacity < 25 %",
    "CT-2": "25 % ≤ percent_opacity < 50 %",
    "CT-3": "50 % ≤ percent_opacity < 75 %",
    "CT-4": "percent_opacity ≥ 75 %",
}
NOT_AVAILABLE_RULE = (
    "A measure is not available (None; an empty cell in summary.csv, n/a in the report) when: it is a percentage and its "
    "lung is empty or absent (a model without a lung channel); it is the severity and percent_opacity is not available; "
    "it is an HU measure and the input is not in Hounsfield units (e.g. 8-bit windowed slices: such numbers are never "
    "computed on wrong units); it is the lesion's mean/SD HU and there is no lesion. The input is in HU when its minimum "
    "is below the checkpoint's hu_detect_below (-500), the test that also selects the intensity window "
    "(COVIDLesionSegLib.preprocessing.is_hounsfield)."
)
LEFT_RIGHT_RULE = (
    "Sides are the patient's, in physical LPS coordinates (patient right is -x), not image columns. When the lung mask "
    "has two lung-sized connected pieces (face connectivity; the smaller holds at least a tenth of the larger's voxels), "
    "each piece is one lung and goes whole to the side of its centroid (the lower x is the right lung); smaller pieces go "
    "by their x against the midline halfway between the two centroids. When the lungs touch (one piece), a voxel is on "
    "the right when its x is below the lung mask's centroid. Lesion voxels take the side of where they lie. Both lungs "
    "are assumed present: with one lung missing, the remaining lung is split at its centroid."
)
MIN_SECOND_LUNG_FRACTION = 0.1  # a second connected piece is a lung when it holds ≥ 1/10 of the largest piece's voxels


@dataclass(frozen=True)
class Measure:
    """One reported measure: ``name`` is the :class:`LesionStatistics` field and the CSV column."""

    name: str
    label: str  # short human label for tables and the report
    unit: str  # "" for categories and counts without a unit
    definition: str


MEASURES = (
    Measure("severity", "Severity (MosMed)", "", "MosMed category from percent_opacity: "
            + "; ".join(f"{category} {meaning}" for category, meaning in SEVERITY_DEFINITIONS.items())),
    Measure("percent_opacity", "Opacity, both lungs (PO)", "%", "PO = 100 × lesion_ml / lung_ml, both lungs"),
    Measure("lesion_ml", "Lesion volume", "mL", "lesion voxels × voxel volume"),
    Measure("lung_ml", "Lung volume", "mL", "lung voxels × voxel volume; the lung mask includes its lesions"),
    Measure("right_percent_opacity", "Opacity, right lung", "%", "100 × right_lesion_ml / right_lung_ml"),
    Measure("right_lesion_ml", "Lesion volume, right", "mL", "lesion in the patient's right lung"),
    Measure("right_lung_ml", "Lung volume, right", "mL", "the patient's right lung, by the left/right rule"),
    Measure("left_percent_opacity", "Opacity, left lung", "%", "100 × left_lesion_ml / left_lung_ml"),
    Measure("left_lesion_ml", "Lesion volume, left", "mL", "lesion in the patient's left lung"),
    Measure("left_lung_ml", "Lung volume, left", "mL", "the patient's left lung, by the left/right rule"),
    Measure("lesion_slices", "Slices with lesion", "", "axial slices holding at least one lesion voxel"),
    Measure("input_is_hu", "Input in HU", "", "whether the CT was in Hounsfield units (its minimum is below the "
            "checkpoint's hu_detect_below, −500); the HU measures exist only then"),
    Measure("high_opacity_ml", "High-opacity volume", "mL", "lesion voxels at or above the high-opacity threshold "
            f"(default {DEFAULT_HIGH_OPACITY_THRESHOLD_HU:g} HU)"),
    Measure("percent_high_opacity", "High opacity (PHO)", "%", "PHO = 100 × high_opacity_ml / lung_ml"),
    Measure("lung_mean_hu", "Lung mean", "HU", "mean CT value of the lung voxels"),
    Measure("lung_sd_hu", "Lung SD", "HU", "standard deviation (population) of the lung voxels' CT values"),
    Measure("lesion_mean_hu", "Lesion mean", "HU", "mean CT value of the lesion voxels"),
    Measure("lesion_sd_hu", "Lesion SD", "HU", "standard deviation (population) of the lesion voxels' CT values"),
)
MEASURES_BY_NAME = {measure.name: measure for measure in MEASURES}
DECIMALS_BY_UNIT = {"mL": 3, "%": 2, "HU": 1}  # digits after the point when written as text (CSV, report, Slicer table)


@dataclass(frozen=True)
class VoxelGrid:
    """Where the voxels of a ``[z, y, x]`` array lie: spacing (x, y, z) mm, origin (LPS mm), direction (row-major 3×3)."""

    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    @classmethod
    def of_image(cls, image: sitk.Image) -> VoxelGrid:
        return cls(tuple(image.GetSpacing()), tuple(image.GetOrigin()), tuple(image.GetDirection()))

    @property
    def voxel_ml(self) -> float:
        """|det(direction)| × spacing product: exact for sheared (non-orthogonal) grids too."""
        direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        return abs(float(np.linalg.det(direction))) * float(np.prod(self.spacing_mm)) / 1000.0

    def image_of(self, array: np.ndarray) -> sitk.Image:
        """``array`` as a ``sitk.Image`` on this grid."""
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(self.spacing_mm)
        image.SetOrigin(self.origin_mm)
        image.SetDirection(self.direction)
        return image

    def x_mm_of_slice(self, shape_yx: tuple[int, int], z: int) -> np.ndarray:
        """LPS x (mm) of every voxel centre of axial slice ``z``, shape ``shape_yx``."""
        steps = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)[0] * np.asarray(self.spacing_mm)
        rows, columns = np.arange(shape_yx[0]), np.arange(shape_yx[1])
        return self.origin_mm[0] + steps[2] * z + steps[1] * rows[:, None] + steps[0] * columns[None, :]


@dataclass(frozen=True)
class LesionStatistics:
    """The measures of one volume, in the order and with the meaning of :data:`MEASURES`; None = not available."""

    severity: str | None
    percent_opacity: float | None
    lesion_ml: float
    lung_ml: float | None
    right_percent_opacity: float | None
    right_lesion_ml: float | None
    right_lung_ml: float | None
    left_percent_opacity: float | None
    left_lesion_ml: float | None
    left_lung_ml: float | None
    lesion_slices: int
    input_is_hu: bool
    high_opacity_ml: float | None
    percent_high_opacity: float | None
    lung_mean_hu: float | None
    lung_sd_hu: float | None
    lesion_mean_hu: float | None
    lesion_sd_hu: float | None

    def to_dict(self) -> dict:
        return asdict(self)

    def formatted(self) -> dict[str, str]:
        """``{measure: text}`` as written in ``summary.csv`` and the report: '' where not available."""
        return {name: format_measure(name, value) for name, value in self.to_dict().items()}


def format_measure(name: str, value) -> str:
    """One measure as text: '' for None, yes/no for booleans, floats with :data:`DECIMALS_BY_UNIT` of their unit."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{DECIMALS_BY_UNIT[MEASURES_BY_NAME[name].unit]}f}"
    return str(value)


def severity_category(percent_opacity: float | None) -> str | None:
    """MosMed category CT-0…CT-4 of a percent_opacity (see :data:`SEVERITY_DEFINITIONS`); None for None."""
    if percent_opacity is None:
        return None
    if percent_opacity <= 0:
        return "CT-0"
    return next(category for category, limit in SEVERITY_LIMITS if percent_opacity < limit)


def percent(part_ml: float | None, whole_ml: float | None) -> float | None:
    return 100.0 * part_ml / whole_ml if part_ml is not None and whole_ml else None


def lesion_statistics(
    lesion: np.ndarray,
    grid: VoxelGrid,
    lung: np.ndarray | None = None,
    ct_hu: np.ndarray | None = None,
    high_opacity_threshold_hu: float = DEFAULT_HIGH_OPACITY_THRESHOLD_HU,
) -> LesionStatistics:
    """Measure ``lesion[z, y, x]`` (nonzero = lesion) on ``grid``.

    ``lung`` (same shape, including the lesions) enables the volumes and percentages of the lung and its
    sides; ``ct_hu`` (same shape) is the CT in Hounsfield units — pass None when the input is not in HU,
    and the HU measures are then not available. Definitions: :data:`MEASURES` and the rules beside it.
    """
    lesion = as_bool(lesion)
    for name, other in (("lung mask", lung), ("CT", ct_hu)):
        if other is not None and np.shape(other) != lesion.shape:
            raise ValueError(f"{name} shape {np.shape(other)} differs from lesion mask shape {lesion.shape}")
    voxel_ml = grid.voxel_ml
    lesion_ml = float(np.count_nonzero(lesion)) * voxel_ml
    lesion_slices = sum(1 for plane in lesion if plane.any())

    lung_ml = None
    sides: dict[str, float | None] = dict.fromkeys(f"{side}_{measure}" for side in ("right", "left")
                                                   for measure in ("percent_opacity", "lesion_ml", "lung_ml"))
    if lung is not None:
        lung = as_bool(lung)
        lung_ml = float(np.count_nonzero(lung)) * voxel_ml
        counts = {"right_lung": 0, "right_lesion": 0, "left_lung": 0, "left_lesion": 0}
        sides_of_slice = SideRule(lung, grid) if lung_ml else None
        for z in range(lung.shape[0]):  # slice by slice: no whole-volume side masks
            right = sides_of_slice.right_of_slice(z) if sides_of_slice else np.zeros(lung.shape[1:], dtype=bool)
            for side, on_side in (("right", right), ("left", ~right)):
                counts[f"{side}_lung"] += int(np.count_nonzero(lung[z] & on_side))
                counts[f"{side}_lesion"] += int(np.count_nonzero(lesion[z] & on_side))
        del sides_of_slice  # its 32-bit labels of the lung's slices are not needed for the HU measures below
        for side in ("right", "left"):
            side_lung_ml, side_lesion_ml = counts[f"{side}_lung"] * voxel_ml, counts[f"{side}_lesion"] * voxel_ml
            sides.update({f"{side}_percent_opacity": percent(side_lesion_ml, side_lung_ml),
                          f"{side}_lesion_ml": side_lesion_ml, f"{side}_lung_ml": side_lung_ml})

    hu: dict[str, float | None] = dict.fromkeys(("high_opacity_ml", "percent_high_opacity", "lung_mean_hu", "lung_sd_hu",
                                                 "lesion_mean_hu", "lesion_sd_hu"))
    if ct_hu is not None:
        ct_hu = np.asarray(ct_hu)
        high_opacity = sum(int(np.count_nonzero(plane[inside] >= high_opacity_threshold_hu)) for plane, inside in zip(ct_hu, lesion))
        hu["high_opacity_ml"] = float(high_opacity) * voxel_ml
        hu["percent_high_opacity"] = percent(hu["high_opacity_ml"], lung_ml)
        hu["lesion_mean_hu"], hu["lesion_sd_hu"] = masked_mean_and_sd(ct_hu, lesion)
        if lung is not None:
            hu["lung_mean_hu"], hu["lung_sd_hu"] = masked_mean_and_sd(ct_hu, lung)

    percent_opacity = percent(lesion_ml, lung_ml)
    return LesionStatistics(
        severity=severity_category(percent_opacity),
        percent_opacity=percent_opacity,
        lesion_ml=lesion_ml,
        lung_ml=lung_ml,
        **sides,
        lesion_slices=lesion_slices,
        input_is_hu=ct_hu is not None,
        **hu,
    )


def masked_mean_and_sd(values: np.ndarray, mask: np.ndarray) -> tuple[float | None, float | None]:
    """Mean and population standard deviation (float64) of ``values[z, y, x]`` where ``mask`` (same shape, bool),
    taken slice by slice: no copy of the selected values, which can be most of a volume; (None, None) for none."""
    count, total = 0, 0.0
    for plane, inside in zip(values, mask):
        selected = plane[inside]
        count, total = count + selected.size, total + float(selected.sum(dtype=np.float64))
    if count == 0:
        return None, None
    mean = total / count
    squares = sum(float(np.square(plane[inside] - mean).sum()) for plane, inside in zip(values, mask))
    return mean, math.sqrt(squares / count)


def as_bool(mask: np.ndarray) -> np.ndarray:
    """``mask != 0`` as a bool array: a view of a uint8 0/1 mask (no copy), else a new array."""
    mask = np.asarray(mask)
    if mask.dtype == np.bool_:
        return mask
    if mask.dtype == np.uint8 and mask.flags.c_contiguous and (mask.size == 0 or mask.max() <= 1):
        return mask.view(np.bool_)
    return mask > 0


class SideRule:
    """The patient's right of a non-empty lung mask ``lung[z, y, x]`` by :data:`LEFT_RIGHT_RULE`, slice by slice.

    The lung's face-connected pieces come from :class:`~.components.ChunkedComponents` (labelled a chunk of slices
    at a time, in bounded memory), ranked as ``sitk.RelabelComponent`` ranks them on the whole grid; their centroids
    from its exact index sums. :meth:`right_of_slice`, asked for the slices in order, labels each chunk once more."""

    def __init__(self, lung: np.ndarray, grid: VoxelGrid, chunk_slices: int = 0):
        self.grid, self.shape = grid, lung.shape
        self.components = ChunkedComponents(lung, fully_connected=False, chunk_slices=chunk_slices)
        sums = self.components.sums
        ranked = sorted(self.components.roots, key=lambda root: (-sums[root, 0], root))
        self.two_lungs = len(ranked) >= 2 and sums[ranked[1], 0] >= MIN_SECOND_LUNG_FRACTION * sums[ranked[0], 0]
        self.side_of_root = np.zeros(len(sums), dtype=np.uint8)  # 1: the right lung, 2: the left lung, 0: by x alone
        if self.two_lungs:
            first_x, second_x = self.centroid_x(sums[ranked[0]]), self.centroid_x(sums[ranked[1]])
            self.midline = (first_x + second_x) / 2
            right, left = (ranked[0], ranked[1]) if first_x <= second_x else (ranked[1], ranked[0])
            self.side_of_root[right], self.side_of_root[left] = 1, 2
        else:
            self.midline = self.centroid_x(sums[self.components.roots].sum(axis=0))
        self.chunk_sides = iter(self.components.component_values(self.side_of_root)) if self.two_lungs else iter(())
        self.chunk: tuple[int, np.ndarray] | None = None  # (start, sides) of the chunk right_of_slice is in

    def centroid_x(self, sums: np.ndarray) -> float:
        """LPS x (mm) of the centroid of voxels whose count and x, y, z index sums are ``sums``."""
        steps = np.asarray(self.grid.direction, dtype=np.float64).reshape(3, 3)[0] * np.asarray(self.grid.spacing_mm)
        x, y, z = sums[1:] / sums[0]
        return self.grid.origin_mm[0] + steps[0] * x + steps[1] * y + steps[2] * z

    def right_of_slice(self, z: int) -> np.ndarray:
        """Boolean ``[y, x]``: True on the patient's right in slice ``z``; slices asked for in increasing order."""
        right = self.grid.x_mm_of_slice(self.shape[1:], z) < self.midline
        z_range, rows, columns = self.components.box
        if self.two_lungs and z_range.start <= z < z_range.stop:  # each lung whole to its side, even across the midline
            while self.chunk is None or z >= self.chunk[0] + len(self.chunk[1]):
                self.chunk = next(self.chunk_sides)
            start, sides = self.chunk
            if z < start:
                raise ValueError(f"SideRule.right_of_slice: slice {z} asked for after slice {start}")
            side = sides[z - start]
            box = right[rows, columns]
            right[rows, columns] = np.where(side == 0, box, side == 1)
        return right


def right_side(lung: np.ndarray, grid: VoxelGrid) -> np.ndarray:
    """Boolean ``[z, y, x]``: True on the patient's right of a non-empty lung mask, by :data:`LEFT_RIGHT_RULE`."""
    lung = as_bool(lung)
    rule = SideRule(lung, grid)
    return np.stack([rule.right_of_slice(z) for z in range(lung.shape[0])])
