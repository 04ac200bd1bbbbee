"""Results where radiologists read them: a DICOM Segmentation (SEG) and a TID 1500 measurement report (SR).

Both are written with `highdicom <https://highdicom.readthedocs.io>`_, imported only here and only when a DICOM
output is asked for (``pip install "covidlesionseg[dicom]"``); nothing else in the core needs it.

- :func:`build_segmentation`: a binary SEG of the source CT series, one segment per channel (1 = COVID-19 lesion,
  2 = Lung) with the same SNOMED CT codes, names and colours as the ``.seg.nrrd`` (``segments.SEGMENTS``), one
  frame per source slice (empty frames left out), referencing the source series, frame of reference and each
  slice's SOP instance UID; the software and the model (name, SHA-256) are in the header and in each segment's
  algorithm identification.
- :func:`build_measurement_report`: a Comprehensive 3D SR holding a TID 1500 measurement report of the measures of
  ``statistics.MEASURES`` (volumes, percentages of opacity per side, PHO and HU measures where available, each
  with its UCUM unit; the MosMed category as a qualitative evaluation), in one volumetric ROI group per segment
  that references the SEG's segment. :func:`read_measurement_report` reads the values back by measure name.

The source series is read again here (headers only) with pydicom; each mask slice is matched to its source slice by
position, so the frames follow the source instances whatever order the files are in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import __version__, io
from .segments import SEGMENTS
from .statistics import MEASURES_BY_NAME, SEVERITY_DEFINITIONS, LesionStatistics

SEG_SUFFIX = ".seg.dcm"
SR_SUFFIX = ".sr.dcm"
MANUFACTURER = "COVIDLesionSeg"
PRIVATE_SCHEME = "99COVIDLS"  # private coding scheme (DICOM PS3.16: designators starting with "99") for measures without a standard code
POSITION_TOLERANCE_MM = 0.01


class DicomOutputError(ValueError):
    """A DICOM output that cannot be made for this input; the message says why and what to do."""


def highdicom():
    """The ``highdicom`` module, or an error saying how to install it."""
    try:
        import highdicom
    except ImportError:
        raise DicomOutputError('DICOM outputs (--format dicom-seg, --sr) need highdicom: pip install "covidlesionseg[dicom]" '
                               '(or pip install "highdicom>=0.28")') from None
    return highdicom


@dataclass(frozen=True)
class Provenance:
    """What made the result: written into the DICOM headers."""

    model_name: str
    model_sha256: str
    software_version: str = __version__

    @property
    def software(self) -> str:
        return f"covidlesionseg {self.software_version}"


def require_dicom_series(path: str | Path) -> None:
    """Refuse a non-DICOM input for a DICOM output, before any work is done on it."""
    path = Path(path)
    if not path.is_dir():
        raise io.InputError(f"{path}: --format dicom-seg needs a DICOM series as input (a folder of DICOM slices), this is "
                               "a file; use --format seg.nrrd or nii.gz for it")


def read_series_headers(folder: str | Path, series_id: str | None = None) -> list:
    """The pydicom datasets (without pixel data) of the DICOM series ``series_id`` of ``folder`` (its only one when None)."""
    import pydicom

    folder = Path(folder)
    series = [series_id] if series_id else io.dicom_series_ids(folder)
    if len(series) != 1:
        raise DicomOutputError(f"{folder}: {len(series)} DICOM series; give a folder with exactly one series")
    with io.preserved_locale():
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0])
    return [pydicom.dcmread(name, stop_before_pixels=True) for name in files]


def source_slice_indices(sources: list, reference: sitk.Image) -> list[int]:
    """The slice index ``k`` of ``reference`` (the image read from ``sources``) at which each source slice lies."""
    indices = []
    for dataset in sources:
        if (int(dataset.Rows), int(dataset.Columns)) != (reference.GetHeight(), reference.GetWidth()):
            raise DicomOutputError(f"source slice {dataset.SOPInstanceUID} is {dataset.Rows}×{dataset.Columns}, the image "
                                   f"{reference.GetHeight()}×{reference.GetWidth()}")
        index = np.asarray(reference.TransformPhysicalPointToContinuousIndex([float(v) for v in dataset.ImagePositionPatient]))
        k = int(round(index[2]))
        step_mm = np.asarray(reference.GetSpacing())
        if not (0 <= k < reference.GetDepth() and np.all(np.abs(index - (0, 0, k)) * step_mm < POSITION_TOLERANCE_MM)):
            raise DicomOutputError(f"source slice {dataset.SOPInstanceUID} at {list(dataset.ImagePositionPatient)} mm is not "
                                   "a slice of the segmented image")
        indices.append(k)
    if len(set(indices)) != len(indices) or len(indices) != reference.GetDepth():
        raise DicomOutputError(f"the {len(sources)} source slices do not match the image's {reference.GetDepth()} slices one to one")
    return indices


def terminology_codes(terminology: str) -> dict:
    """The codes of a Slicer terminology entry string (``context~category~type~modifier~anatomy context~region~region
    modifier``, each code ``scheme^value^meaning``) as highdicom ``CodedConcept`` (None where empty)."""
    hd = highdicom()
    fields = terminology.split("~")

    def code(text: str):
        scheme, value, meaning = (text.split("^") + ["", "", ""])[:3]
        return hd.sr.CodedConcept(value, scheme, meaning) if value else None

    return {"category": code(fields[1]), "type": code(fields[2]), "modifier": code(fields[3]), "region": code(fields[5])}


def segment_description(number: int, channel: str, provenance: Provenance):
    """The SEG segment of ``channel`` (``segments.SEGMENTS``): label, codes, colour and the algorithm that made it."""
    hd = highdicom()
    segment = SEGMENTS[channel]
    codes = terminology_codes(segment.terminology)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=provenance.model_name[:64], family=hd.sr.CodedConcept("123110", "DCM", "Artificial Intelligence"),
        version=provenance.model_sha256[:64] or "unknown", source=provenance.software,
        parameters={"model_sha256": provenance.model_sha256 or "unknown"})
    description = hd.seg.SegmentDescription(
        segment_number=number, segment_label=segment.name, segmented_property_category=codes["category"],
        segmented_property_type=codes["type"], algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm, tracking_uid=hd.UID(), tracking_id=f"{segment.name} ({provenance.model_name})"[:64],
        anatomic_regions=[codes["region"]] if codes["region"] is not None and channel != "lung" else None,
        display_color=hd.color.CIELabColor(*rgb_to_cielab(segment.color)))
    if codes["modifier"] is not None:  # e.g. COVID-19 on Infiltrate, as dcmqi and Slicer write it
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [codes["modifier"]]
    return description


def rgb_to_cielab(rgb: tuple[float, float, float]) -> tuple[float, float, float]:
    """sRGB in 0..1 → CIE L*a*b* (D65), as DICOM's Recommended Display CIELab Value wants it."""
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb]
    matrix = ((0.4124564, 0.3575761, 0.1804375), (0.2126729, 0.7151522, 0.0721750), (0.0193339, 0.1191920, 0.9503041))
    xyz = [sum(m * c for m, c in zip(row, linear)) / white for row, white in zip(matrix, (0.95047, 1.0, 1.08883))]
    f = [t ** (1 / 3) if t > (6 / 29) ** 3 else t / (3 * (6 / 29) ** 2) + 4 / 29 for t in xyz]
    return 116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])


def build_segmentation(masks: dict[str, sitk.Image], sources: list, provenance: Provenance, series_number: int = 901):
    """A binary ``highdicom.seg.Segmentation`` of ``masks`` (``{"lesion": …, "lung": …}``, uint8 0/1 on the grid of the
    image read from ``sources``) referencing the source series ``sources`` (pydicom datasets, headers suffice; a missing
    Slice Thickness is filled in there with the slice spacing)."""
    hd = highdicom()
    channels = [channel for channel in ("lesion", "lung") if channel in masks]
    reference = masks["lesion"]
    indices = source_slice_indices(sources, reference)
    volumes = [sitk.GetArrayViewFromImage(masks[channel]) > 0 for channel in channels]
    pixels = np.stack([np.stack([volume[k] for k in indices]) for volume in volumes], axis=-1).astype(np.uint8)
    for dataset in sources:  # type 2 in CT (may be absent or empty), but highdicom needs it: the slice spacing then
        if not getattr(dataset, "SliceThickness", None):
            dataset.SliceThickness = f"{reference.GetSpacing()[2]:.6g}"
    return hd.seg.Segmentation(
        source_images=sources, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment_description(number, channel, provenance) for number, channel in enumerate(channels, 1)],
        series_instance_uid=hd.UID(), series_number=series_number, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer=MANUFACTURER, manufacturer_model_name=provenance.model_name[:64], software_versions=provenance.software,
        device_serial_number=(provenance.model_sha256 or "unknown")[:64],
        content_description=f"COVID-19 lesions, {provenance.model_name}"[:64], content_label="COVID_LESIONS",
        series_description=f"COVIDLesionSeg {provenance.model_name}"[:64])


# The reported measures: statistics field → (segment it is about, concept name, side, unit). Volumes, means and SDs
# have standard SNOMED CT codes; the percentages of opacity have none, so they take the private scheme.
UNITS = {"mL": ("mL", "UCUM", "milliliter"), "%": ("%", "UCUM", "percent"), "HU": ("[hnsf'U]", "UCUM", "Hounsfield unit")}
VOLUME, MEAN, SD = ("118565006", "SCT", "Volume"), ("373098007", "SCT", "Mean"), ("386136009", "SCT", "Standard Deviation")
RIGHT, LEFT = ("24028007", "SCT", "Right"), ("7771000", "SCT", "Left")
PERCENT_OPACITY = ("PO", PRIVATE_SCHEME, "Percentage of lung volume with opacity (PO)")
HIGH_OPACITY = ("HOV", PRIVATE_SCHEME, "Volume of high opacity")
PERCENT_HIGH_OPACITY = ("PHO", PRIVATE_SCHEME, "Percentage of lung volume with high opacity (PHO)")
REPORTED = {
    "lesion_ml": ("lesion", VOLUME, None),
    "right_lesion_ml": ("lesion", VOLUME, RIGHT),
    "left_lesion_ml": ("lesion", VOLUME, LEFT),
    "percent_opacity": ("lesion", PERCENT_OPACITY, None),
    "right_percent_opacity": ("lesion", PERCENT_OPACITY, RIGHT),
    "left_percent_opacity": ("lesion", PERCENT_OPACITY, LEFT),
    "high_opacity_ml": ("lesion", HIGH_OPACITY, None),
    "percent_high_opacity": ("lesion", PERCENT_HIGH_OPACITY, None),
    "lesion_mean_hu": ("lesion", MEAN, None),
    "lesion_sd_hu": ("lesion", SD, None),
    "lung_ml": ("lung", VOLUME, None),
    "right_lung_ml": ("lung", VOLUME, RIGHT),
    "left_lung_ml": ("lung", VOLUME, LEFT),
    "lung_mean_hu": ("lung", MEAN, None),
    "lung_sd_hu": ("lung", SD, None),
}
LUNG = ("39607008", "SCT", "Lung")
SEVERITY = ("246112005", "SCT", "Severity")
PROCEDURE = ("24627-2", "LN", "CT Chest")
FINDINGS = {"lesion": ("47351003", "SCT", "Infiltrate"), "lung": LUNG}


def severity_code(category: str) -> tuple[str, str, str]:
    """The private code of a MosMed category, its meaning in ASCII (e.g. ``CT-2: 25 % <= PO < 50 %``)."""
    return category, PRIVATE_SCHEME, f"MosMed {category}: {SEVERITY_DEFINITIONS[category]}".replace("≤", "<=").replace(
        "≥", ">=").replace("percent_opacity", "PO")[:64]


def build_measurement_report(statistics: LesionStatistics, segmentation, sources: list, provenance: Provenance,
                             series_number: int = 902):
    """A ``highdicom.sr.Comprehensive3DSR`` holding a TID 1500 measurement report of ``statistics``, one volumetric
    ROI group per segment of ``segmentation`` (the SEG made by :func:`build_segmentation` from ``sources``); measures
    that are not available are left out."""
    hd = highdicom()
    concept = hd.sr.CodedConcept
    lung_site = concept(*LUNG)
    algorithm = hd.sr.AlgorithmIdentification(name=provenance.model_name[:64], version=provenance.model_sha256[:64] or "unknown")
    numbers = {segment.segment_label: segment.segment_number for segment in segmentation.SegmentSequence}
    values = statistics.to_dict()
    groups = []
    for channel in ("lesion", "lung"):
        measurements = []
        for name, (about, code, side) in REPORTED.items():
            value = values[name]
            if about != channel or value is None or not math.isfinite(value):
                continue
            finding_site = hd.sr.FindingSite(lung_site, laterality=concept(*side) if side else None)
            unit = concept(*UNITS[MEASURES_BY_NAME[name].unit])
            measurements.append(hd.sr.Measurement(name=concept(*code), value=float(value), unit=unit, finding_sites=[finding_site],
                                                  algorithm_id=algorithm))
        evaluations = []
        if channel == "lesion" and statistics.severity is not None:
            evaluations.append(hd.sr.QualitativeEvaluation(concept(*SEVERITY), concept(*severity_code(statistics.severity))))
        if not measurements and not evaluations:
            continue
        tracking = hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"{SEGMENTS[channel].name} measurements")
        common = dict(tracking_identifier=tracking, finding_type=concept(*FINDINGS[channel]), finding_sites=[hd.sr.FindingSite(lung_site)],
                      algorithm_id=algorithm, measurements=measurements or None, qualitative_evaluations=evaluations or None)
        number = numbers.get(SEGMENTS[channel].name)
        if number is not None:
            groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                referenced_segment=hd.sr.ReferencedSegment(  # the whole segment (from_segmentation fails on one-segment SEGs)
                    segmentation.SOPClassUID, segmentation.SOPInstanceUID, number,
                    source_series=hd.sr.SourceSeriesForSegmentation(segmentation.ReferencedSeriesSequence[0].SeriesInstanceUID)),
                **common))
        else:  # the segment was not written (--no-lung): the measures are about the source images
            groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(**common))
    device = hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name=provenance.software, manufacturer_name=MANUFACTURER, model_name=provenance.model_name[:64]))
    report = hd.sr.MeasurementReport(observation_context=hd.sr.ObservationContext(observer_device_context=device),
                                     procedure_reported=concept(*PROCEDURE), imaging_measurements=groups)
    document = hd.sr.Comprehensive3DSR(
        evidence=[segmentation, *sources], content=report[0], series_instance_uid=hd.UID(), series_number=series_number,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER, is_complete=True,
        series_description=f"COVIDLesionSeg measurements, {provenance.model_name}"[:64])
    from pydicom.dataset import Dataset

    scheme = Dataset()  # the private coding scheme, identified as PS3.3 C.12.1.1.2 asks
    scheme.CodingSchemeDesignator, scheme.CodingSchemeName = PRIVATE_SCHEME, "COVIDLesionSeg measures"
    scheme.CodingSchemeResponsibleOrganization = MANUFACTURER
    document.CodingSchemeIdentificationSequence = [scheme]
    return document


def read_measurement_report(path: str | Path) -> dict:
    """``{measure name: value}`` of a report written by :func:`build_measurement_report` (``severity``: the category)."""
    hd = highdicom()
    report = hd.sr.MeasurementReport.from_sequence(hd.sr.srread(str(path)).content)
    names = {(about, code[0], side[0] if side else None): name for name, (about, code, side) in REPORTED.items()}
    values: dict = {}
    groups = [*report.get_volumetric_roi_measurement_groups(), *report.get_image_measurement_groups()]
    for group in groups:
        channel = next(channel for channel, finding in FINDINGS.items() if group.finding_type.value == finding[0])
        for measurement in group.get_measurements():
            sites = measurement.finding_sites
            side = sites[0].laterality.value if sites and sites[0].laterality is not None else None
            values[names[(channel, measurement.name.value, side)]] = measurement.value
        for evaluation in group.get_qualitative_evaluations():
            if evaluation.name.value == SEVERITY[0]:
                values["severity"] = evaluation.value.value
    return values


def write_dataset(path: str | Path, dataset, before_commit=None) -> Path:
    """Write a DICOM ``dataset`` to ``path`` atomically (``before_commit(temporary)`` as in ``io.write_segmentation``)."""
    path = Path(path)
    with io.atomic_output(path) as temporary:
        dataset.save_as(str(temporary), enforce_file_format=True)
        if before_commit is not None:
            before_commit(temporary)
    return path
