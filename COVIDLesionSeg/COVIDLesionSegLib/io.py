"""Reading CT images and writing segmentations, with the input's geometry kept exactly.

Arrays are ``[z, y, x]`` (SimpleITK/numpy order); physical coordinates are LPS millimetres. Readable
inputs: NIfTI, NRRD, MHA/MHD (any 3D scalar image SimpleITK reads), a folder holding one DICOM series,
and 2D PNG/JPG/BMP/TIFF images (one slice, assumed to be displayed radiologically like the training data).

Every problem with an input raises :class:`InputError` whose message starts with the file name. Where
ITK would silently read a wrong image (a truncated NIfTI zero-filled, a NaN or zero spacing made 1 mm, a
sheared sform straightened, a DICOM series with a missing slice put on a uniform grid), the file's own
header or slice positions are checked first and the input is refused.
Outputs are written to a temporary file beside the target and renamed into place, so a crash never
leaves a half-written file under the final name.
"""

from __future__ import annotations

import io as text_io
import locale
import logging
import math
import re
import struct
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .checkpoints import atomic_output
from .segments import SEGMENTS

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SLICE_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
OUTPUT_FORMATS = ("seg.nrrd", "nii.gz")
PROBABILITY_SUFFIX = ".lesion-probability.nrrd"  # the lesion probability map beside the masks (--probabilities)
UNSIGNED_CT_OFFSET = 1024  # CT stored in unsigned integers as HU + 1024
AIR_BELOW_HU = -500.0  # air and lung are below this (the default hu_detect_below of the checkpoints)
BODY_ABOVE_HU = -200.0  # soft tissue and bone are above this
MIN_PLAUSIBLE_VOXELS = 64 * 64
SPACING_FIELDS = ("spacings", "space directions", "elementspacing", "elementsize", "transformmatrix")  # NRRD, MetaImage


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


def read_image(path: str | Path, series_id: str | None = None, notes: list[str] | None = None) -> sitk.Image:
    """Read one CT image as a 3D scalar ``sitk.Image`` (a 2D image becomes one slice) and validate it.

    A folder is read as the DICOM series ``series_id``, or as its only series when ``series_id`` is None.
    Raises :class:`InputError` for a missing path, an unreadable, truncated or non-image file, a folder without
    exactly one DICOM series, a series with missing, duplicate, unreadable or unevenly spaced slices, a NIfTI
    header with a non-positive or NaN spacing or a sheared sform, and whatever :func:`validate_image` refuses.
    Warnings (a conversion made, an implausible volume) are appended to ``notes``.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    try:
        if path.is_dir():
            image = read_dicom_series(path, series_id)
        elif path.name.lower().endswith((".nii", ".nii.gz")):
            image = read_nifti(path)
        else:
            if path.suffix.lower() in (".nrrd", ".nhdr", ".mha", ".mhd"):
                check_text_header(path)
            with preserved_locale():  # a single DICOM file is read by GDCM too
                image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else "unknown error"
        raise InputError(f"{path}: not a readable image ({reason})") from None
    return validate_image(image, path, notes)


def read_dicom_series(folder: Path, series_id: str | None) -> sitk.Image:
    """The DICOM series ``series_id`` of ``folder`` (its only series when None), refused unless every slice is
    there once, readable, and on evenly spaced positions (ITK would put an incomplete series on a uniform grid)."""
    series = [series_id] if series_id else dicom_series_ids(folder)
    if len(series) != 1:
        found = "no DICOM series" if not series else f"{len(series)} DICOM series ({', '.join(series)})"
        raise InputError(f"{folder}: folder holds {found}; give a folder with exactly one series")
    with preserved_locale():
        reader = sitk.ImageSeriesReader()
        files = reader.GetGDCMSeriesFileNames(str(folder), series[0])
        if not series_id:
            check_no_unread_dicom(folder, files)
        reader.SetFileNames(files)
        reader.MetaDataDictionaryArrayUpdateOn()
        image = reader.Execute()
    if len(files) > 1:
        def tag(index: int, key: str) -> str:
            return reader.GetMetaData(index, key) if reader.HasMetaDataKey(index, key) else ""

        check_slice_positions(folder, [Path(name).name for name in files], [tag(i, "0020|0032") for i in range(len(files))],
                              tag(0, "0020|0037"))
    return image


def check_no_unread_dicom(folder: Path, series_files: list[str]) -> None:
    """Refuse a one-series folder holding DICOM files (``.dcm``/``.ima`` or a ``DICM`` preamble) left out of it:
    GDCM silently drops unreadable or truncated slices."""
    listed = {Path(name).name for name in series_files}
    left_out = sorted(path.name for path in folder.iterdir()
                      if path.is_file() and path.name not in listed and path.name.upper() != "DICOMDIR"
                      and not path.name.startswith(".") and looks_like_dicom(path))
    if left_out:
        shown = ", ".join(left_out[:3]) + (", …" if len(left_out) > 3 else "")
        raise InputError(f"{folder}: {len(left_out)} DICOM file(s) unreadable or not part of the series ({shown}); "
                         "the series would be read with a gap")


def looks_like_dicom(path: Path) -> bool:
    if path.suffix.lower() in (".dcm", ".ima"):
        return True
    with open(path, "rb") as stream:
        return stream.read(132)[128:] == b"DICM"


def check_slice_positions(folder: Path, names: list[str], positions: list[str], orientation: str) -> None:
    """Refuse duplicate slice positions and gaps or uneven steps between them (> 1 % or 0.01 mm off the median step)."""
    try:
        cosines = np.array([float(value) for value in orientation.split("\\")])
        z = np.array([[float(value) for value in text.split("\\")] for text in positions]) @ np.cross(cosines[:3], cosines[3:6])
    except ValueError:
        raise InputError(f"{folder}: a slice has no readable Image Position/Orientation (Patient); the slice spacing "
                         "cannot be checked") from None
    order = np.argsort(z, kind="stable")
    z, names = z[order], [names[index] for index in order]
    steps = np.diff(z)
    if steps.min() < 1e-3:
        index = int(np.argmin(steps))
        raise InputError(f"{folder}: duplicate slice position {z[index]:.2f} mm ({names[index]}, {names[index + 1]}); "
                         "keep one copy of each slice")
    step = float(np.median(steps))
    deviation = np.abs(steps - step)
    index = int(np.argmax(deviation))
    if deviation[index] > max(0.01, 0.01 * step):
        what = "missing or unreadable slice(s)" if steps[index] > 1.5 * step else "uneven slice positions"
        raise InputError(f"{folder}: slice gap of {steps[index]:.2f} mm between {names[index]} and {names[index + 1]} "
                         f"(z {z[index]:.2f} → {z[index + 1]:.2f} mm) where the other slices are {step:.2f} mm apart: "
                         f"{what}; the series cannot be read on a uniform grid")


def read_nifti(path: Path) -> sitk.Image:
    """ITK's reading of a NIfTI file, checked by :func:`check_nifti`; for a compressed file both inflate it at the
    same time (two threads: zlib and ITK work without the GIL), so the check costs little extra time."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        check = pool.submit(check_nifti, path)
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError:
            check.result()  # the check's InputError says more than ITK's message
            raise
        check.result()
    return image


def nifti_content(path: Path) -> tuple[bytes, int]:
    """The first 348 bytes of a ``.nii`` or ``.nii.gz`` file's content (a header's size) and the content's size in
    bytes. A compressed file is inflated whole on the way, gzip member after member, so a truncated stream
    (EOFError) or corrupt data (``zlib.error``: a CRC or length that does not match) is found; nothing is kept."""
    if not path.name.lower().endswith(".gz"):
        with open(path, "rb") as stream:
            return stream.read(348), path.stat().st_size
    head, size = b"", 0
    inflater, started = zlib.decompressobj(31), False
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 24), b""):
            while block:
                output = inflater.decompress(block, 1 << 24)
                started, size = True, size + len(output)
                head += output[: max(0, 348 - len(head))]
                block = inflater.unconsumed_tail
                if inflater.eof:  # the end of a gzip member: another may follow
                    block, inflater, started = inflater.unused_data, zlib.decompressobj(31), False
    if started and not inflater.eof:
        raise EOFError("the compressed data ends before its end-of-stream marker")
    return head, size


def check_nifti(path: Path) -> None:
    """Refuse a NIfTI-1 file that is truncated or corrupt (ITK zero-fills missing voxels and reads corrupt data
    without a word), whose pixdim spacing is zero, negative or NaN (ITK turns it into 1 mm), or whose sform is
    sheared (ITK straightens it silently)."""
    try:
        header, size = nifti_content(path)
    except (OSError, EOFError, zlib.error) as error:
        raise InputError(f"{path}: truncated or corrupt compressed data ({error})") from None
    order = next((order for order in "<>" if len(header) == 348 and struct.unpack(order + "i", header[:4])[0] == 348), None)
    if order is None:
        return  # NIfTI-2 or not NIfTI at all: left to ITK
    dim = struct.unpack(order + "8h", header[40:56])
    bitpix = struct.unpack(order + "h", header[72:74])[0]
    pixdim = struct.unpack(order + "8f", header[76:108])
    vox_offset = struct.unpack(order + "f", header[108:112])[0]
    axes = max(1, min(dim[0], 3))
    spacing = pixdim[1 : axes + 1]
    if not all(math.isfinite(value) and value > 0 for value in spacing):
        raise InputError(f"{path}: voxel spacing (pixdim) {tuple(round(v, 6) for v in spacing)} is zero, negative or "
                         "not a number; the true size of the voxels is unknown")
    if header[344:348] == b"n+1\0" and 0 < dim[0] <= 7:
        expected = int(vox_offset) + math.prod(dim[1 : dim[0] + 1]) * bitpix // 8
        if size < expected:
            raise InputError(f"{path}: truncated: {size} bytes where the header announces {expected} "
                             f"({100 * (expected - size) / expected:.0f} % of the voxels missing)")
    if struct.unpack(order + "h", header[254:256])[0] > 0:  # sform_code: the sform gives the geometry
        axes_mm = np.array(struct.unpack(order + "12f", header[280:328])).reshape(3, 4)[:, :3]
        norms = np.linalg.norm(axes_mm, axis=0)
        if np.all(norms > 0):
            gram = (axes_mm / norms).T @ (axes_mm / norms)
            if np.abs(gram - np.eye(3)).max() > 1e-4:
                raise InputError(f"{path}: sheared sform (non-orthogonal voxel axes), which ITK would straighten silently; "
                                 "resample the image to an orthogonal grid")


def check_text_header(path: Path) -> None:
    """Refuse an NRRD or MetaImage header whose spacing or axis directions hold NaN or infinity (ITK turns
    them into 1 mm)."""
    with open(path, "rb") as stream:
        head = stream.read(1 << 16).decode("latin-1")
    for line in head.splitlines():
        if not line.strip():
            break  # the end of an NRRD header
        field, _, value = line.replace("=", ":", 1).partition(":")
        if field.strip().lower() in SPACING_FIELDS and re.search(r"nan|inf", value, re.IGNORECASE):
            raise InputError(f"{path}: voxel spacing is not a number in the header ({line.strip()})")
        if field.strip().lower() == "elementdatafile":
            break  # the end of a MetaImage header


def validate_image(image: sitk.Image, path: str | Path, notes: list[str] | None = None) -> sitk.Image:
    """Check ``image`` (see :func:`read_image`) and return it as 3D scalar; ``path`` names it in errors.

    Refuses multi-component, 4D, empty or constant images, NaN/Inf voxels, a spacing that is not positive and
    finite, a degenerate direction, and integer data that is neither 8-bit nor HU: integers from 0 up to beyond
    255 are taken as CT stored as HU + 1024 (converted, with a note) when they hold air and water, else refused.
    """
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path}: {image.GetNumberOfComponentsPerPixel()}-component (e.g. RGB) pixels; a greyscale CT is needed")
    if image.GetDimension() == 2:
        image = sitk.JoinSeries(image)
    elif image.GetDimension() != 3:
        raise InputError(f"{path}: {image.GetDimension()}D image; a 3D volume or 2D slice is needed")
    if 0 in image.GetSize():
        raise InputError(f"{path}: empty image (size {image.GetSize()})")
    if not all(math.isfinite(value) and value > 0 for value in image.GetSpacing()):
        raise InputError(f"{path}: voxel spacing {image.GetSpacing()} is zero, negative or not a number")
    if not abs(np.linalg.det(np.reshape(image.GetDirection(), (3, 3)))) > 1e-3:
        raise InputError(f"{path}: degenerate direction matrix {image.GetDirection()} (voxel axes in a plane)")
    array = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        raise InputError(f"{path}: contains NaN or infinite voxel values")
    low, high = array.min(), array.max()
    if low == high:
        raise InputError(f"{path}: constant image (every voxel is {low}); nothing to segment")
    if np.issubdtype(array.dtype, np.integer) and low >= 0 and high > 255:
        if not (low < UNSIGNED_CT_OFFSET + AIR_BELOW_HU and UNSIGNED_CT_OFFSET <= high <= UNSIGNED_CT_OFFSET + 32767):
            raise InputError(f"{path}: integer values {low}…{high} are neither 8-bit (0…255) nor CT stored as HU + "
                             f"{UNSIGNED_CT_OFFSET} (air below {UNSIGNED_CT_OFFSET + AIR_BELOW_HU:g}, water at "
                             f"{UNSIGNED_CT_OFFSET}); convert the image to Hounsfield units")
        converted = sitk.Cast(sitk.Cast(image, sitk.sitkInt32) - UNSIGNED_CT_OFFSET, sitk.sitkInt16)
        converted.CopyInformation(image)
        image = converted
        note(notes, f"{path}: integer values {low}…{high} read as CT stored as HU + {UNSIGNED_CT_OFFSET}; converted to HU")
    for warning in plausibility_warnings(sitk.GetArrayViewFromImage(image)):
        note(notes, f"{path}: {warning}")
    return image


def note(notes: list[str] | None, text: str) -> None:
    logger.warning(text)
    if notes is not None:
        notes.append(text)


def count_voxels(array: np.ndarray, condition: Callable[[np.ndarray], np.ndarray], slices_at_a_time: int = 16) -> int:
    """How many voxels of ``array[z, y, x]`` meet ``condition`` (a boolean array of its argument's shape), counted a few
    slices at a time: no boolean temporary of the volume's size."""
    return sum(int(np.count_nonzero(condition(array[start : start + slices_at_a_time])))
               for start in range(0, len(array), slices_at_a_time))


def plausibility_warnings(array: np.ndarray) -> list[str]:
    """Why a volume does not look like a chest CT: too few voxels; in HU, almost no air or almost no body."""
    warnings = []
    if array.size < MIN_PLAUSIBLE_VOXELS:
        warnings.append(f"only {array.size} voxels; a chest CT slice alone has about 512 × 512")
    if array.min() < AIR_BELOW_HU:  # in HU
        if count_voxels(array, lambda chunk: chunk < AIR_BELOW_HU) < 0.01 * array.size:
            warnings.append(f"almost no air (< 1 % of voxels below {AIR_BELOW_HU:g} HU); not plausible as chest CT")
        if count_voxels(array, lambda chunk: chunk > BODY_ABOVE_HU) < 0.01 * array.size:
            warnings.append(f"almost no body (< 1 % of voxels above {BODY_ABOVE_HU:g} HU); not plausible as chest CT")
    return warnings


def orientation_code(image: sitk.Image) -> str:
    """Three-letter DICOM orientation of the image axes, e.g. ``LPS`` for an identity direction."""
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())


def to_radiological(image: sitk.Image) -> sitk.Image:
    """Permute/flip axes so the array is LPS-aligned: ``array[z]`` is an axial slice displayed radiologically
    (anterior at the top, patient right on the left), as the training slices were. Voxel values are untouched.
    An image already in LPS orientation is returned as it is (no copy of the volume)."""
    if orientation_code(image) == "LPS":
        return image
    return sitk.DICOMOrient(image, "LPS")


def from_radiological(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """Put an array computed on ``to_radiological(reference)`` back on ``reference``'s exact grid."""
    oriented = sitk.GetImageFromArray(array)
    oriented.CopyInformation(to_radiological(reference))
    return restore_orientation(oriented, reference)


def restore_orientation(oriented: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """An image on the grid of ``to_radiological(reference)`` put back on ``reference``'s exact grid (``oriented``
    itself, relabelled, when ``reference`` is in LPS orientation already)."""
    code = orientation_code(reference)
    restored = oriented if code == "LPS" else sitk.DICOMOrient(oriented, code)
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


def write_segmentation(path: str | Path, masks: dict[str, sitk.Image], before_commit: Callable[[Path], None] | None = None) -> Path:
    """Write channel masks (``{"lesion": image, "lung": image}``, uint8 0/1 on one grid) atomically.

    ``.seg.nrrd``: one segment per channel with the name, colour and terminology of ``segments.SEGMENTS``
    (overlapping segments go to separate layers, as Slicer stores them). ``.nii.gz``: a labelmap with
    1 = lesion and 2 = lung without lesion. ``before_commit(temporary)`` runs on the complete temporary file
    just before it is renamed to ``path`` (an exception there leaves ``path`` untouched).
    """
    path = Path(path)
    reference = masks["lesion"]
    if path.name.endswith(".seg.nrrd"):
        def write(temporary: Path) -> None:
            write_seg_nrrd(temporary, masks, ijk_to_lps(reference))
    elif path.name.endswith(".nii.gz"):
        labels = np.zeros(reference.GetSize()[::-1], dtype=np.uint8)
        lung = sitk.GetArrayViewFromImage(masks["lung"]) if "lung" in masks else None
        lesion = sitk.GetArrayViewFromImage(reference)
        for z in range(len(labels)):  # slice by slice: no whole-volume boolean temporaries
            if lung is not None:
                labels[z][lung[z] > 0] = 2
            labels[z][lesion[z] > 0] = 1
        labelmap = sitk.GetImageFromArray(labels)
        del labels
        labelmap.CopyInformation(reference)

        def write(temporary: Path) -> None:
            sitk.WriteImage(labelmap, str(temporary), useCompression=True)
    else:
        raise ValueError(f"{path}: unknown output format; use .seg.nrrd or .nii.gz")
    with atomic_output(path) as temporary:
        write(temporary)
        if before_commit is not None:
            before_commit(temporary)
    return path


def write_seg_nrrd(path: Path, masks: dict[str, sitk.Image], ijk_to_lps_matrix: np.ndarray) -> None:
    """Write ``masks`` as the ``.seg.nrrd`` that ``slicerio.create_segmentation``, ``slicerio.add_segment`` and
    ``slicerio.write_segmentation`` make (same bytes but pynrrd's date line), one slice at a time: slicerio would hold
    the layered volume ``[layer, i, j, k]`` and pynrrd a second, Fortran-ordered copy of it (``tobytes``), one byte
    per voxel and layer each. The header is slicerio's for the segments of :func:`layered_segments` (written for a
    one-voxel volume, then given the real sizes); the voxels follow gzip-compressed as pynrrd compresses them (level 9),
    in NRRD (Fortran) order, i.e. for each k the C-ordered ``[j, i, layer]`` plane."""
    import slicerio

    arrays = {channel: sitk.GetArrayViewFromImage(mask) for channel, mask in masks.items()}  # [z, y, x] = (k, j, i)
    slices, rows, columns = next(iter(arrays.values())).shape
    segments, placement, layers = layered_segments(arrays)
    layer_axis = (layers,) if layers > 1 else ()
    header = text_io.BytesIO()
    slicerio.write_segmentation(header, {"voxels": np.zeros((*layer_axis, 1, 1, 1), dtype=np.uint8),
                                         "ijkToLPS": np.asarray(ijk_to_lps_matrix, dtype=float), "segments": segments})
    header_bytes = header.getvalue().split(b"\n\n", 1)[0]
    sizes = "sizes: " + " ".join(str(size) for size in (*layer_axis, columns, rows, slices))
    header_bytes = re.sub(rb"^sizes: .*$", sizes.encode("ascii"), header_bytes, count=1, flags=re.MULTILINE)
    compressor = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)  # pynrrd's gzip encoding
    plane = np.zeros((rows, columns, layers), dtype=np.uint8)  # [j, i, layer]
    with open(path, "wb") as stream:
        stream.write(header_bytes + b"\n\n")
        for z in range(slices):
            plane[...] = 0
            for channel, mask in arrays.items():
                layer_index, label_value = placement[channel]
                plane[:, :, layer_index][mask[z] > 0] = label_value
            stream.write(compressor.compress(plane.tobytes()))
        stream.write(compressor.flush())


def layered_segments(arrays: dict[str, np.ndarray]) -> tuple[list[dict], dict[str, tuple[int, int]], int]:
    """The slicerio segments of the ``[z, y, x]`` masks ``arrays`` (one per channel, in order), placed as
    ``slicerio.add_segment`` places them, without its whole-volume temporaries (it holds three int64 index arrays of
    the mask's voxels to find its extent): each segment goes to the first layer where it overlaps no earlier segment
    and its label value (the layer's largest + 1) fits in uint8, else to a new layer with label 1; its extent is the
    (i, j, k) bounding box of its voxels, [0, -1, 0, -1, 0, -1] when empty. Returns the segments, each channel's
    ``(layer, label value)`` and the number of layers."""
    layer_members: list[list[str]] = []
    segments, placement = [], {}
    for channel, mask in arrays.items():
        segment = dict(SEGMENTS[channel].slicerio_segment())
        segment.setdefault("name", segment["id"])
        for layer_index, members in enumerate(layer_members):
            label_value = max(placement[member][1] for member in members) + 1
            if label_value <= 255 and not any(overlaps(mask, arrays[member]) for member in members):
                members.append(channel)
                placement[channel] = (layer_index, label_value)
                break
        else:
            layer_members.append([channel])
            placement[channel] = (len(layer_members) - 1, 1)
        layer_index, label_value = placement[channel]
        segment["labelValue"], segment["layer"] = int(label_value), int(layer_index)
        segment["extent"] = extent_ijk(mask)
        segments.append(segment)
    return segments, placement, len(layer_members)


def overlaps(first: np.ndarray, second: np.ndarray) -> bool:
    """Whether two ``[z, y, x]`` masks share a voxel, slice by slice (no whole-volume temporary)."""
    return any(np.any((a > 0) & (b > 0)) for a, b in zip(first, second))


def extent_ijk(mask: np.ndarray) -> list[int]:
    """[i_min, i_max, j_min, j_max, k_min, k_max] of the nonzero voxels of ``mask[z, y, x]``; [0, -1, 0, -1, 0, -1] when empty."""
    extent = []
    for axis in (2, 1, 0):  # i = x, j = y, k = z
        present = np.flatnonzero(np.any(mask, axis=tuple(other for other in range(3) if other != axis)))
        if present.size == 0:
            return [0, -1, 0, -1, 0, -1]
        extent += [int(present[0]), int(present[-1])]
    return extent


def write_probability_map(path: str | Path, probability: sitk.Image) -> Path:
    """Write a probability image atomically as uint8 0–255 on its exact grid. Values 0…1 (a float image) become
    round(255 × p) (half up), so a voxel is ≥ 128 exactly where p ≥ 0.5; a uint8 image is taken as already so
    (``Predictor.segment_image(..., probability_dtype="uint8")``)."""
    if probability.GetPixelID() == sitk.sitkUInt8:
        quantized = probability
    else:
        values = sitk.GetArrayViewFromImage(probability)
        array = np.empty(values.shape, dtype=np.uint8)
        for z, plane in enumerate(values):  # slice by slice: no float64 copy of the volume
            array[z] = np.clip(np.floor(np.asarray(plane, dtype=np.float64) * 255.0 + 0.5), 0, 255)
        quantized = sitk.GetImageFromArray(array)
        del array
        quantized.CopyInformation(probability)
    path = Path(path)
    with atomic_output(path) as temporary:
        sitk.WriteImage(quantized, str(temporary), useCompression=True)
    return path
