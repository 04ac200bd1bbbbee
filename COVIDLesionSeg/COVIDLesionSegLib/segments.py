"""The segments this tool writes: name, recommended colour and standard terminology (DICOM / SNOMED CT).

The lesion is coded as SlicerTotalSegmentator codes COVID-19 lesions: category "Morphologically Altered
Structure", type "Infiltrate", modifier "COVID-19", anatomic region "Lung". The same codes, names and
colours are in ``Resources/Terminology/COVIDLesionSeg.term.json`` for Slicer's terminology logic.
"""

from __future__ import annotations

from dataclasses import dataclass

TERMINOLOGY_CONTEXT = "Segmentation category and type - COVIDLesionSeg"
ANATOMY_CONTEXT = "Anatomic codes - DICOM master list"


@dataclass(frozen=True)
class SegmentDefinition:
    channel: str  # model output channel, e.g. "lesion"
    name: str  # segment name shown in Slicer
    color: tuple[float, float, float]  # recommended display colour, RGB in 0..1
    terminology: str  # Slicer terminology entry string

    def slicerio_segment(self) -> dict:
        """The segment fields slicerio writes into a ``.seg.nrrd`` header."""
        from slicerio.segmentation import terminology_entry_from_string

        return {"id": self.channel, "name": self.name, "color": list(self.color),
                "terminology": terminology_entry_from_string(self.terminology)}


LESION = SegmentDefinition(
    channel="lesion",
    name="COVID-19 lesion",
    color=(0.85, 0.33, 0.10),
    terminology=(
        f"{TERMINOLOGY_CONTEXT}~SCT^49755003^Morphologically Altered Structure~SCT^47351003^Infiltrate"
        f"~SCT^840539006^COVID-19~{ANATOMY_CONTEXT}~SCT^39607008^Lung~^^"
    ),
)
LUNG = SegmentDefinition(
    channel="lung",
    name="Lung",
    color=(0.77, 0.69, 0.49),
    terminology=f"{TERMINOLOGY_CONTEXT}~SCT^123037004^Anatomical Structure~SCT^39607008^Lung~^^~~^^~^^",
)
SEGMENTS = {segment.channel: segment for segment in (LESION, LUNG)}
