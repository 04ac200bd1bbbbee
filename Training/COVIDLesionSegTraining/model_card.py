"""Measure a shipped model and write its model card (``Resources/Models/MODEL_CARD.md`` + ``<name>.card.json``).

    covidlesionseg-model-card --model resattunet-lesion-lung-v1 --data ../shared/data/covid19-ct-seg-20cases-png256 \
        --holdout coronacases_004 radiopaedia_27_86410_0 --po-validation runs/po-validation/po_validation.md \
        --crossval Training/results/crossval-shipped-recipe/crossval.json

Every number in the card comes from this command:

1. **Held-out slices** (the patients the model never saw): lesion and lung Dice pooled over all pixels and
   per volume, on the PNG slices as the model was trained on them (``preprocessed=True``). Every
   ``GOLDEN_SLICE_STEP``-th slice of these volumes is also scored alone: that is the golden figure the
   test suite re-checks.
2. **Shifted inputs** — the same held-out volumes through the full inference path (``predict_masks`` as the
   CLI runs it), as they are (8-bit), rendered to Hounsfield units (the lung-window mapping undone, −3024 HU
   outside a circular field of view), and with a wider field of view (zoomed out to 70 %).
3. **A chest CT without COVID-19** (``CTChest4.nrrd`` shipped with slicerio, raw HU): predicted lesion volume
   and the slices it falls on — every voxel is a false positive.
4. **Speed**: CPU seconds per slice of the full inference path.

The PO agreement (``--po-validation``, written by ``covidlesionseg-validate-po``) and the patient-level
cross-validation of the recipe (``--crossval``, written by ``covidlesionseg-crossval``) are measured by their
own commands; the card quotes their files and names the commands.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from datetime import date
from pathlib import Path

import cv2
import numpy as np
import SimpleITK as sitk
import torch

from COVIDLesionSegLib import io
from COVIDLesionSegLib.checkpoints import atomic_output, locate_model, read_checkpoint_metadata
from COVIDLesionSegLib.predictor import Predictor, SegmentationResult
from COVIDLesionSegLib.preprocessing import PreprocessingConfig, body_crop_box, crop_slice
from COVIDLesionSegLib.resources import default_model_name, load_registry, resources_dir
from COVIDLesionSegLib.statistics import VoxelGrid

from .config import TrainConfig
from .data import ORIENTATIONS
from .negatives import NegativeCase, read_negative_cases, tumour_free_slices
from .sample import NOMINAL_SPACING_MM, model_orientation, stack_volume

GOLDEN_SLICE_STEP = 2
RADIOPAEDIA_LUNG_WINDOW_HU = (-1250.0, 250.0)  # how the Radiopaedia volumes were exported to 0–255
ANTI_ALIAS_SIGMA = 0.4  # of the new pixel spacing: the blur of a coarser reconstruction before it is sampled
COARSE_SIDE = 128  # the card's coarse rendering of lesion-free volumes: CTChest4.nrrd's in-plane pixels


def dice(prediction: np.ndarray, reference: np.ndarray) -> float | None:
    """2|P∩R| / (|P|+|R|); None when both are empty."""
    total = int(prediction.sum()) + int(reference.sum())
    return None if total == 0 else 2 * int(np.logical_and(prediction, reference).sum()) / total


def held_out_scores(
    predictor: Predictor, data_dir: Path, volume_ids: Sequence[str], step: int = 1, orientation: str | None = None
) -> dict:
    """Lesion and lung Dice on every ``step``-th held-out PNG slice: pooled and per volume.

    ``orientation`` of the stacked slices (``data.ORIENTATIONS``); None: the one the model trained in."""
    orientation = orientation or model_orientation(predictor.checkpoint)
    pooled = {"lesion": [[], []], "lung": [[], []]}
    per_volume = {}
    for volume_id in volume_ids:
        ct, labels = stack_volume(data_dir, volume_id, orientation)
        ct, labels = ct[::step], labels[::step]
        masks = predictor.predict_masks(ct, preprocessed=True)
        references = {"lesion": labels == 1, "lung": labels > 0}
        per_volume[volume_id] = {"slices": len(ct)}
        for channel, reference in references.items():
            per_volume[volume_id][f"{channel}_dice"] = dice(masks[channel] > 0, reference)
            pooled[channel][0].append(masks[channel].ravel() > 0)
            pooled[channel][1].append(reference.ravel())
    result = {f"{channel}_dice": dice(np.concatenate(pred), np.concatenate(ref)) for channel, (pred, ref) in pooled.items()}
    return {**result, "slices": sum(v["slices"] for v in per_volume.values()), "per_volume": per_volume}


def as_hounsfield(ct_u8: np.ndarray) -> np.ndarray:
    """8-bit lung-window slices → HU-like values, −3024 HU outside a circular field of view (as many scanners pad)."""
    low, high = RADIOPAEDIA_LUNG_WINDOW_HU
    hu = ct_u8.astype(np.float32) / 255 * (high - low) + low
    size = ct_u8.shape[-1]
    y, x = np.mgrid[: ct_u8.shape[-2], :size]
    hu[:, (y - ct_u8.shape[-2] / 2) ** 2 + (x - size / 2) ** 2 > (0.49 * size) ** 2] = -3024
    return hu


def zoomed_out(array: np.ndarray, fill: float, scale: float = 0.7) -> np.ndarray:
    """Each slice shrunk to ``scale`` and centred on a ``fill`` background: a wider field of view."""
    height, width = array.shape[-2:]
    small_h, small_w = round(height * scale), round(width * scale)
    top, left = (height - small_h) // 2, (width - small_w) // 2
    out = np.full(array.shape, fill, dtype=array.dtype)
    interpolation = cv2.INTER_NEAREST if array.dtype == bool else cv2.INTER_AREA
    for index, plane in enumerate(array):
        resized = cv2.resize(plane.astype(np.float32), (small_w, small_h), interpolation=interpolation)
        out[index, top : top + small_h, left : left + small_w] = resized.astype(array.dtype) if array.dtype != bool else resized > 0.5
    return out


def zoomed_in(ct: np.ndarray, lesion: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each slice cut to the volume's body bounding box (no margin, squared) and resized back: a tight crop,
    as many published slice sets are."""
    box = body_crop_box(ct, PreprocessingConfig(field_of_view="body", body_margin=0.0))
    height, width = ct.shape[-2:]
    image = np.stack([cv2.resize(crop_slice(plane, box, 0), (width, height), interpolation=cv2.INTER_AREA) for plane in ct])
    labels = np.stack(
        [cv2.resize(crop_slice(plane, box, 0).astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) for plane in lesion]
    )
    return image, labels > 0


SHIFTED_RENDERINGS = (
    "8-bit as shipped (recipe re-applied)",
    "HU, −3024 outside the FOV",
    "field of view ×1/0.7 (zoomed out)",
    "cropped tight to the body (zoomed in)",
)


def shifted_input_scores(predictor: Predictor, data_dir: Path, volume_ids: Sequence[str]) -> dict:
    """Pooled lesion Dice of the full inference path on four renderings of the held-out volumes (stacked in the
    model's training orientation), guard rails applied on the sample's nominal voxel grid."""
    variants = {name: [] for name in SHIFTED_RENDERINGS}
    grid = VoxelGrid(NOMINAL_SPACING_MM)
    for volume_id in volume_ids:
        ct, labels = stack_volume(data_dir, volume_id, model_orientation(predictor.checkpoint))
        lesion = labels == 1
        rendered = ((ct, lesion), (as_hounsfield(ct), lesion), (zoomed_out(ct, 0), zoomed_out(lesion, False)), zoomed_in(ct, lesion))
        renderings = dict(zip(SHIFTED_RENDERINGS, rendered, strict=True))
        for name, (volume, reference) in renderings.items():
            variants[name].append((predictor.predict_masks(volume, grid=grid)["lesion"].ravel() > 0, reference.ravel()))
    return {name: dice(np.concatenate([p for p, _ in pairs]), np.concatenate([r for _, r in pairs])) for name, pairs in variants.items()}


def held_out_negative_cases(negatives_dir: str | Path | None, patients: Sequence[str]) -> list[NegativeCase]:
    """The volumes (cases) of the lesion-free ``patients`` in ``negatives_dir`` (chest-ct-hu-no-covid's layout)."""
    if not patients:
        return []
    if not negatives_dir:
        raise ValueError(f"lesion-free patients {list(patients)} named but no negatives folder")
    cases = read_negative_cases(negatives_dir)
    unknown = sorted(set(patients) - {case.patient for case in cases})
    if unknown:
        raise ValueError(f"patients {unknown} are not in {Path(negatives_dir) / 'manifest.csv'}")
    return [case for case in cases if case.patient in patients]


def ctchest4() -> Path:
    """``CTChest4.nrrd``, slicerio's test chest CT without COVID-19 (raw HU)."""
    from slicerio.data_helper import get_testdata_file

    return Path(get_testdata_file("CTChest4.nrrd"))


def trained_on(config: TrainConfig, patients: Sequence[str]) -> list[str]:
    """Those of the lesion-free ``patients`` that the run of ``config``, or the run it fine-tuned (``init_recipe``),
    trained on: those of its lesion-free folder (``manifest.csv`` read) but its held-out and validation patients
    when it drew lesion-free slices, none otherwise."""
    trained = set()
    if config.negatives_dir:
        in_folder = {case.patient for case in read_negative_cases(config.negatives_dir)}
        trained = (set(patients) & in_folder) - set(config.negative_validation) - set(config.negative_holdout)
    if config.init_recipe:
        trained |= set(trained_on(TrainConfig.from_dict(config.init_recipe), patients))
    return sorted(trained)


def lesion_free_training_patients(train_config: dict) -> list[str] | None:
    """The patients of the recipe's lesion-free folder that it trained on; None without one, or when the folder is absent."""
    folder = train_config.get("negatives_dir")
    if not folder or not (Path(folder) / "manifest.csv").is_file():
        return None
    return trained_on(TrainConfig.from_dict(train_config), [case.patient for case in read_negative_cases(folder)])


def false_lesion_check(predictor: Predictor, image: sitk.Image) -> tuple[dict, SegmentationResult]:
    """The model on ``image``, a CT without COVID-19 (every lesion voxel is false): its size, spacing, false lesion,
    lung, false PO and seconds, with the segmentation they come from."""
    started = time.perf_counter()
    result = predictor.segment_image(image)
    seconds = time.perf_counter() - started
    stats = result.statistics
    return {"size": list(image.GetSize()), "spacing_mm": list(image.GetSpacing()), "false_lesion_ml": stats.lesion_ml,
            "slices_with_false_lesion": stats.lesion_slices, "lung_ml": stats.lung_ml, "false_percent_opacity": stats.percent_opacity,
            "seconds": seconds, "seconds_per_slice": seconds / image.GetSize()[2]}, result


def coarse_rendering(image: sitk.Image, side: int) -> sitk.Image:
    """``image`` (a CT volume, any pixel type) resampled in plane to ``side`` × ``side`` pixels over the same extent;
    slices, origin and direction unchanged; voxel type kept."""
    size, spacing = image.GetSize(), image.GetSpacing()
    new_spacing = (spacing[0] * size[0] / side, spacing[1] * size[1] / side, spacing[2])
    smoothed = sitk.SmoothingRecursiveGaussian(
        sitk.Cast(image, sitk.sitkFloat32), [ANTI_ALIAS_SIGMA * new_spacing[0], ANTI_ALIAS_SIGMA * new_spacing[1], 1e-3 * spacing[2]]
    )
    # the new grid covers the same extent: pixel centres move by half the change of spacing
    first_centre = [(new - old) / (2 * old) for new, old in zip(new_spacing[:2], spacing[:2], strict=True)]  # in old pixels
    origin = image.TransformContinuousIndexToPhysicalPoint([*first_centre, 0.0])
    values = sitk.GetArrayViewFromImage(image)
    lowest, highest = float(values.min()), float(values.max())
    resampled = sitk.Resample(smoothed, (side, side, size[2]), sitk.Transform(), sitk.sitkLinear, origin, new_spacing,
                              image.GetDirection(), lowest, sitk.sitkFloat32)
    # within the input's range (the recursive Gaussian over- and undershoots a little at edges)
    return sitk.Cast(sitk.Round(sitk.Clamp(resampled, lowerBound=lowest, upperBound=highest)), image.GetPixelID())


def slices_per_slab(image: sitk.Image, slab_mm: float | None) -> int:
    """How many of ``image``'s slices :func:`thick_rendering` averages into one ``slab_mm`` slab (1: none; None: no slabs)."""
    return max(1, round(slab_mm / image.GetSpacing()[2])) if slab_mm else 1


def thick_rendering(image: sitk.Image, slab_mm: float) -> sitk.Image:
    """``image`` (a CT volume, any pixel type) with every run of k = :func:`slices_per_slab` slices averaged into one
    slab, as a thicker reconstruction of the same chest shows it (a last, incomplete run is dropped); the in-plane grid,
    direction and voxel type kept, each slab centred between the slices it averages. ``image`` itself where k = 1."""
    spacing = image.GetSpacing()
    per_slab = slices_per_slab(image, slab_mm)
    if per_slab == 1:
        return image
    values = sitk.GetArrayViewFromImage(image)
    slabs = len(values) // per_slab
    if slabs == 0:
        raise ValueError(f"a {slab_mm:g} mm slab needs {per_slab} slices; the volume has {len(values)}")
    averaged = values[: slabs * per_slab].reshape(slabs, per_slab, *values.shape[1:]).mean(axis=1, dtype=np.float64)
    if np.issubdtype(values.dtype, np.integer):
        averaged = np.rint(averaged)
    thick = sitk.GetImageFromArray(averaged.astype(values.dtype))
    thick.SetSpacing((spacing[0], spacing[1], spacing[2] * per_slab))
    thick.SetDirection(image.GetDirection())
    thick.SetOrigin(image.TransformContinuousIndexToPhysicalPoint([0.0, 0.0, (per_slab - 1) / 2]))
    return thick


def coarse_check(
    predictor: Predictor, image: sitk.Image, side: int, slab_mm: float | None = None, tumour_free: np.ndarray | None = None
) -> dict | None:
    """:func:`false_lesion_check` of lesion-free ``image`` re-rendered at ``side``² (:func:`coarse_rendering`; not where it
    has ``side`` pixels or fewer in plane already) and, with ``slab_mm``, in slabs that thick (:func:`thick_rendering`);
    None where neither changes it. ``tumour_free`` (bool per slice of ``image`` in radiological order, as
    :func:`~.negatives.tumour_free_slices`) adds ``false_lesion_ml_off_tumour``: the false lesion on the rendered
    slices made of tumour-free slices only."""
    if tumour_free is not None:
        image = io.to_radiological(image)  # slabs grouped in the order of tumour_free
    rendered = coarse_rendering(image, side) if min(image.GetSize()[:2]) > side else image
    if slab_mm:
        rendered = thick_rendering(rendered, slab_mm)
    if rendered is image:
        return None
    check, result = false_lesion_check(predictor, rendered)
    if tumour_free is not None:
        per_slab, slabs = slices_per_slab(image, slab_mm), rendered.GetSize()[2]
        kept = tumour_free[: per_slab * slabs].reshape(slabs, per_slab).all(axis=1)
        check["false_lesion_ml_off_tumour"] = ml_on_slices(result.masks["lesion"], kept)  # on the oriented image's grid
    return check


def ml_on_slices(mask: sitk.Image, slices: np.ndarray) -> float:
    """Volume in mL of 0/1 ``mask``, radiologically oriented (:func:`~COVIDLesionSegLib.io.to_radiological`), on the
    slices where ``slices`` (bool per slice) is True."""
    return float((sitk.GetArrayViewFromImage(mask)[slices] > 0).sum()) * VoxelGrid.of_image(mask).voxel_ml


def lung_midline_mm(lung: np.ndarray, grid: VoxelGrid) -> float | None:
    """LPS x (mm) halfway between the centroids of the lung's right and left halves (split at its centroid): the
    midline between the two lungs, whether or not they touch. ``lung[z, y, x]`` bool; None when empty."""
    x_mm = np.concatenate([grid.x_mm_of_slice(lung.shape[1:], z)[plane] for z, plane in enumerate(lung)])
    if x_mm.size == 0:
        return None
    right = x_mm < x_mm.mean()  # LPS: the patient's right at smaller x
    return float((x_mm[right].mean() + x_mm[~right].mean()) / 2) if right.any() else float(x_mm.mean())


def mirror_image_density(ct_hu: sitk.Image, lesion: sitk.Image, lung: sitk.Image) -> dict | None:
    """How dense the lung is where the model marks lesion, and at the same place in the other lung.

    ``ct_hu``: a CT in HU; ``lesion``, ``lung``: 0/1 masks on its grid (the lung includes the lesion). Each lesion
    voxel's centre is mirrored across the lungs' midline (:func:`lung_midline_mm`) to the nearest voxel. Returns the
    median HU of the lesion voxels (``lesion_median_hu``), of their mirror images that lie in the lung
    (``mirror_median_hu``; None if none do), and the share of mirror images in the lung (``mirror_in_lung_share``). On a
    healthy chest, a lesion much denser than its mirror image marks lung denser than the same place on the other side.
    None without lesion."""
    lesion_mask = sitk.GetArrayViewFromImage(lesion) > 0
    if not lesion_mask.any():
        return None
    lung_mask = sitk.GetArrayViewFromImage(lung) > 0
    grid = VoxelGrid.of_image(ct_hu)
    index_to_mm = np.asarray(grid.direction, dtype=np.float64).reshape(3, 3) * np.asarray(grid.spacing_mm)  # column per index axis
    indices = np.argwhere(lesion_mask)[:, ::-1]  # x, y, z
    points = np.asarray(grid.origin_mm) + indices @ index_to_mm.T
    points[:, 0] = 2 * lung_midline_mm(lung_mask, grid) - points[:, 0]
    mirrored = np.rint((points - np.asarray(grid.origin_mm)) @ np.linalg.inv(index_to_mm).T).astype(np.int64)[:, ::-1]  # z, y, x
    mirrored = mirrored[np.all((mirrored >= 0) & (mirrored < lesion_mask.shape), axis=1)]
    in_lung = mirrored[lung_mask[tuple(mirrored.T)]]
    values = sitk.GetArrayViewFromImage(ct_hu)
    return {
        "lesion_median_hu": float(np.median(values[lesion_mask])),
        "mirror_median_hu": float(np.median(values[tuple(in_lung.T)])) if len(in_lung) else None,
        "mirror_in_lung_share": len(in_lung) / len(indices),
    }


def healthy_ct_check(
    predictor: Predictor, case: NegativeCase | None = None, coarse_side: int | None = None, slab_mm: float | None = None
) -> dict:
    """:func:`false_lesion_check` on a lesion-free folder's ``case`` (default :func:`ctchest4`), with its file name. Where
    the case has a tumour mask, ``false_lesion_ml_off_tumour`` leaves out the slices that training leaves out
    (:func:`~.negatives.tumour_free_slices`: a tumour is an opacity, if not COVID-19). With ``coarse_side``, ``coarse``
    is :func:`coarse_check` at that side (and ``slab_mm``)."""
    path = case.volume if case else ctchest4()
    image = io.read_image(path)
    check, result = false_lesion_check(predictor, image)
    off_tumour = kept = None
    if case and case.tumour_mask:
        lesion = io.to_radiological(result.masks["lesion"])
        kept = tumour_free_slices(case, lesion.GetSize()[2])
        off_tumour = ml_on_slices(lesion, kept)
    coarse = {"coarse": coarse_check(predictor, image, coarse_side, slab_mm, kept)} if coarse_side else {}
    hu_and_lung = result.statistics.input_is_hu and "lung" in result.masks
    density = mirror_image_density(image, result.masks["lesion"], result.masks["lung"]) if hu_and_lung else None
    return {"file": path.name, **check, "false_lesion_ml_off_tumour": off_tumour, "false_lesion_density": density, **coarse}


def measure(
    model: str, data_dir: Path, holdout: Sequence[str], negatives_dir: Path | None = None, negative_patients: Sequence[str] | None = None
) -> dict:
    predictor = Predictor.from_checkpoint(model, device="cpu")  # the default guard rails, as the CLI
    registry = load_registry()
    file = f"Resources/{registry[model].file}" if model in registry and registry[model].file else model
    config = predictor.checkpoint.train_config
    negatives_dir = negatives_dir or config.get("negatives_dir")
    negative_patients = config.get("negative_holdout", []) if negative_patients is None else negative_patients
    by_orientation = {}
    for orientation in ORIENTATIONS:
        started = time.perf_counter()
        scores = by_orientation[orientation] = held_out_scores(predictor, data_dir, holdout, orientation=orientation)
        if orientation == model_orientation(predictor.checkpoint):
            held_out, slices_per_second = scores, scores["slices"] / (time.perf_counter() - started)
    return {
        "model": predictor.name, "file": file, "sha256": predictor.sha256, "channels": predictor.channels,
        "train_config": predictor.checkpoint.train_config, "training_metrics": predictor.checkpoint.metrics,
        "holdout": list(holdout), "orientation": model_orientation(predictor.checkpoint), "held_out": held_out,
        "held_out_by_orientation": by_orientation, "guard_rails": predictor.guard_rails.to_dict(),
        "golden": {"slice_step": GOLDEN_SLICE_STEP, **held_out_scores(predictor, data_dir, holdout, GOLDEN_SLICE_STEP)},
        "shifted_inputs_lesion_dice": shifted_input_scores(predictor, data_dir, holdout),
        "healthy_ct": healthy_ct_check(predictor, coarse_side=COARSE_SIDE),
        "held_out_lesion_free": [healthy_ct_check(predictor, case, COARSE_SIDE)
                                 for case in held_out_negative_cases(negatives_dir, negative_patients)],
        "coarse_side": COARSE_SIDE,
        "lesion_free_training_patients": lesion_free_training_patients(config),
        "cpu": {"threads": torch.get_num_threads(), "held_out_seconds_per_slice_network_path": 1 / slices_per_second},
        "date": date.today().isoformat(), "torch": torch.__version__,
    }


def density_text(density: dict | None) -> str:
    """``lesion / mirror (share of the mirror image in the lung)`` of :func:`mirror_image_density`; n/a without it."""
    if not density:
        return "n/a"
    share = round(100 * density["mirror_in_lung_share"])
    return f"{density['lesion_median_hu']:.0f} / {number(density['mirror_median_hu'], 0)} ({share} %)"


def patients_text(patients: list[str] | None) -> str:
    return "a few patients" if not patients else f"{len(patients)} patients ({', '.join(patients)})"


def number(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def without_heading(markdown: str) -> str:
    """The text of a markdown fragment without its leading ``#`` heading line (the card has its own)."""
    lines = markdown.strip().splitlines()
    return "\n".join(lines[1:] if lines and lines[0].startswith("#") else lines).strip()


def po_section(po_validation: str, crossval: dict | None, crossval_path: str) -> str:
    """The card's PO section: ``po_validation.md``'s text when given, else the PO that the recipe's cross-validation
    measured on its fold models' test volumes."""
    if po_validation:
        return without_heading(po_validation)
    summary = (crossval or {}).get("overall", {}).get("percent_opacity")
    if not summary:
        return "Not measured in this run (pass --po-validation, or a --crossval that measured it)."
    from .crossval import percent_opacity_paragraph  # crossval imports this module's measurements

    paragraph = percent_opacity_paragraph(summary, crossval["split"]["folds_run"])
    return f"{paragraph} From the cross-validation of this recipe: `{crossval_path.replace('.json', '.md')}`."


# TrainConfig fields that say where and on what a run went, not how it trained; the step budget is reported apart.
NOT_RECIPE_FIELDS = ("data_dir", "output_dir", "device", "precision", "max_steps")


def check_crossval_recipe(crossval: dict, path: str, model_config: dict) -> None:
    """Refuse a ``crossval.json`` whose recipe (its source ``train_config`` with its ``changes``) differs from the
    model's own ``train_config`` in a training setting, naming each difference."""
    recipe = crossval["recipe"]
    tested = TrainConfig.from_dict({**recipe["train_config"], **recipe["changes"]}).to_dict()
    own = TrainConfig.from_dict(model_config).to_dict()
    differing = [key for key in tested if key not in NOT_RECIPE_FIELDS and tested[key] != own[key]]
    if differing:
        mismatches = "; ".join(f"{key}: cross-validated {tested[key]!r}, model {own[key]!r}" for key in differing)
        raise ValueError(f"--crossval {path}: the model card quotes a cross-validation of the model's own recipe; differs in {mismatches}")


def guard_rails_words(guard_rails: dict) -> str:
    """``GuardRails.to_dict()`` as the card and ``crossval.md`` print it: "`name` = value, …"."""
    return ", ".join(f"`{name}` = {value}" for name, value in guard_rails.items())


def crossval_section(crossval: dict | None, path: str, model_config: dict) -> tuple[str, str]:
    """(the card's cross-validation section, its known-limits line) from ``crossval.json`` of the recipe of the
    model whose ``train_config`` is ``model_config``; None = not run."""
    from .crossval import guard_rails_text, mean_sd  # crossval imports this module's measurements

    if crossval is None:
        return "Not run (pass --crossval).", "- Patient-level cross-validation of this recipe was not run."
    check_crossval_recipe(crossval, path, model_config)
    channels, overall = crossval["overall"]["channels"], crossval["overall"]
    recipe = crossval["recipe"]
    budget, own = recipe["changes"].get("max_steps"), model_config.get("max_steps")
    folds = crossval["folds"]
    num_folds = crossval["split"]["num_folds"]
    partial = (
        f"**Partial: fold {', '.join(str(fold['fold']) for fold in folds)} of {num_folds} only** (the others not yet run; "
        "the same command resumes them). "
        if len(folds) != num_folds
        else ""
    )
    kept = ", ".join(str(fold["training"]["best_step"]) for fold in folds)

    rows = "\n".join(
        f"| {channel} | {number(summary['pooled_over_folds']['F1'])} | {mean_sd(summary['fold_pooled']['F1'])} | "
        f"{mean_sd(summary['per_volume']['F1'])} ({summary['per_volume']['F1']['n']} volumes) | "
        f"{number(summary['pooled_over_folds']['Pc'])} | {number(summary['pooled_over_folds']['Sen'])} |"
        for channel, summary in channels.items()
    )
    false_ml = [fold["healthy_ct"]["false_lesion_ml"] for fold in folds]
    shifted = "; ".join(f"{name} {mean_sd(value)}" for name, value in overall["shifted_inputs_lesion_dice"].items())
    budget_line = "" if budget is None else f" with the step budget cut to **{budget}** (this model's: {own})"
    negatives = overall.get("held_out_lesion_free_false_lesion_ml", {})
    negatives_text = "".join(f" On the held-out lesion-free `{name}`: {mean_sd(value, 1)} mL." for name, value in negatives.items())
    section = f"""{partial}Each fold model is this recipe{budget_line}. Every patient group of a fold is tested by the fold model that
never saw it ({len(folds)} of {num_folds} folds of `patient-kfold`; checkpoints kept on each fold's own validation groups, at steps {kept}).
Full tables (per fold, per volume) and the validation curves: `{path.replace('.json', '.md')}`, made by
`{crossval['command']}`.

| channel | Dice, all test pixels | mean ± SD of {len(folds)} folds | mean ± SD over volumes | precision | sensitivity |
|---|---|---|---|---|---|
{rows}

The fold models on inputs unlike their training slices (lesion Dice, mean ± SD over folds): {shifted}.
On the healthy `{folds[0]['healthy_ct']['file']}` they mark {mean_sd(overall['healthy_ct_false_lesion_ml'], 1)} mL of
false lesion (range {number(min(false_ml), 1)}–{number(max(false_ml), 1)} mL).{negatives_text}
Guard rails of these fold-model measurements: {guard_rails_text(folds)}."""
    limit = (
        f"- The cross-validation trained each fold for {budget} steps, not this model's {own}: it measures the recipe at that budget."
        if budget is not None and budget != own
        else ""
    ) + (
        "\n- Augmentation and loss weighting were chosen by hand, not compared across all folds (CPU time); "
        "`Training/README.md` lists the one-fold comparisons that were run."
    )
    return section, limit


def training_data_lines(config: dict, orientation: str) -> str:
    """The card's bullet lines on orientation and lesion-free slices, from the recipe."""
    if orientation == "radiological":
        lines = ["- Slices in radiological orientation: the 367 Radiopaedia slices stored upside down were turned the right way up."]
    else:
        lines = ["- Slices as stored: the 10 Radiopaedia volumes (367 slices) upside down, the coronacases ones the right way up."]
    if config.get("negatives_dir"):
        kept_out = ", ".join(f"`{patient}`" for patient in config.get("negative_holdout", [])) or "none"
        lines.append(
            f"- Lesion-free slices: the chest CT volumes in HU without COVID-19 of `{config['negatives_dir']}` through the inference "
            f"preprocessing, with classical lung masks and tumour slices left out, {config.get('negative_fraction', 0):.0%} of each epoch; "
            f"patients never trained on: {kept_out}."
        )
    else:
        lines.append("- No lesion-free slices: every training slice shows lung and lesion.")
    return "\n".join(lines)


def recipe_lines(config: dict) -> str:
    """The card's recipe bullet(s) from the checkpoint's ``train_config``: one stage, or a first stage and its fine-tuning."""
    first = config.get("init_recipe") or config
    lines = [
        f"- Recipe (from the checkpoint's `train_config`): `{first.get('model')}`, encoder weights `{first.get('encoder_weights')}`\n"
        "  (**trained from scratch: no ImageNet weights can be obtained on the training machine**), channels\n"
        f"  {first.get('channels')}, {first.get('image_size')}², augmentation `{first.get('augment')}`, loss BCE +\n"
        f"  {first.get('dice_weight')} × soft Dice{' (pooled over each batch)' if first.get('dice_mode') == 'batch' else ''}, "
        f"Adam lr {first.get('learning_rate')}, batch {first.get('batch_size')},\n"
        f"  step budget {first.get('max_steps')}, validation by patient group ({first.get('split', {}).get('val_fraction')} of the "
        "training\n  groups), best validation loss kept"
        + (
            f" (of a moving average of the weights, decay {first['weight_average_decay']}, which is what is validated and saved)"
            if first.get("weight_average_decay") is not None
            else ""
        )
        + ". Trained on 2 CPU cores."
    ]
    if config.get("init_recipe"):
        validation = ", ".join(f"`{patient}`" for patient in config.get("negative_validation", [])) or "none"
        lines.append(
            f"- Then fine-tuned from that checkpoint for {config.get('max_steps')} steps: Adam lr {config.get('learning_rate')} "
            f"(fresh optimizer), {config.get('negative_fraction', 0):.0%} of each epoch lesion-free slices, augmentation "
            f"`{config.get('augment')}`, batch {config.get('batch_size')}; lesion-free validation patients (never trained on in this "
            f"stage): {validation}."
        )
    return "\n".join(lines)


def card_markdown(card: dict, command: str, po_validation: str, crossval: dict | None = None, crossval_path: str = "") -> str:
    config = card["train_config"]
    held = card["held_out"]
    rows = "\n".join(
        f"| {volume} | {v['slices']} | {number(v['lesion_dice'])} | {number(v['lung_dice'])} |" for volume, v in held["per_volume"].items()
    )
    shifted = "\n".join(f"| {name} | {number(value)} |" for name, value in card["shifted_inputs_lesion_dice"].items())
    healthy = card["healthy_ct"]
    crossval_text, crossval_limit = crossval_section(crossval, crossval_path, config)
    orientation = card.get("orientation", "as-stored")
    orientation_rows = "\n".join(
        f"| {name}{' (trained in)' if name == orientation else ''} | {number(scores['lesion_dice'])} | {number(scores['lung_dice'])} | "
        + ", ".join(f"{volume} {number(v['lesion_dice'])}" for volume, v in scores["per_volume"].items() if "radiopaedia" in volume)
        + " |"
        for name, scores in card.get("held_out_by_orientation", {}).items()
    )
    lesion_free = [healthy, *card.get("held_out_lesion_free", [])]
    coarse_side = card.get("coarse_side")  # cards made before it have no coarse rendering
    with_density = any("false_lesion_density" in entry for entry in lesion_free)  # cards made before it lack it
    lesion_free_rows = "\n".join(
        f"| `{entry['file']}` | {entry['size'][0]}×{entry['size'][1]}×{entry['size'][2]} | {number(entry['false_lesion_ml'], 1)} | "
        f"{number(entry.get('false_lesion_ml_off_tumour'), 1)} | {entry['slices_with_false_lesion']} | {number(entry['lung_ml'], 0)} | "
        f"{number(entry['false_percent_opacity'], 2)} |"
        + (f" {number((entry.get('coarse') or {}).get('false_lesion_ml'), 1)} |" if coarse_side else "")
        + (f" {density_text(entry.get('false_lesion_density'))} |" if with_density else "")
        for entry in lesion_free
    )
    coarse_header, coarse_rule, coarse_text = (
        (f" at {coarse_side}² (mL) |", "---|",
         f"\"At {coarse_side}²\": the same volume re-rendered coarser, {coarse_side}² in plane over the same field of view "
         f"(`{healthy['file']}` is {coarse_side}² already), as a low-resolution reconstruction shows it "
         "(`covidlesionseg-coarse-renderings` measures it on its own).")
        if coarse_side else ("", "", "")
    )
    density_header, density_rule, density_text_line = (
        (" false lesion / its mirror image (median HU) |", "---|",
         "\"False lesion / its mirror image\": the median CT value of the false lesion, and of the same places mirrored into "
         "the other lung (across the midline between the lungs; in brackets, the share of them that lies in the lung, over "
         "which that median is taken). False lesion much denser than its mirror image lies on lung denser than the other side's: "
         "dependent or partial-volume density, atelectasis, ground glass around a tumour, or disease.")
        if with_density else ("", "", "")
    )
    extra_header, extra_rule = coarse_header + density_header, coarse_rule + density_rule
    body_crop = config.get("field_of_view") == "body"
    guard_rails = guard_rails_words(card.get("guard_rails", {})) or "none (predate them)"
    if config.get("negatives_dir"):
        false_positive_limit = (
            f"- Lesion-free training slices come from only {patients_text(card.get('lesion_free_training_patients'))}; the false-lesion "
            f"figures above are on {len(lesion_free)} lesion-free volumes it never trained on. Look at the visual report (`--report`) "
            "before trusting a small PO."
        )
    else:
        false_positive_limit = (
            "- No lesion-free slices in training, and every training slice shows lung: false positives on a healthy CT are\n"
            "  measured above, not prevented. Look at the visual report (`--report`): on CTChest4 the false lesions sit in\n"
            "  dependent (posterior) lung and on slices below or above the lungs (upper abdomen, neck)."
        )
    return f"""# Model card — `{card['model']}`

*Generated by `{command}` on {card['date']} (torch {card['torch']}); every number below comes from that command.*

Research use only. **Not a medical device**; not validated for diagnosis or treatment decisions.

## What it is
ResAttUnet (ResNet34 encoder + attention-gated U-Net decoder, 24.6 M parameters) with two output channels:
**COVID-19 lesion** (ground-glass opacity and consolidation together) and **lung** (both lungs, including their
lesions). Input: one axial slice in radiological orientation, preprocessed by `COVIDLesionSegLib.preprocessing`
({'each volume cut to its body box — one square box per volume, 5 % margin — then ' if body_crop else ''}HU inputs windowed
to [−1250, 250] HU, 256² bicubic, per-slice min–max, CLAHE clip 7). The lesion is kept only inside the predicted lung.
Guard rails in the measurements below (the `predictor.GuardRails` defaults the CLI uses): {guard_rails}.
File: `{card['file']}` (fp16 safetensors), SHA-256 `{card['sha256']}`.

## Training data and recipe
- Data: COVID-19-CT-Seg (Ma et al., Zenodo 10.5281/zenodo.3757476; CC BY-NC-SA per the benchmark README) as the
  2D slice set `covid19-ct-seg-20cases-png256`: 8-bit, per-slice min–max + CLAHE (not HU), only slices with lesion,
  central 60 % of each volume.
{training_data_lines(config, orientation)}
- Held out (never trained or validated on): split groups {', '.join(f'`{g}`' for g in card['holdout'])}.
  The shipped sample `Resources/Samples/radiopaedia_27_86410_0.nii.gz` is one of them.
{recipe_lines(config)}
- The command that trained it is in `Training/README.md`.

## Results on the held-out patients ({held['slices']} slices, all with lesion, {orientation} orientation)
Pooled over all pixels: lesion Dice **{number(held['lesion_dice'])}**, lung Dice **{number(held['lung_dice'])}**.

| volume | slices | lesion Dice | lung Dice |
|---|---|---|---|
{rows}

The same held-out slices in both orientations (pooled; the Radiopaedia volumes are the ones stored upside down):

| orientation of the slices | lesion Dice | lung Dice | Radiopaedia volumes, lesion Dice |
|---|---|---|---|
{orientation_rows}

Golden figure re-checked by `Testing/tests/test_shipped_model.py`: lesion Dice {number(card['golden']['lesion_dice'])} on
every {card['golden']['slice_step']}nd held-out slice ({card['golden']['slices']} slices).

## Patient-level cross-validation of this recipe
{crossval_text}

## Inputs that look different (full inference path, held-out volumes, pooled lesion Dice)
| rendering | lesion Dice |
|---|---|
{shifted}

## Chest CT without COVID-19 (never trained on; every lesion voxel is false)
| volume | size | false lesion (mL) | off the tumour slices (mL) | slices with it | predicted lung (mL) | false PO (%) |{extra_header}
|---|---|---|---|---|---|---|{extra_rule}
{lesion_free_rows}

`{healthy['file']}` is slicerio's test data (raw HU); the others are lesion-free patients it never trained on. Where a volume holds
a marked lung tumour or nodule (an opacity, but not COVID-19), "off the tumour slices" leaves out the slices that training leaves out.
{coarse_text}
{density_text_line}

## Percentage of opacity (PO) against the reference
{po_section(po_validation, crossval, crossval_path)}

## Speed
CPU, {card['cpu']['threads']} thread(s) (while any other job shared the 2 cores):
{number(card['cpu']['held_out_seconds_per_slice_network_path'], 3)} s per 256² slice
(held-out slices); CTChest4 end to end {number(healthy['seconds_per_slice'], 3)} s per slice. GPU: not measured (no GPU lent).

## Known limits
- From-scratch encoder and a short CPU schedule; far fewer patients (18 groups) than a clinical model needs.
{false_positive_limit}
- Trained on 8-bit CLAHE slices, not HU; HU volumes are windowed to the Radiopaedia lung window first.
{crossval_limit}
- Volumes in mL depend on the input spacing; the shipped sample has a nominal spacing (the source PNGs lost it).
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="registry name or checkpoint file")
    parser.add_argument("--data", type=Path, required=True, help="the covid19-ct-seg-20cases-png256 folder")
    parser.add_argument("--holdout", nargs="+", required=True, help="held-out volume ids")
    parser.add_argument("--po-validation", type=Path, help="po_validation.md written by covidlesionseg-validate-po")
    parser.add_argument("--crossval", type=Path, help="crossval.json written by covidlesionseg-crossval for this model's recipe")
    parser.add_argument("--negatives", type=Path, help="lesion-free volumes folder (default: the recipe's negatives_dir)")
    parser.add_argument("--negative-patients", nargs="*", help="its patients to test on (default: the recipe's negative_holdout)")
    parser.add_argument("--output-dir", type=Path, default=None, help="default: Resources/Models")
    args = parser.parse_args(argv)
    output_dir = args.output_dir or resources_dir() / "Models"
    po_text = args.po_validation.read_text(encoding="utf-8") if args.po_validation else ""
    crossval = json.loads(args.crossval.read_text(encoding="utf-8")) if args.crossval else None
    if crossval is not None:  # refused before the measurements, not after them
        check_crossval_recipe(crossval, str(args.crossval), read_checkpoint_metadata(locate_model(args.model)[0]).train_config)
    card = measure(args.model, args.data, args.holdout, args.negatives, args.negative_patients)
    card_file = "MODEL_CARD.md" if card["model"] == default_model_name() else f"{card['model']}.card.md"
    command = "covidlesionseg-model-card " + " ".join(argv if argv is not None else sys.argv[1:])
    with atomic_output(output_dir / f"{card['model']}.card.json") as temporary:
        temporary.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    with atomic_output(output_dir / card_file) as temporary:
        temporary.write_text(card_markdown(card, command, po_text, crossval, str(args.crossval or "")), encoding="utf-8")
    print(json.dumps({key: card[key] for key in ("held_out", "golden", "shifted_inputs_lesion_dice", "healthy_ct", "cpu")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
