"""Slice datasets for training and evaluation.

Both datasets yield one axial slice per item as a dict:

- ``image``: ``[input_channels, size, size]`` float32, the output of the core's
  :func:`~COVIDLesionSegLib.preprocessing.to_network_input` (ImageNet-normalised grey slice);
- ``target``: ``[C, size, size]`` float32 in {0, 1}, one channel per requested name in ``channels``:
  ``"lesion"`` (infection) and ``"lung"`` (lung mask ∪ lesion: the lung includes its lesions);
- ``index``: the item's index, to look up :meth:`SliceDataset.volume_id` and :meth:`SliceDataset.position`.

Every slice reaches the network the way inference prepares it (``COVIDLesionSegLib.preprocessing``):

- :class:`ManifestSliceDataset` reads the shared PNG slice set (``manifest.csv``). Those PNGs already are
  the recipe's 256² uint8 output, so at ``size`` 256 they are used as they are; a smaller ``size`` (the
  CPU profiles' 128²) resizes the image with the recipe's bicubic interpolation and the masks with
  :func:`~COVIDLesionSegLib.preprocessing.resize_mask`. ``orientation="radiological"`` turns the
  ``posterior-up`` slices (the manifest's ``orientation`` column: the 10 Radiopaedia volumes are stored
  upside down) the right way up, image and masks together; ``"as-stored"`` keeps them as they are (v1).
  With ``field_of_view="body"`` every volume's slices are cut to its body box
  (:func:`~COVIDLesionSegLib.preprocessing.body_crop_box`, decided once per volume) before the resize.
- :class:`NiftiVolumeDataset` reads the original release (``ct_scans/``, ``infection_mask/``,
  ``lung_mask/``), orients each volume radiologically (array ``[z, y, x]`` LPS-aligned: anterior up,
  patient right on the image left) and runs :func:`~COVIDLesionSegLib.preprocessing.prepare_volume`.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import SimpleITK as sitk
import torch
from torch.utils.data import Dataset

from COVIDLesionSegLib.io import read_image, to_radiological
from COVIDLesionSegLib.preprocessing import (
    LOW_RESOLUTION_SCALES,
    CropBox,
    PreprocessingConfig,
    body_crop_box,
    crop_slice,
    prepare_volume,
    resize_mask,
    resize_slice,
    to_network_input,
)

from .augment import (
    LOW_RESOLUTION_STREAM,
    VERTICAL_FLIP_STREAM,
    augment_slice,
    check_augment_mode,
    lower_resolution,
)

CHANNEL_NAMES = ("lesion", "lung")
ORIENTATIONS = ("as-stored", "radiological")  # what the manifest slices are turned to
MANIFEST_COLUMNS = ("volume_id", "split_group", "pos_in_volume", "image", "mask", "lung_mask")
HEAVY_DISEASE_SHARE = 0.25  # a slice whose lesion covers at least this share of its lung shows heavy disease (MosMed CT-2 and above)


@dataclass(frozen=True)
class SliceRecord:
    """One row of ``manifest.csv``: a slice of volume ``volume_id`` at kept position ``position``."""

    volume_id: str
    split_group: str  # patient-level grouping to split on (18 groups)
    position: int  # order of the kept slice inside its volume (z order)
    image: Path  # 256² uint8 CT slice, already min–max + CLAHE
    lesion_mask: Path  # {0, 255}
    lung_mask: Path  # {0, 255}
    orientation: str = "radiological"  # as stored: "radiological" or "posterior-up" (upside down)


def read_manifest(data_dir: str | Path) -> list[SliceRecord]:
    """All slices listed in ``data_dir/manifest.csv``, in file order, with absolute paths."""
    data_dir = Path(data_dir)
    manifest = data_dir / "manifest.csv"
    if not manifest.is_file():
        raise FileNotFoundError(
            f"{manifest} not found; --data must be the covid19-ct-seg-20cases-png256 folder "
            "(with manifest.csv, images/, masks/, lung_masks/)"
        )
    with open(manifest, newline="") as stream:
        rows = list(csv.DictReader(stream))
    missing = [column for column in MANIFEST_COLUMNS if rows and column not in rows[0]]
    if not rows or missing:
        raise ValueError(f"{manifest}: no rows or missing columns {missing}")
    return [
        SliceRecord(
            volume_id=row["volume_id"],
            split_group=row["split_group"],
            position=int(row["pos_in_volume"]),
            image=data_dir / row["image"],
            lesion_mask=data_dir / row["mask"],
            lung_mask=data_dir / row["lung_mask"],
            orientation=row.get("orientation") or "radiological",
        )
        for row in rows
    ]


def check_channels(channels: Sequence[str]) -> tuple[str, ...]:
    channels = tuple(channels)
    if not channels or any(name not in CHANNEL_NAMES for name in channels) or len(set(channels)) != len(channels):
        raise ValueError(f"channels must be distinct names from {CHANNEL_NAMES}, e.g. ('lesion',) or ('lesion', 'lung'); got {channels}")
    return channels


def check_orientation(orientation: str) -> str:
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
    return orientation


def oriented(record: SliceRecord, array: np.ndarray, orientation: str) -> np.ndarray:
    """``array[H, W]`` (the record's image or a mask) in ``orientation``: a ``posterior-up`` record is turned
    upside down for ``"radiological"``; anything else is returned as it is."""
    upside_down = orientation == "radiological" and record.orientation == "posterior-up"
    return np.ascontiguousarray(array[::-1]) if upside_down else array


def read_png(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise FileNotFoundError(f"{path}: cannot read this PNG")
    return image


def lesion_share_of_lung(record: SliceRecord) -> float:
    """Lesion pixels over lung pixels (lesion included) of one manifest slice; 0 when it shows no lung."""
    lesion, lung = (read_png(path) > 0 for path in (record.lesion_mask, record.lung_mask))
    return float(lesion.sum() / max(1, (lung | lesion).sum()))


def with_heavy_disease_repeated(records: Sequence[SliceRecord], repeat: int) -> list[SliceRecord]:
    """``records`` followed by ``repeat − 1`` more copies of each slice whose lesion covers at least
    ``HEAVY_DISEASE_SHARE`` of its lung, so an epoch shows heavy disease ``repeat`` times (each copy its own
    augmentation draws, as they are drawn per item index)."""
    if repeat < 1:
        raise ValueError(f"heavy_disease_repeat must be at least 1, got {repeat}")
    records = list(records)
    if repeat == 1:
        return records
    heavy = [record for record in records if lesion_share_of_lung(record) >= HEAVY_DISEASE_SHARE]
    return records + heavy * (repeat - 1)


class SliceDataset(Dataset):
    """Common item logic: uint8 slice + masks → resize → augmentation → network input and targets.

    Subclasses implement :meth:`load_slice`, :meth:`volume_id`, :meth:`position` and ``__len__``.
    ``augment`` is ``"none"``, ``"flip"`` or ``"robust"`` (see :mod:`.augment`); each item draws its
    random numbers from ``numpy.random.default_rng((seed, epoch, index))``, so an epoch is reproducible
    whatever the worker count, and :meth:`set_epoch` changes them from one epoch to the next.
    ``native_targets`` keeps the masks at their stored resolution (evaluation against the original
    256² labels when ``size`` is smaller); it cannot be combined with augmentation.
    ``low_resolution`` is the probability that an item's image is shown at a lower resolution, a scale drawn
    uniformly from ``low_resolution_scales`` (:func:`~.augment.lower_resolution`, before the augmentation; masks
    unchanged), from its own stream of (seed, epoch, index), so the augmentation's draws stay as without it.
    ``vertical_flip`` is the probability that an item is shown upside down (image and masks, anterior–posterior, after
    the augmentation), drawn from a stream of its own too.
    """

    def __init__(
        self,
        channels: Sequence[str] = ("lesion",),
        preprocessing: PreprocessingConfig | None = None,
        augment: str = "none",
        seed: int = 0,
        native_targets: bool = False,
        low_resolution: float = 0.0,
        vertical_flip: float = 0.0,
        low_resolution_scales: tuple[float, float] = LOW_RESOLUTION_SCALES,
    ):
        self.channels = check_channels(channels)
        self.preprocessing = preprocessing or PreprocessingConfig()
        if native_targets and (augment != "none" or low_resolution > 0 or vertical_flip > 0):
            raise ValueError("native_targets is for evaluation and cannot be combined with augmentation")
        for name, probability in (("low_resolution", low_resolution), ("vertical_flip", vertical_flip)):
            if not 0.0 <= probability <= 1.0:
                raise ValueError(f"{name} is a probability, got {probability}")
        self.augment = check_augment_mode(augment)
        if not 0.0 < low_resolution_scales[0] <= low_resolution_scales[1] <= 1.0:
            raise ValueError(f"low_resolution_scales must be 0 < smallest ≤ largest ≤ 1, got {low_resolution_scales}")
        self.low_resolution = low_resolution
        self.low_resolution_scales = tuple(low_resolution_scales)
        self.vertical_flip = vertical_flip
        self.seed = seed
        self.native_targets = native_targets
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def load_slice(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(image uint8 [H, W], lesion bool [H, W], lung bool [H, W])``; lung is all False when unused."""
        raise NotImplementedError

    def volume_id(self, index: int) -> str:
        raise NotImplementedError

    def position(self, index: int) -> int:
        raise NotImplementedError

    def crop_box(self, index: int) -> CropBox | None:
        """The field-of-view box of the item's volume (None: the whole slice)."""
        return None

    def __getitem__(self, index: int) -> dict:
        image, lesion, lung = self.load_slice(index)
        size, box = self.preprocessing.size, self.crop_box(index)
        image = resize_slice(crop_slice(image, box), size)
        masks = np.stack([lesion if name == "lesion" else lung | lesion for name in self.channels])
        if not self.native_targets:
            masks = np.stack([crop_slice(mask, box) for mask in masks])
            if masks.shape[-2:] != (size, size):
                masks = np.stack([resize_mask(mask, self.preprocessing) for mask in masks])
        if self.low_resolution > 0:
            rng = np.random.default_rng((self.seed, self.epoch, index, LOW_RESOLUTION_STREAM))
            if rng.random() < self.low_resolution:
                image = lower_resolution(image, rng.uniform(*self.low_resolution_scales))
        if self.augment != "none":
            rng = np.random.default_rng((self.seed, self.epoch, index))
            image, masks = augment_slice(image, masks, rng, self.augment, self.preprocessing)
        if self.vertical_flip > 0:
            rng = np.random.default_rng((self.seed, self.epoch, index, VERTICAL_FLIP_STREAM))
            if rng.random() < self.vertical_flip:
                image, masks = np.ascontiguousarray(image[::-1]), np.ascontiguousarray(masks[:, ::-1])
        item = {
            "image": torch.from_numpy(to_network_input(image[None], self.preprocessing)[0]),
            "target": torch.from_numpy(masks.astype(np.float32)),
            "index": index,
        }
        if self.native_targets:
            item["box"] = box  # to put the output back on the stored slice (preprocessing.uncrop_probabilities)
        return item


class ManifestSliceDataset(SliceDataset):
    """The shared PNG slice set: ``records`` from :func:`read_manifest` (usually one subset of a split).

    ``orientation``: ``"radiological"`` flips ``posterior-up`` records upside down (image and masks);
    ``"as-stored"`` leaves every slice as stored. With ``field_of_view="body"`` each volume's box is found
    on all of its records here (the oriented slices), as inference finds it on a whole volume.
    """

    def __init__(self, records: Sequence[SliceRecord], orientation: str = "as-stored", **options):
        super().__init__(**options)
        self.records = list(records)
        self.orientation = check_orientation(orientation)
        self.boxes: dict[str, CropBox | None] = {}
        if self.preprocessing.field_of_view != "full":
            distinct = list(dict.fromkeys(self.records))  # a slice shown twice an epoch counts once for the box
            for volume_id in dict.fromkeys(record.volume_id for record in distinct):
                images = [oriented(r, read_png(r.image), orientation) for r in distinct if r.volume_id == volume_id]
                self.boxes[volume_id] = body_crop_box(np.stack(images), self.preprocessing)

    def __len__(self) -> int:
        return len(self.records)

    def load_slice(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        record = self.records[index]
        image = oriented(record, read_png(record.image), self.orientation)
        lesion = oriented(record, read_png(record.lesion_mask) > 0, self.orientation)
        lung = oriented(record, read_png(record.lung_mask) > 0, self.orientation) if "lung" in self.channels else np.zeros_like(lesion)
        return image, lesion, lung

    def crop_box(self, index: int) -> CropBox | None:
        return self.boxes.get(self.records[index].volume_id)

    def volume_id(self, index: int) -> str:
        return self.records[index].volume_id

    def position(self, index: int) -> int:
        return self.records[index].position


def volume_id_from_filename(name: str) -> str:
    """Zenodo volume id of a release file name, e.g. ``coronacases_001.nii.gz`` → ``coronacases_001``.

    Also accepts the Kaggle re-packaging's CT names (``coronacases_org_001.nii``,
    ``radiopaedia_org_covid-19-pneumonia-4_85506_1-dcm.nii``), whose masks carry the Zenodo names.
    """
    stem = re.sub(r"\.nii(\.gz)?$", "", name)
    stem = re.sub(r"^coronacases_org_(\d+)$", r"coronacases_\1", stem)
    return re.sub(r"^radiopaedia_org_covid-19-pneumonia-(\d+_\d+_\d+)-dcm$", r"radiopaedia_\1", stem)


def read_volume_array(path: Path, is_mask: bool = False) -> np.ndarray:
    """A CT or mask volume as a radiologically oriented array ``[z, y, x]`` (``io.to_radiological``).

    CT volumes are read and validated with ``io.read_image``; masks are read as they are (an all-zero
    mask is valid).
    """
    image = sitk.ReadImage(str(path)) if is_mask else read_image(path)
    return sitk.GetArrayFromImage(to_radiological(image))


def find_volume_files(folder: Path) -> dict[str, Path]:
    """``{volume_id: path}`` for the ``*.nii`` / ``*.nii.gz`` files of ``folder``."""
    files = sorted(folder.glob("*.nii")) + sorted(folder.glob("*.nii.gz"))
    return {volume_id_from_filename(path.name): path for path in files}


class NiftiVolumeDataset(SliceDataset):
    """The original COVID-19-CT-Seg release: every axial slice of the chosen volumes.

    ``root`` holds ``ct_scans/``, ``infection_mask/`` and (for the ``"lung"`` channel) ``lung_mask/``
    with matching volume names. Volumes are read, oriented and preprocessed once, at construction, into
    uint8 arrays of ``[z, size, size]`` (about 64 KiB per slice at 256²). ``volume_ids`` selects volumes
    (default: all); ``only_lesion_slices`` keeps slices with at least one lesion voxel, like the PNG set.
    """

    def __init__(
        self,
        root: str | Path,
        volume_ids: Sequence[str] | None = None,
        only_lesion_slices: bool = False,
        **options,
    ):
        super().__init__(**options)
        root = Path(root)
        scans = find_volume_files(root / "ct_scans")
        if not scans:
            raise FileNotFoundError(f"{root / 'ct_scans'}: no .nii/.nii.gz CT volumes (expected the COVID-19-CT-Seg release layout)")
        wanted = list(volume_ids) if volume_ids is not None else sorted(scans)
        unknown = sorted(set(wanted) - set(scans))
        if unknown:
            raise ValueError(f"volumes {unknown} not in {root / 'ct_scans'}; available: {sorted(scans)}")
        mask_folders = {"lesion": root / "infection_mask", "lung": root / "lung_mask"}
        needed = ["lesion"] + (["lung"] if "lung" in self.channels else [])
        mask_files = {name: find_volume_files(mask_folders[name]) for name in needed}
        self.volumes: dict[str, dict[str, np.ndarray]] = {}
        self.slices: list[tuple[str, int]] = []
        for volume_id in wanted:
            ct = read_volume_array(scans[volume_id])
            image, box = prepare_volume(ct, self.preprocessing)
            arrays = {"image": image}
            for name in needed:
                if volume_id not in mask_files[name]:
                    raise FileNotFoundError(f"{mask_folders[name]}: no mask for volume {volume_id}")
                mask = read_volume_array(mask_files[name][volume_id], is_mask=True)
                if mask.shape != ct.shape:
                    raise ValueError(f"{volume_id}: {name} mask shape {mask.shape} differs from the CT's {ct.shape}")
                arrays[name] = np.stack([resize_mask(crop_slice(mask_slice > 0, box), self.preprocessing) for mask_slice in mask])
            self.volumes[volume_id] = arrays
            keep = arrays["lesion"].any(axis=(1, 2)) if only_lesion_slices else np.ones(len(ct), bool)
            self.slices.extend((volume_id, int(z)) for z in np.flatnonzero(keep))

    def __len__(self) -> int:
        return len(self.slices)

    def load_slice(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        volume_id, z = self.slices[index]
        arrays = self.volumes[volume_id]
        lesion = arrays["lesion"][z]
        return arrays["image"][z], lesion, arrays["lung"][z] if "lung" in arrays else np.zeros_like(lesion)

    def volume_id(self, index: int) -> str:
        return self.slices[index][0]

    def position(self, index: int) -> int:
        return self.slices[index][1]
