"""The model's answer as DICOM objects (highdicom): a TID 1500 measurement report in a
Comprehensive 3D SR, and a binary SEG of the served mask.

Why these objects: a PACS viewer shows an SR's finding with its region drawn on the source image
and a SEG as an overlay, and both stay linked to the source instance (same study, explicit
references). The labels are free text chosen by the user, so no standard terminology applies:
each label becomes a code in a local coding scheme (`LOCAL_SCHEME`, the "99" prefix marks it
private, PS3.16 8.2) whose value is a hash of the exact label text (the same text gets the same
code across reports) and whose meaning is the text itself; the full, untruncated text is also
stored as a free-text qualitative evaluation.

Coordinates: SCOORD values are (column, row) pixels of the source image with (0, 0) at the
top-left corner of the top-left pixel, which is the convention of the model's prompts (x =
column, y = row); they are written unchanged.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

__all__ = [
    "LOCAL_SCHEME",
    "Finding",
    "Graphic",
    "build_seg",
    "build_sr",
    "check_seg_possible",
    "label_concept",
    "region_graphic",
]

LOCAL_SCHEME = "99MEDPCLIP"  # private coding scheme designator for the labels we generate
MANUFACTURER = "MedP-CLIP"
ALGORITHM = "MedP-CLIP"
SR_SERIES_NUMBER = 9901
SEG_SERIES_NUMBER = 9902
MAX_LO = 64  # Long String: Code Meaning, Segment Label

UNITLESS = Code("1", "UCUM", "no units")
WHOLE_IMAGE_PROBABILITY = Code("IMAGEPROB", LOCAL_SCHEME, "Whole-image probability of finding")
PREDICTED_IOU = Code("MASKIOU", LOCAL_SCHEME, "Predicted mask IoU")
# TID 1419/1501 row for free-text qualitative evaluations
FREE_TEXT_EVALUATION = Code("C0034375", "UMLS", "Qualitative Evaluations")

# Type 2 Patient/Study attributes that highdicom copies from the source; archives (and our
# synthetic phantoms) often leave them out, and an absent type 2 attribute means "unknown",
# which is what an empty value says too.
_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


@dataclass(frozen=True)
class Graphic:
    """An SCOORD region: graphic type (POINT, MULTIPOINT, POLYLINE) and (column, row) rows."""

    graphic_type: str
    data: np.ndarray  # float [N, 2]


@dataclass(frozen=True)
class Finding:
    """What the model said about the region: the best label and its numbers."""

    label: str
    probability: float  # region probability of `label` among the candidate labels
    image_probability: float | None  # whole-image probability of `label`
    iou: float  # the model's estimate of its mask's IoU
    graphic: Graphic  # the prompted region


def label_concept(label: str):  # -> highdicom.sr.CodedConcept
    """The coded concept for a free-text label in the local scheme (see the module doc)."""
    from highdicom.sr import CodedConcept

    text = label.strip()
    value = "L" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:15].upper()  # SH: 16
    return CodedConcept(value, LOCAL_SCHEME, text[:MAX_LO] or "(empty label)")


def region_graphic(
    points: Sequence[tuple[float, float]] | None,
    box: tuple[float, float, float, float] | None,
    rows: int,
    columns: int,
) -> Graphic:
    """The prompt as an SCOORD graphic: one point -> POINT, several -> MULTIPOINT, a box -> a
    closed POLYLINE (5 vertices), nothing -> the whole image's outline (the model then scored
    the whole image)."""
    if box is not None:
        x0, y0, x1, y1 = (float(v) for v in box)
    elif points:
        data = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        return Graphic("POINT" if len(data) == 1 else "MULTIPOINT", data)
    else:
        x0, y0, x1, y1 = 0.0, 0.0, float(columns), float(rows)
    data = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float64)
    return Graphic("POLYLINE", data)


def evidence_copy(source: Dataset) -> Dataset:
    """`source` without its pixel data and with missing type 2 Patient/Study attributes
    present and empty, for highdicom (which reads them unconditionally). A new dataset, so
    the caller's stays untouched; the element objects are shared, not copied."""
    out = Dataset()
    for elem in source:
        if elem.keyword not in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            out.add(elem)
    if hasattr(source, "file_meta"):
        out.file_meta = source.file_meta
    for keyword in _TYPE2:
        if keyword not in out:
            setattr(out, keyword, None)
    return out


def _uid(seed: str | None, role: str) -> str:
    """A fresh UID, or with `seed` a deterministic one (same request -> same UIDs, so that a
    resumed batch re-stores the same objects instead of adding duplicates)."""
    return generate_uid(entropy_srcs=[seed, role]) if seed else generate_uid()


def _algorithm_version() -> str:
    from .. import __version__

    return __version__


def build_sr(
    source: Dataset, finding: Finding | Sequence[Finding], uid_seed: str | None = None
) -> Dataset:
    """A Comprehensive 3D SR holding a TID 1500 measurement report with one planar ROI group
    per finding (several findings: several regions of the one source image, in order, each
    with its own tracking identifier "MedP-CLIP finding N"): finding = the label (local code),
    region = the prompt as SCOORD on the source image, the region probability (DCM 122157
    "Probability", unitless), the whole-image probability and the predicted IoU, and the
    label's full text as a free-text qualitative evaluation."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    evidence = evidence_copy(source)
    version = _algorithm_version()
    algorithm = hd.sr.AlgorithmIdentification(name=ALGORITHM, version=version)
    findings = [finding] if isinstance(finding, Finding) else list(finding)
    if not findings:
        raise ValueError("an SR needs at least one finding")
    several = len(findings) > 1
    groups = [
        _roi_group(evidence, f, algorithm, uid_seed, (i + 1) if several else None)
        for i, f in enumerate(findings)
    ]
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=[ALGORITHM, version]),
            name=ALGORITHM,
            manufacturer_name=MANUFACTURER,
            model_name=ALGORITHM,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[evidence],
        content=report,
        series_instance_uid=_uid(uid_seed, "sr-series"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=_uid(uid_seed, "sr"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        series_description="MedP-CLIP findings",
    )
    return sr


def _roi_group(evidence: Dataset, finding: Finding, algorithm, uid_seed: str | None, number):
    """One TID 1410 planar ROI measurement group; `number` (1-based) tells the groups of a
    several-region report apart (None: the report's only group, named as it always was)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    concept = label_concept(finding.label)
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues(finding.graphic.graphic_type),
        graphic_data=finding.graphic.data,
        source_image=hd.sr.SourceImageForRegion.from_source_image(evidence),
    )
    measurements = [
        hd.sr.Measurement(
            name=codes.DCM.Probability,
            value=float(finding.probability),
            unit=UNITLESS,
            algorithm_id=algorithm,
        ),
        hd.sr.Measurement(
            name=PREDICTED_IOU, value=float(finding.iou), unit=UNITLESS, algorithm_id=algorithm
        ),
    ]
    if finding.image_probability is not None:
        measurements.insert(
            1,
            hd.sr.Measurement(
                name=WHOLE_IMAGE_PROBABILITY,
                value=float(finding.image_probability),
                unit=UNITLESS,
                algorithm_id=algorithm,
            ),
        )
    tracking = "tracking" if number is None else f"tracking-{number}"
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=_uid(uid_seed, tracking),
            identifier="MedP-CLIP finding" if number is None else f"MedP-CLIP finding {number}",
        ),
        referenced_region=region,
        finding_type=concept,
        algorithm_id=algorithm,
        measurements=measurements,
    )
    group[0].ContentSequence.append(
        hd.sr.TextContentItem(
            name=FREE_TEXT_EVALUATION,
            value=finding.label,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    return group


def build_seg(
    source: Dataset,
    mask: np.ndarray | Sequence[np.ndarray],
    label: str | Sequence[str],
    uid_seed: str | None = None,
) -> Dataset:
    """A binary DICOM SEG of `mask` (rows x columns of the source, nonzero = region) with one
    segment labelled with the finding, referencing the source instance. Several regions: a
    list of masks and a list of labels, one segment each (numbered 1, 2, ... in order; the
    segments may overlap). Empty masks are written too (all frames kept), so that "no region
    found" is stored, not lost."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    version = _algorithm_version()
    several = not isinstance(label, str)
    masks = list(mask) if several else [mask]
    labels = list(label) if several else [label]
    if len(masks) != len(labels) or not masks:
        raise ValueError(f"{len(masks)} masks for {len(labels)} labels")
    segments = [
        hd.seg.SegmentDescription(
            segment_number=i,
            segment_label=text.strip()[:MAX_LO] or "region",
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=label_concept(text),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=hd.AlgorithmIdentificationSequence(
                name=ALGORITHM, family=codes.DCM.ArtificialIntelligence, version=version
            ),
        )
        for i, text in enumerate(labels, 1)
    ]
    if several:  # (frames = 1, rows, columns, segments)
        pixels = np.stack([np.asarray(m) != 0 for m in masks], axis=-1)[None]
    else:
        pixels = np.asarray(masks[0]) != 0
    return hd.seg.Segmentation(
        source_images=[evidence_copy(source)],
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=_uid(uid_seed, "seg-series"),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=_uid(uid_seed, "seg"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=ALGORITHM,
        software_versions=version,
        device_serial_number="0",
        content_label="MEDPCLIP",
        content_description="MedP-CLIP region mask",
        series_description="MedP-CLIP region mask",
        omit_empty_frames=False,  # single frame: an empty mask is an answer too
    )


def check_seg_possible(source: Dataset) -> str | None:
    """None if a SEG can reference `source`, else highdicom's reason. A dry run with an empty
    mask, so that an impossible SEG is found BEFORE inference and before anything is stored
    (e.g. a CT instance without the Frame of Reference UID its IOD requires)."""
    rows, columns = int(source.get("Rows", 0) or 0), int(source.get("Columns", 0) or 0)
    try:
        build_seg(source, np.zeros((rows, columns), np.uint8), "check")
    except Exception as exc:  # noqa: BLE001 - any failure means: no SEG for this source
        return str(exc) or type(exc).__name__
    return None
