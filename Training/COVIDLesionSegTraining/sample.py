"""Stack one volume's slices of the shared PNG set into a NIfTI CT + reference labelmap (the shipped sample).

    python -m COVIDLesionSegTraining.sample --data ../shared/data/covid19-ct-seg-20cases-png256 \
        --volume radiopaedia_27_86410_0 --output-dir Resources/Samples

Writes ``<volume>.nii.gz`` (uint8 CT slices as they are in the PNGs: 8-bit, min–max + CLAHE, not HU) and
``<volume>-reference.nii.gz`` (1 = lesion, 2 = lung without lesion). The slices are brought to radiological
display (anterior up, patient right on the left: the manifest's ``posterior-up`` Radiopaedia slices are
turned upside down) and stacked in z order from the lung base upward, so the identity LPS direction is the
right one. The original spacing was lost when the source made the PNGs (README of the data): the
sample gets a nominal spacing, so its millilitres are nominal too.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
import SimpleITK as sitk

from COVIDLesionSegLib.checkpoints import atomic_output

from .data import check_orientation, oriented, read_manifest

NOMINAL_SPACING_MM = (1.4, 1.4, 5.0)  # about 360 mm field of view over 256 pixels; 5 mm between kept slices


def stack_volume(data_dir: Path, volume_id: str, orientation: str = "radiological") -> tuple[np.ndarray, np.ndarray]:
    """``(ct[z, y, x] uint8, labels[z, y, x] uint8)`` of one manifest volume, slices in z order.

    ``orientation`` (``data.ORIENTATIONS``): ``"radiological"`` turns ``posterior-up`` slices upside down;
    ``"as-stored"`` keeps the PNGs as they are."""
    check_orientation(orientation)
    records = sorted((r for r in read_manifest(data_dir) if r.volume_id == volume_id), key=lambda r: r.position)
    if not records:
        raise ValueError(f"volume {volume_id!r} is not in {data_dir / 'manifest.csv'}")
    ct = np.stack([cv2.imread(str(r.image), cv2.IMREAD_UNCHANGED) for r in records])
    labels = np.zeros_like(ct)
    for index, record in enumerate(records):
        labels[index][cv2.imread(str(record.lung_mask), cv2.IMREAD_UNCHANGED) > 0] = 2
        labels[index][cv2.imread(str(record.lesion_mask), cv2.IMREAD_UNCHANGED) > 0] = 1
        ct[index], labels[index] = oriented(record, ct[index], orientation), oriented(record, labels[index], orientation)
    return ct, labels


def model_orientation(checkpoint) -> str:
    """The orientation a checkpoint's manifest slices were trained in (v1 checkpoints: ``"as-stored"``)."""
    return checkpoint.train_config.get("orientation", "as-stored")


def write_sample(data_dir: Path, volume_id: str, output_dir: Path) -> list[Path]:
    ct, labels = stack_volume(data_dir, volume_id)
    written = []
    for array, name in ((ct, f"{volume_id}.nii.gz"), (labels, f"{volume_id}-reference.nii.gz")):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(NOMINAL_SPACING_MM)
        with atomic_output(output_dir / name) as temporary:
            sitk.WriteImage(image, str(temporary), useCompression=True)
        written.append(output_dir / name)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the covid19-ct-seg-20cases-png256 folder")
    parser.add_argument("--volume", required=True, help="volume_id from manifest.csv")
    parser.add_argument("--output-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    for path in write_sample(args.data, args.volume, args.output_dir):
        print(path)


if __name__ == "__main__":
    main()
