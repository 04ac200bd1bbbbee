"""``covidlesionseg-montage``: look at the training data as a recipe uses it.

::

    covidlesionseg-montage --data ../shared/data/covid19-ct-seg-20cases-png256 \\
        --negatives ../shared/data/chest-ct-hu-no-covid --output Training/results/data-montage

writes

- ``orientation.png``: the middle slice of every manifest volume, as stored (left) and in the
  ``radiological`` orientation with its field-of-view box (right, yellow), lesion red, lung green —
  every right-hand tile should show the spine and table at the bottom;
- ``negatives.png``: slices of each lesion-free HU volume as the network sees them (the inference
  preprocessing with the body crop), with the derived classical lung mask in green; tiles of slices left
  out for a nearby tumour are crossed out in red;
- ``dependent-density.png``: lung-bearing lesion-free slices as they are (left of each pair) and with the
  synthetic dependent density that ``--dependent-density`` trains on (right), drawn with seed 0;
- ``coarse-reconstructions.png``: the same slices as they are and as ``--coarse-reconstructions`` shows them: a
  5–10 mm slab with 2.5–4 mm pixels, drawn with seed 0.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np

from COVIDLesionSegLib.checkpoints import atomic_output
from COVIDLesionSegLib.preprocessing import PreprocessingConfig

from .data import ManifestSliceDataset, read_manifest
from .negatives import (
    COARSE_PIXEL_MM,
    COARSE_RECONSTRUCTIONS_STREAM,
    DEPENDENT_DENSITY_STREAM,
    THICK_SLICE_MM,
    NegativeCase,
    PreparedNegative,
    add_dependent_density,
    coarse_hu,
    prepare_negative_case,
    read_negative_cases,
    slab_hu,
    tumour_free_slices,
)

TILE = 128
RED, GREEN, YELLOW = (0, 0, 255), (0, 200, 0), (0, 220, 255)


def tile(image: np.ndarray, contours: Sequence[tuple[np.ndarray, tuple[int, int, int]]] = (), label: str = "") -> np.ndarray:
    """uint8 ``image[H, W]`` → a ``TILE``² BGR tile with each bool mask's outline in its colour and a label."""
    out = cv2.cvtColor(cv2.resize(image, (TILE, TILE), interpolation=cv2.INTER_AREA), cv2.COLOR_GRAY2BGR)
    for mask, colour in contours:
        small = cv2.resize(mask.astype(np.uint8), (TILE, TILE), interpolation=cv2.INTER_NEAREST)
        outlines, _ = cv2.findContours(small, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, outlines, -1, colour, 1)
    if label:
        cv2.putText(out, label[:30], (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def grid(tiles: list[np.ndarray], columns: int) -> np.ndarray:
    blank = np.zeros_like(tiles[0])
    tiles = tiles + [blank] * (-len(tiles) % columns)
    return np.vstack([np.hstack(tiles[row : row + columns]) for row in range(0, len(tiles), columns)])


def orientation_montage(data_dir: Path, preprocessing: PreprocessingConfig) -> np.ndarray:
    records = read_manifest(data_dir)
    stored = ManifestSliceDataset(records, orientation="as-stored", channels=("lesion", "lung"))
    recipe = ManifestSliceDataset(records, orientation="radiological", channels=("lesion", "lung"), preprocessing=preprocessing)
    tiles = []
    for volume_id in dict.fromkeys(record.volume_id for record in records):
        indices = [index for index, record in enumerate(records) if record.volume_id == volume_id]
        index = indices[len(indices) // 2]
        for dataset, label in ((stored, f"{volume_id} stored"), (recipe, "radiological")):
            image, lesion, lung = dataset.load_slice(index)
            contours = [(lung, GREEN), (lesion, RED)]
            box = dataset.crop_box(index)
            if box is not None:
                frame = np.zeros_like(lesion)
                frame[max(box.top, 0) : box.top + box.side, max(box.left, 0) : box.left + box.side] = True
                contours.append((frame, YELLOW))
            tiles.append(tile(image, contours, label))
    return grid(tiles, 8)


def prepared_negatives(negatives_dir: Path, preprocessing: PreprocessingConfig) -> list[tuple[NegativeCase, PreparedNegative]]:
    """Every case of the lesion-free folder with its prepared volume (read once for both pictures)."""
    return [(case, prepare_negative_case(case, preprocessing)) for case in read_negative_cases(negatives_dir)]


def negatives_montage(negatives: Sequence[tuple[NegativeCase, PreparedNegative]], per_case: int = 8) -> np.ndarray:
    rows = []
    for case, volume in negatives:
        kept = tumour_free_slices(case, len(volume.hu))
        tiles = []
        for z in np.linspace(0, len(volume.hu) - 1, per_case).round().astype(int):
            image, lung = volume.render(z)
            one = tile(image, [(lung, GREEN)], f"{case.case} z{z}" if z == 0 else f"z{z}")
            if not kept[z]:
                cv2.line(one, (0, 0), (TILE - 1, TILE - 1), RED, 2)
            tiles.append(one)
        rows.append(np.hstack(tiles))
    return np.vstack(rows)


def rendering_montage(negatives: Sequence[tuple[NegativeCase, PreparedNegative]], label: str, stream: int,
                      rendered_hu: Callable[[NegativeCase, PreparedNegative, int, np.random.Generator], np.ndarray],
                      pairs_per_case: int = 4) -> np.ndarray:
    """Per HU case with lung: ``pairs_per_case`` lung-bearing slices, each as is and as ``rendered_hu(case, volume, z, rng)``
    (its HU, ``rng`` seeded with (0, 0, z, ``stream``)) makes it through the inference preprocessing, tiled ``label``."""
    rows = []
    for case, volume in negatives:
        with_lung = np.flatnonzero(volume.lung.sum(axis=(1, 2)) > 0.05 * volume.lung[0].size)
        if not volume.hounsfield or len(with_lung) == 0:
            continue
        tiles = []
        for z in with_lung[np.linspace(0, len(with_lung) - 1, pairs_per_case).round().astype(int)]:
            plain, _ = volume.render(z)
            changed, _ = volume.render(z, rendered_hu(case, volume, int(z), np.random.default_rng((0, 0, int(z), stream))))
            tiles += [tile(plain, label=f"{case.case} z{z}"), tile(changed, label=label)]
        rows.append(np.hstack(tiles))
    return np.vstack(rows)


def with_dependent_density(case: NegativeCase, volume: PreparedNegative, z: int, rng: np.random.Generator) -> np.ndarray:
    """Slice ``z``'s HU with synthetic dependent density (``--dependent-density``)."""
    return volume.hu[z] + add_dependent_density(volume.hu[z], volume.lung[z], volume.row_mm, rng)


def as_coarse_reconstruction(case: NegativeCase, volume: PreparedNegative, z: int, rng: np.random.Generator) -> np.ndarray:
    """Slice ``z`` as ``--coarse-reconstructions`` renders it: a slab of ``THICK_SLICE_MM`` (never reaching a tumour
    slice) with pixels of ``COARSE_PIXEL_MM``."""
    pixel_mm, thickness_mm = rng.uniform(*COARSE_PIXEL_MM), rng.uniform(*THICK_SLICE_MM)
    slab = slab_hu(volume.hu, z, volume.slice_mm, thickness_mm, tumour_free_slices(case, len(volume.hu)))
    return coarse_hu(slab, volume.row_mm, pixel_mm)


def write_png(image: np.ndarray, path: Path) -> None:
    with atomic_output(path) as temporary:
        if not cv2.imwrite(str(temporary), image):
            raise OSError(f"cannot write {path}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="covidlesionseg-montage", description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the covid19-ct-seg-20cases-png256 folder")
    parser.add_argument("--negatives", type=Path, help="the chest-ct-hu-no-covid folder")
    parser.add_argument("--field-of-view", default="body", choices=("full", "body"), help="the recipe's field of view (default body)")
    parser.add_argument("--output", type=Path, required=True, help="folder for orientation.png (and negatives.png, dependent-density.png, "
                        "coarse-reconstructions.png)")
    args = parser.parse_args(argv)
    preprocessing = PreprocessingConfig(field_of_view=args.field_of_view)
    write_png(orientation_montage(args.data, preprocessing), args.output / "orientation.png")
    if args.negatives:
        negatives = prepared_negatives(args.negatives, preprocessing)
        write_png(negatives_montage(negatives), args.output / "negatives.png")
        write_png(rendering_montage(negatives, "+ dependent", DEPENDENT_DENSITY_STREAM, with_dependent_density),
                  args.output / "dependent-density.png")
        write_png(rendering_montage(negatives, "coarse, thick", COARSE_RECONSTRUCTIONS_STREAM, as_coarse_reconstruction),
                  args.output / "coarse-reconstructions.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
