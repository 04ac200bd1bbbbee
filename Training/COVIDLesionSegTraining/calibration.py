"""Make ``Resources/Models/int8-calibration.npz``: the slices on which the ``onnxruntime-int8`` backend calibrates the
activation ranges of its quantized export (``COVIDLesionSegLib.backends.quantize_int8``).

    covidlesionseg-int8-calibration --data ../shared/data/covid19-ct-seg-20cases-png256 \\
        --negatives ../shared/data/chest-ct-hu-no-covid --exclude coronacases_004 radiopaedia_27_86410_0 \\
        --exclude-patients pyradiomics_lung2

The slices are uint8 ``[N, size, size]`` exactly as the network sees them with the preprocessing of ``--model`` (the
shipped default): ``--lesion-slices`` 8-bit slices spread evenly over the lesion slices of the volumes not excluded
(radiological orientation, each volume cut to its body box as inference cuts it), then ``--hu-slices`` slices spread
evenly over the tumour-free slices of the lesion-free HU volumes of the patients not excluded (the inference
preprocessing of HU input). Exclude the volumes the int8 masks are checked on (the shipped model's held-out
patients, the sample among them) and the held-out lesion-free patient. The file also holds ``sources``: the volume
and slice of each.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from COVIDLesionSegLib.checkpoints import atomic_output, locate_model, read_checkpoint_metadata
from COVIDLesionSegLib.preprocessing import crop_slice, resize_slice
from COVIDLesionSegLib.resources import default_model_name

from .data import ManifestSliceDataset, SliceDataset, read_manifest
from .negatives import NegativeVolumeDataset


def evenly(count: int, total: int) -> list[int]:
    """``count`` indices spread evenly over ``range(total)`` (all of them when ``count >= total``)."""
    if count >= total:
        return list(range(total))
    return [int(index) for index in np.linspace(0, total - 1, count).round()]


def network_slice(dataset: SliceDataset, index: int) -> np.ndarray:
    """Item ``index`` of ``dataset`` as the network's uint8 ``[size, size]`` slice, before augmentation and normalisation."""
    image, _, _ = dataset.load_slice(index)
    return resize_slice(crop_slice(image, dataset.crop_box(index)), dataset.preprocessing.size)


def calibration_slices(data_dir: Path, negatives_dir: Path, exclude: Sequence[str], exclude_patients: Sequence[str],
                       lesion_slices: int, hu_slices: int, model: str) -> tuple[np.ndarray, list[str]]:
    """``(uint8 [N, size, size], ["<volume>:<slice>", …])``: see the module's docstring."""
    preprocessing = read_checkpoint_metadata(locate_model(model)[0], check_model=False).preprocessing
    records = [record for record in read_manifest(data_dir) if record.volume_id not in exclude and record.split_group not in exclude]
    if not records:
        raise ValueError(f"no slices of {data_dir} are left after excluding {', '.join(exclude)}")
    datasets = [ManifestSliceDataset(records, orientation="radiological", preprocessing=preprocessing),
                NegativeVolumeDataset(negatives_dir, exclude_patients=exclude_patients, preprocessing=preprocessing)]
    slices, sources = [], []
    for dataset, count in zip(datasets, (lesion_slices, hu_slices), strict=True):
        for index in evenly(count, len(dataset)):
            slices.append(network_slice(dataset, index))
            sources.append(f"{dataset.volume_id(index)}:{dataset.position(index)}")
    return np.stack(slices), sources


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the covid19-ct-seg-20cases-png256 folder (manifest.csv)")
    parser.add_argument("--negatives", type=Path, required=True, help="the chest-ct-hu-no-covid folder (manifest.csv)")
    parser.add_argument("--exclude", nargs="*", default=[], help="volume_id or split_group values of --data to leave out")
    parser.add_argument("--exclude-patients", nargs="*", default=[], help="patients of --negatives to leave out")
    parser.add_argument("--lesion-slices", type=int, default=48, help="8-bit lesion slices (default 48)")
    parser.add_argument("--hu-slices", type=int, default=16, help="lesion-free HU slices (default 16)")
    parser.add_argument("--model", default=default_model_name(), help="the model whose preprocessing makes the slices")
    parser.add_argument("--output", type=Path, default=Path("Resources/Models/int8-calibration.npz"))
    args = parser.parse_args(argv)
    slices, sources = calibration_slices(args.data, args.negatives, args.exclude, args.exclude_patients, args.lesion_slices,
                                         args.hu_slices, args.model)
    with atomic_output(args.output) as temporary, open(temporary, "wb") as stream:
        np.savez_compressed(stream, slices=slices, sources=np.asarray(sources))
    print(f"{args.output}: {len(slices)} slices {slices.shape[1]}×{slices.shape[2]} ({len(sources) - args.hu_slices} 8-bit, "
          f"{min(args.hu_slices, len(sources))} HU)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
