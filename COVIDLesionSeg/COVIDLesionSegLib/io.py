"""Reading CT images and writing segmentations, with the input's geometry kept exactly.

Arrays are ``[z, y, x]`` (SimpleITK/numpy order); physical coordinates are LPS millimetres. Readable
inputs: NIfTI, NRRD, MHA/MHD (any 3D scalar image SimpleITK reads), a folder holding one DICOM series,
and 2D PNG/JPG/BMP/TIFF images (one slice, assumed to be displayed radiologically like the training data).

Every problem with an input raises :class:`InputError` whose message starts with the file name.
Outputs are written to a temporary file beside the target and renamed into place, so a crash never
leaves a half-written file under the final name.
"""

from __future__ import annotations

import locale
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .checkpoints import atomic_output
from .segments import SEGMENTS

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SLICE_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
OUTPUT_FORMATS = ("seg.nrrd", "nii.gz")


class InputError(ValueError):
    """An input that cannot be segmented; the message names the file and the problem."""


def image_suffix(path: str | Path) -> str:
    """The recognised image suffix of ``path`` (e.g. ``.nii.gz``), or '' when it is not an image file name."""
    name = Path(path).name.lower()
    return next((suffix for suffix in IMAGE_SUFFIXES if name.endswith(suffix)), "")


def case_name(path: str | Path) -> str:
    """``/data/patient7.nii.gz`` → ``patient7``; a DICOM folder → the folder name."""
    path = Path(path)
    suffix = image_suffix(path)
    return path.name[: len(path.name) - len(suffix)] if suffix else path.name


@contextmanager
def preserved_locale() -> Iterator[None]:
    """Undo the process-wide locale change GDCM makes while reading DICOM: without this, Python's default text
    encoding turns to ASCII afterwards and later file writes or subprocess reads of non-ASCII text fail."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def dicom_series_ids(folder: Path) -> list[str]:
    with preserved_locale():
        return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or [])


def read_image(path: str | Path, series_id: str | None = None) -> sitk.Image:
    """Read one CT image as a 3D scalar ``sitk.Image`` (a 2D image becomes one slice) and validate it.

    A folder is read as the DICOM series ``series_id``, or as its only series when ``series_id`` is None.
    Raises :class:`InputError` for a missing path, an unreadable or non-image file, a folder without exactly
    one DICOM series, 4D or multi-component (RGB) data, an empty or constant image, or NaN/Inf voxels.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    try:
        if path.is_dir():
            series = [series_id] if series_id else dicom_series_ids(path)
            if len(series) != 1:
                found = "no DICOM series" if not series else f"{len(series)} DICOM series ({', '.join(series)})"
                raise InputError(f"{path}: folder holds {found}; give a folder with exactly one series")
            with preserved_locale():
                reader = sitk.ImageSeriesReader()
                reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path), series[0]))
                image = reader.Execute()
        else:
            with preserved_locale():  # a single DICOM file is read by GDCM too
                image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else "unknown error"
        raise InputError(f"{path}: not a readable image ({reason})") from None
    return validate_image(image, path)


def validate_image(image: sitk.Image, path: str | Path) -> sitk.Image:
    """Check ``image`` (see :func:`read_image`) and return it as 3D scalar; ``path`` names it in errors."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path}: {image.GetNumberOfComponentsPerPixel()}-component (e.g. RGB) pixels; a greyscale CT is needed")
    if image.GetDimension() == 2:
        image = sitk.JoinSeries(image)
    elif image.GetDimension() != 3:
        raise InputError(f"{path}: {image.GetDimension()}D image; a 3D volume or 2D slice is needed")
    if 0 in image.GetSize():
        raise InputError(f"{path}: empty image (size {image.GetSize()})")
    array = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        raise InputError(f"{path}: contains NaN or infinite voxel values")
    low, high = array.min(), array.max()
    if low == high:
        raise InputError(f"{path}: constant image (every voxel is {low}); nothing to segment")
    return image


def orientation_code(image: sitk.Image) -> str:
    """Three-letter DICOM orientation of the image axes, e.g. ``LPS`` for an identity direction."""
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())


def to_radiological(image: sitk.Image) -> sitk.Image:
    """Permute/flip axes so the array is LPS-aligned: ``array[z]`` is an axial slice displayed radiologically
    (anterior at the top, patient right on the left), as the training slices were. Voxel values are untouched."""
    return sitk.DICOMOrient(image, "LPS")


def from_radiological(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """Put an array computed on ``to_radiological(reference)`` back on ``reference``'s exact grid."""
    oriented = sitk.GetImageFromArray(array)
    oriented.CopyInformation(to_radiological(reference))
    restored = sitk.DICOMOrient(oriented, orientation_code(reference))
    restored.CopyInformation(reference)  # identical grid; removes round-off from the direction round trip
    return restored


def ijk_to_lps(image: sitk.Image) -> np.ndarray:
    """4×4 matrix from voxel index (i, j, k) = (x, y, z) to LPS millimetres."""
    matrix = np.eye(4)
    matrix[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())
    matrix[:3, 3] = image.GetOrigin()
    return matrix


def output_path(output_dir: str | Path, name: str, output_format: str) -> Path:
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"unknown output format {output_format!r}; choose one of {', '.join(OUTPUT_FORMATS)}")
    return Path(output_dir) / f"{name}.{output_format}"


def write_segmentation(path: str | Path, masks: dict[str, sitk.Image]) -> Path:
    """Write channel masks (``{"lesion": image, "lung": image}``, uint8 0/1 on one grid) atomically.

    ``.seg.nrrd``: one segment per channel with the name, colour and terminology of ``segments.SEGMENTS``
    (overlapping segments go to separate layers, as Slicer stores them). ``.nii.gz``: a labelmap with
    1 = lesion and 2 = lung without lesion.
    """
    path = Path(path)
    reference = masks["lesion"]
    if path.name.endswith(".seg.nrrd"):
        import slicerio

        segmentation = slicerio.create_segmentation(reference.GetSize(), ijk_to_lps(reference))
        for channel, mask in masks.items():
            voxels = sitk.GetArrayViewFromImage(mask).transpose(2, 1, 0) > 0  # [z,y,x] → (i, j, k)
            slicerio.add_segment(segmentation, voxels, SEGMENTS[channel].slicerio_segment())
        with atomic_output(path) as temporary:
            slicerio.write_segmentation(str(temporary), segmentation)
    elif path.name.endswith(".nii.gz"):
        labels = np.zeros(reference.GetSize()[::-1], dtype=np.uint8)
        if "lung" in masks:
            labels[sitk.GetArrayViewFromImage(masks["lung"]) > 0] = 2
        labels[sitk.GetArrayViewFromImage(reference) > 0] = 1
        labelmap = sitk.GetImageFromArray(labels)
        labelmap.CopyInformation(reference)
        with atomic_output(path) as temporary:
            sitk.WriteImage(labelmap, str(temporary), useCompression=True)
    else:
        raise ValueError(f"{path}: unknown output format; use .seg.nrrd or .nii.gz")
    return path
