"""Visual report of one case: the PNG a reader glances at before opening the case.

Left, a montage of up to ``max_slices`` axial slices evenly spaced among those holding lesion (among the
lung slices when there is no lesion, among all slices when there is no lung either), displayed
radiologically (patient right on the image left, marked R and L) with the lesion and lung contours in the
segments' colours. Right, the measures table: every measure of :data:`~COVIDLesionSegLib.statistics.MEASURES`
with the same text as ``summary.csv`` ("n/a" where not available), then notes such as the model and the
high-opacity threshold. The same text is stored in the PNG as the text chunk ``COVIDLesionSeg`` (JSON:
``title``, ``measures``, ``notes``), so a report can be checked against the CSV.

Arrays are ``[z, y, x]`` in radiological orientation (as :func:`COVIDLesionSegLib.io.to_radiological`
gives) on the :class:`~COVIDLesionSegLib.statistics.VoxelGrid` ``grid``. matplotlib is imported only when
a report is drawn, onto its own Agg canvas (no pyplot, no global backend change).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .checkpoints import atomic_output
from .segments import SEGMENTS
from .statistics import MEASURES, LesionStatistics, VoxelGrid

HU_DISPLAY_WINDOW = (-1350.0, 150.0)  # lung window: level −600 HU, width 1500 HU
PNG_TEXT_KEY = "COVIDLesionSeg"
NOT_AVAILABLE = "n/a"


def montage_slices(lesion: np.ndarray, lung: np.ndarray | None, max_slices: int) -> list[int]:
    """Up to ``max_slices`` axial slice indices, evenly spaced among the slices with lesion (else lung, else all)."""
    for mask in (lesion, lung):
        candidates = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1)) if mask is not None else np.array([])
        if candidates.size:
            break
    else:
        candidates = np.arange(lesion.shape[0])
    picks = np.linspace(0, candidates.size - 1, min(max_slices, candidates.size)).round().astype(int)
    return [int(candidates[pick]) for pick in picks]


def measure_rows(statistics: LesionStatistics) -> list[tuple[str, str, str]]:
    """``(label, value, unit)`` per measure, values as in ``summary.csv`` with "n/a" for not available."""
    text = statistics.formatted()
    return [(measure.label, text[measure.name] or NOT_AVAILABLE, measure.unit) for measure in MEASURES]


def write_report(
    path: str | Path,
    ct: np.ndarray,
    masks: dict[str, np.ndarray],
    grid: VoxelGrid,
    statistics: LesionStatistics,
    title: str,
    notes: Sequence[str] = (),
    max_slices: int = 12,
) -> Path:
    """Draw the report of one case (``masks``: ``"lesion"`` and optionally ``"lung"``) to the PNG ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    lesion, lung = np.asarray(masks["lesion"]) > 0, masks.get("lung")
    lung = None if lung is None else np.asarray(lung) > 0
    slices = montage_slices(lesion, lung, max_slices)
    window = HU_DISPLAY_WINDOW if statistics.input_is_hu else (float(np.min(ct)), float(np.max(ct)))
    aspect = grid.spacing_mm[1] / grid.spacing_mm[0]  # row height / column width, so anatomy is not stretched

    figure = Figure(figsize=(16, 9), dpi=100, facecolor="white")
    FigureCanvasAgg(figure)
    montage_figure, table_figure = figure.subfigures(1, 2, width_ratios=[5, 3])
    columns = math.ceil(math.sqrt(len(slices)))
    axes = np.atleast_1d(montage_figure.subplots(math.ceil(len(slices) / columns), columns)).ravel()
    montage_figure.subplots_adjust(left=0.01, right=0.99, top=0.92, bottom=0.06, wspace=0.04, hspace=0.12)
    for axis in axes:
        axis.set_axis_off()
    for axis, z in zip(axes, slices):
        axis.imshow(ct[z], cmap="gray", vmin=window[0], vmax=window[1], aspect=aspect, interpolation="nearest")
        for channel, mask in (("lung", lung), ("lesion", lesion)):
            if mask is not None and mask[z].any():
                axis.contour(mask[z].astype(np.float32), levels=[0.5], colors=[SEGMENTS[channel].color], linewidths=1.0)
        axis.set_title(f"slice {z + 1}/{ct.shape[0]}", fontsize=9)
        for x, side in ((0.02, "R"), (0.98, "L")):  # radiological display: patient right on the image left
            axis.text(x, 0.5, side, transform=axis.transAxes, color="yellow", fontsize=9, ha="center", va="center")
    montage_figure.suptitle(title, fontsize=13)
    contours = [Line2D([], [], color=SEGMENTS[channel].color, label=SEGMENTS[channel].name) for channel in ("lesion", "lung")]
    montage_figure.legend(handles=contours, loc="lower center", ncol=2, frameon=False)

    rows = measure_rows(statistics)
    table_axis = table_figure.subplots()
    table_axis.set_axis_off()
    table = table_axis.table(cellText=[list(row) for row in rows], colLabels=["measure", "value", "unit"],
                             colWidths=[0.55, 0.25, 0.12], cellLoc="left", loc="upper center")
    table.auto_set_font_size(False)
    table.set_fontsize(10)
    table.scale(1.0, 1.35)
    table_axis.text(0.0, 0.02, "\n".join(notes), transform=table_axis.transAxes, fontsize=9, va="bottom", wrap=True)

    text = json.dumps({"title": title, "measures": statistics.formatted(), "notes": list(notes)})
    path = Path(path)
    with atomic_output(path) as temporary:
        figure.savefig(temporary, format="png", metadata={PNG_TEXT_KEY: text})
    return path
