"""The model's answer as DICOM objects (highdicom): a TID 1500 measurement report in a
Comprehensive 3D SR, and a binary SEG of the served masks, linked to each other.

Why these objects: a PACS viewer shows an SR's finding with its region on the source image and
a SEG as an overlay, and both stay linked to the source instance (same study, explicit
references). The labels are free text chosen by the user, so no standard terminology applies:
each label becomes a code in a local coding scheme (`LOCAL_SCHEME`, the "99" prefix marks it
private, PS3.16 8.2; declared in every object's Coding Scheme Identification Sequence) whose
value is a hash of the exact label text (the same text gets the same code across reports) and
whose meaning is the text itself; the full, untruncated text is also stored as a free-text
qualitative evaluation.

One region = one TID 1410 planar ROI measurement group (and one SEG segment). The group's ROI
is the model's predicted region: with a SEG, a reference to the SEG frame holding the region's
segment (the SEG segment and the group share a tracking UID and identifier, so a viewer links
finding and mask both ways); without one, the outline of the served mask as a closed SCOORD
POLYLINE (`geometry.outline`). The prompt (points, box, or the outline of a prompt mask) is
kept beside it as an SCOORD: points as DCM "Seed point" (POINT, or MULTIPOINT, which TID 1410
does not allow as the ROI itself), a box or a prompt mask's outline as a local "Region prompt".

Model identity: every object names the served model as the server states it
(`ModelIdentity`, from the repository's parameters): Manufacturer's Model Name, Software
Versions, Device Serial Number (the weights' digest prefix), the algorithm identification of
each TID 1500 measurement and SEG segment (its parameters carry the full SHA-256), and the SR's
observer device.

What is copied from the source, and why not everything: highdicom copies the Patient and Study
modules of its source whole, non-conformant optional values included, which then read as our
errors. The source's patient/study attributes are replaced by `_patient_and_study`: the
identifying ones as they are (the archive files the report with its study by them), the others
only when valid (a de-identification flag only with its method, a weight or size only when
positive, dates and ages only when well-formed).

Coordinates: SCOORD values are (column, row) in DICOM's image-relative convention (PS3.3
C.18.6.1.2: (0, 0) is the top-left corner of the top-left pixel), which is the convention of
the model's prompts (x = column, y = row); prompts are written unchanged.

Patient attributes never reach a log or an output stream from here: library warnings raised
while the objects are built (highdicom quotes patient names it finds dubious) are captured and
logged without their text.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import hashlib
import logging
import re
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from pydicom import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from .geometry import outline

__all__ = [
    "LOCAL_SCHEME",
    "Finding",
    "Graphic",
    "ModelIdentity",
    "build_reports",
    "build_seg",
    "build_sr",
    "check_seg_possible",
    "label_concept",
    "mask_outline",
    "redact",
    "region_graphic",
]

LOG = logging.getLogger("medpclip_client.pacs")

LOCAL_SCHEME = "99MEDPCLIP"  # private coding scheme designator for the labels we generate
LOCAL_SCHEME_NAME = "MedP-CLIP labels and measurements"
MANUFACTURER = "MedP-CLIP"
SR_SERIES_NUMBER = 9901
SEG_SERIES_NUMBER = 9902
MAX_LO = 64  # Long String: Code Meaning, Segment Label, Software Versions, Algorithm Version
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"

UNITLESS = Code("1", "UCUM", "no units")
WHOLE_IMAGE_PROBABILITY = Code("IMAGEPROB", LOCAL_SCHEME, "Whole-image probability of finding")
PREDICTED_IOU = Code("MASKIOU", LOCAL_SCHEME, "Predicted mask IoU")
REGION_PROMPT = Code("PROMPT", LOCAL_SCHEME, "Region prompt")  # a box or a mask
SEED_POINT = Code("128139", "DCM", "Seed point")  # point prompts: seeds of the segmentation
# TID 1419/1501 row for free-text qualitative evaluations
FREE_TEXT_EVALUATION = Code("C0034375", "UMLS", "Qualitative Evaluations")

# The server's identity parameters (medpclip.repository.IDENTITY_KEYS, read by
# MedPClipClient.model_identity).
IDENTITY_KEYS = ("model_name", "model_config", "checkpoint_sha256", "medpclip_version")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# what may go into an LO value: printable ASCII without the value separator
_TEXT = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,40}")


# --- the model ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelIdentity:
    """The served model as its repository names it: model name, config name, SHA-256 of the
    checkpoint's weights and the medpclip version that exported it (server side), plus this
    client's version (`client_version`), which builds the objects."""

    name: str
    config: str
    checkpoint_sha256: str
    version: str
    client_version: str = ""

    @classmethod
    def from_server(cls, parameters: Mapping[str, str]) -> ModelIdentity:
        """From `MedPClipClient.model_identity()`; ValueError when a value is missing or not
        usable in a DICOM attribute (the message names the parameter, not its value)."""
        from .. import __version__

        missing = [k for k in IDENTITY_KEYS if not str(parameters.get(k, "")).strip()]
        if missing:
            raise ValueError(
                "the server's model repository does not state "
                + ", ".join(missing)
                + " (parameters of the called ensemble's config): re-export the model with "
                "this version of medpclip"
            )
        values = {k: str(parameters[k]).strip() for k in IDENTITY_KEYS}
        if not _SHA256.fullmatch(values["checkpoint_sha256"].lower()):
            raise ValueError("the server's checkpoint_sha256 is not a SHA-256 digest")
        for key in ("model_name", "model_config", "medpclip_version"):
            if not _TEXT.fullmatch(values[key]):
                raise ValueError(
                    f"the server's {key} is not 1-40 printable ASCII characters without '\\'"
                )
        return cls(
            name=values["model_name"],
            config=values["model_config"],
            checkpoint_sha256=values["checkpoint_sha256"].lower(),
            version=values["medpclip_version"],
            client_version=__version__,
        )

    @property
    def short_digest(self) -> str:
        return self.checkpoint_sha256[:16]

    @property
    def model_name(self) -> str:
        """Manufacturer's Model Name: the model and its config, e.g. "MedP-CLIP tiny"."""
        return f"{self.name} {self.config}"

    @property
    def algorithm_version(self) -> str:
        """Algorithm Version (LO): package, config and weights, e.g.
        "0.1.0 tiny sha256:1e411d2b4cdd70b6" (the full digest is in `parameters`)."""
        return f"{self.version} {self.config} sha256:{self.short_digest}"

    @property
    def software_versions(self) -> list[str]:
        """Software Versions: the served model (package, config + weights) and this client."""
        values = [f"{self.name} {self.version}", f"{self.config} sha256:{self.short_digest}"]
        if self.client_version:
            values.append(f"medpclip-client {self.client_version}")
        return values

    @property
    def parameters(self) -> dict[str, str]:
        return {
            "model": self.name,
            "config": self.config,
            "checkpoint_sha256": self.checkpoint_sha256,
            "medpclip_version": self.version,
            **({"medpclip_client_version": self.client_version} if self.client_version else {}),
        }

    @property
    def device_uid(self) -> str:
        """The SR observer device: the same weights and config are the same device."""
        return generate_uid(entropy_srcs=[self.name, self.config, self.checkpoint_sha256])


# --- what the model said -----------------------------------------------------------------------


@dataclass(frozen=True)
class Graphic:
    """An SCOORD graphic: graphic type (POINT, MULTIPOINT, POLYLINE) and (column, row) rows."""

    graphic_type: str
    data: np.ndarray  # float [N, 2]


@dataclass(frozen=True)
class Finding:
    """What the model said about one region: the best label and its numbers, the prompt
    (`graphic`; the image outline when nothing was prompted, `prompted` False) and the
    outline of the served mask (None when the mask is empty)."""

    label: str
    probability: float  # region probability of `label` among the candidate labels
    image_probability: float | None  # whole-image probability of `label`
    iou: float  # the model's estimate of its mask's IoU
    graphic: Graphic  # the prompted region
    outline: Graphic | None = None  # the predicted region
    prompted: bool = True


def label_concept(label: str):  # -> highdicom.sr.CodedConcept
    """The coded concept for a free-text label in the local scheme (see the module doc)."""
    from highdicom.sr import CodedConcept

    text = label.strip()
    value = "L" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:15].upper()  # SH: 16
    return CodedConcept(value, LOCAL_SCHEME, text[:MAX_LO] or "(empty label)")


def mask_outline(mask: np.ndarray | None) -> Graphic | None:
    """The closed POLYLINE around the largest part of a mask, None for an empty one."""
    data = None if mask is None else outline(mask)
    return None if data is None else Graphic("POLYLINE", data)


def region_graphic(
    points: Sequence[tuple[float, float]] | None,
    box: tuple[float, float, float, float] | None,
    rows: int,
    columns: int,
    mask: np.ndarray | None = None,
) -> Graphic:
    """The prompt as an SCOORD graphic: one point -> POINT, several -> MULTIPOINT, a box -> a
    closed POLYLINE (5 vertices), a mask -> its outline, nothing -> the whole image's outline
    (the model then scored the whole image)."""
    if mask is not None:
        drawn = mask_outline(mask)
        if drawn is not None:
            return drawn
    if box is not None:
        x0, y0, x1, y1 = (float(v) for v in box)
    elif points:
        data = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        return Graphic("POINT" if len(data) == 1 else "MULTIPOINT", data)
    else:
        x0, y0, x1, y1 = 0.0, 0.0, float(columns), float(rows)
    data = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float64)
    return Graphic("POLYLINE", data)


def _roi_graphic(finding: Finding) -> Graphic:
    """What TID 1410 draws as the region when no SEG is referenced: the predicted outline;
    for an empty mask the prompt, where the template allows it (not MULTIPOINT: then the
    box the points span, half a pixel wider so that it is never degenerate)."""
    if finding.outline is not None:
        return finding.outline
    g = finding.graphic
    if g.graphic_type != "MULTIPOINT":
        return g
    (x0, y0), (x1, y1) = g.data.min(axis=0) - 0.5, g.data.max(axis=0) + 0.5
    data = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float64)
    return Graphic("POLYLINE", data)


# --- privacy: library warnings and messages --------------------------------------------------

_QUIET = threading.RLock()  # re-entrant: a capture may call code that captures too
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"|<[^>]*>")


def redact(text: str) -> str:
    """`text` with every quoted part ('...', "...", <...>) replaced by '...': pydicom and
    highdicom quote attribute values in their messages, which may be patient attributes."""
    return _QUOTED.sub("'...'", text)


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Capture the warnings raised inside (pydicom's and highdicom's quote attribute values,
    e.g. a patient name highdicom finds dubious) and log only their category and origin.
    Serialised by a lock: `warnings.catch_warnings` swaps process-wide state, and two threads
    overlapping their blocks could leave a capture installed."""
    with _QUIET, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for w in caught:
                LOG.info(
                    "withheld a %s from %s:%s (library warnings may quote patient attributes)",
                    w.category.__name__,
                    w.filename.rsplit("/", 1)[-1],
                    w.lineno,
                )


# --- the source's attributes -----------------------------------------------------------------

# Copied unchanged when present: they file the report with its patient and study.
_IDENTIFYING = (
    "PatientName",
    "PatientID",
    "StudyInstanceUID",
    "AccessionNumber",
    "StudyID",
    "ReferringPhysicianName",
)
# Type 2 attributes highdicom writes unconditionally: present and empty when absent or invalid
# (an empty type 2 value means "unknown").
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber")
_TYPE2 += ("StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName")
# Copied only when valid; type 2 ones (above) become empty, type 3 ones are left out.
_CHECKED = (
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "IssuerOfPatientID",
    "StudyDescription",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
)
_DEIDENTIFICATION = ("DeidentificationMethod", "DeidentificationMethodCodeSequence")
_PIXELS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _patient_study_tags() -> frozenset[int]:
    """Every root attribute of the modules highdicom copies from a source (Patient, Clinical
    Trial Subject, General Study, Patient Study, Clinical Trial Study), from highdicom's own
    tables, so that none reaches our objects unchecked."""
    from highdicom._standard_utils import get_module_attribute_map  # the tables it copies by
    from pydicom.datadict import tag_for_keyword

    table = get_module_attribute_map()
    modules = ("patient", "clinical-trial-subject", "general-study", "patient-study")
    modules += ("clinical-trial-study",)
    keywords = {str(i["keyword"]) for m in modules for i in table[m] if not i["path"]}
    return frozenset(t for t in (tag_for_keyword(k) for k in keywords) if t is not None)


_STRIPPED: frozenset[int] | None = None


def _valid(keyword: str, value: object) -> bool:
    """Whether a source value may be copied: its VR's rules (pydicom's validation, on the
    value's text: pydicom's own value types are not accepted there) and, where the format
    alone says too little, its meaning (a calendar date, a time of day, a positive weight or
    size, a sex of the enumerated values, an age)."""
    from pydicom import config
    from pydicom.datadict import dictionary_VR
    from pydicom.multival import MultiValue
    from pydicom.valuerep import validate_value

    if value is None or value == "":
        return False
    texts = [str(v) for v in value] if isinstance(value, MultiValue | list) else [str(value)]
    try:
        for text in texts:
            validate_value(dictionary_VR(keyword), text, config.RAISE)
            if keyword.endswith("Date"):
                datetime.datetime.strptime(text, "%Y%m%d")
            elif keyword.endswith("Time"):
                hh, mm, ss = text[:2], text[2:4] or "00", text[4:6] or "00"
                datetime.time(int(hh), int(mm), min(int(ss), 59))  # 60: a leap second
            elif keyword in ("PatientWeight", "PatientSize") and not float(text) > 0:
                return False
            elif keyword == "PatientSex" and text not in ("M", "F", "O"):
                return False
            elif keyword == "PatientAge" and not re.fullmatch(r"\d{3}[DWMY]", text):
                return False
    except (ValueError, TypeError, KeyError):
        return False
    return True


def _orientation(value: object) -> bool:
    """A valid Patient Orientation: two values of direction letters (A, P, R, L, H, F)."""
    values = [] if value is None else [value] if isinstance(value, str) else list(value)
    return len(values) == 2 and all(re.fullmatch(r"[APRLHF]{1,3}", str(v)) for v in values)


def _patient_and_study(source: Dataset, out: Dataset) -> None:
    """Put into `out` the source's patient and study attributes that our objects may carry
    (see the module doc)."""
    for keyword in _IDENTIFYING:
        if keyword in source:
            out[keyword] = copy.deepcopy(source[keyword])
    for keyword in _CHECKED:
        if keyword in source and _valid(keyword, source[keyword].value):
            out[keyword] = copy.deepcopy(source[keyword])
    removed = str(source.get("PatientIdentityRemoved", "") or "").upper()
    method = [k for k in _DEIDENTIFICATION if source.get(k)]
    # YES needs the method that removed it (PS3.3 C.7.1.1, type 1C); without one the flag
    # would be our error, and we cannot state a method we do not know
    if removed == "NO" or (removed == "YES" and method):
        out["PatientIdentityRemoved"] = copy.deepcopy(source["PatientIdentityRemoved"])
        for keyword in method if removed == "YES" else ():
            out[keyword] = copy.deepcopy(source[keyword])
    for keyword in _TYPE2:
        if keyword not in out:
            setattr(out, keyword, None)


def evidence_copy(source: Dataset) -> Dataset:
    """`source` without its pixel data, and with its patient/study attributes replaced by the
    ones our objects may carry (`_patient_and_study`), for highdicom, which copies them from
    here. A deep copy: highdicom adds elements of it to the objects, which we then amend."""
    global _STRIPPED
    if _STRIPPED is None:
        _STRIPPED = _patient_study_tags()
    out = Dataset()
    for elem in source:
        if elem.keyword not in _PIXELS and int(elem.tag) not in _STRIPPED:
            out.add(copy.deepcopy(elem))
    if hasattr(source, "file_meta"):
        out.file_meta = copy.deepcopy(source.file_meta)
    _patient_and_study(source, out)
    return out


def _frames(source: Dataset) -> int:
    return int(source.get("NumberOfFrames", 1) or 1)


def _has_geometry(source: Dataset) -> bool:
    return "FrameOfReferenceUID" in source


def _uid(seed: str | None, role: str) -> str:
    """A fresh UID, or with `seed` a deterministic one (same request -> same UIDs, so that a
    resumed batch re-stores the same objects instead of adding duplicates)."""
    return generate_uid(entropy_srcs=[seed, role]) if seed else generate_uid()


def _tracking(uid_seed: str | None, count: int) -> list[tuple[str, str]]:
    """(tracking UID, tracking identifier) per region, shared by its SR group and SEG segment;
    a single region keeps the names it always had."""
    if count == 1:
        return [(_uid(uid_seed, "tracking"), "MedP-CLIP finding")]
    return [
        (_uid(uid_seed, f"tracking-{n}"), f"MedP-CLIP finding {n}") for n in range(1, count + 1)
    ]


def _coding_schemes() -> list:
    from highdicom.coding_schemes import CodingSchemeIdentificationItem

    return [
        CodingSchemeIdentificationItem(
            LOCAL_SCHEME, name=LOCAL_SCHEME_NAME, responsible_organization=MANUFACTURER
        )
    ]


def _now() -> tuple[str, str]:
    now = datetime.datetime.now()
    return now.strftime("%Y%m%d"), now.strftime("%H%M%S")


# --- SEG -----------------------------------------------------------------------------------------


def _single_frame_view(evidence: Dataset) -> Dataset:
    """A multi-frame source without a Frame of Reference presented to highdicom as the
    single-frame Secondary Capture image it is for our purpose (one frame of it was read):
    highdicom refuses a SEG of a multi-frame source without one, and reads frame geometry from
    functional groups that legacy multi-frame images (US, XA, SC cine) do not have. The
    references are pointed back at the real instance and frame by `_point_at_frame`."""
    view = copy.deepcopy(evidence)
    for keyword in ("NumberOfFrames", "FrameIncrementPointer", "FrameTime", "FrameTimeVector"):
        if keyword in view:
            delattr(view, keyword)
    view.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
    return view


def _point_at_frame(seg: Dataset, source: Dataset, frame: int) -> None:
    """Every reference of `seg` to the source instance names its real SOP class, and each
    derivation reference (Source Image Sequence) the frame that was read."""
    uid = str(source.SOPInstanceUID)

    def walk(ds: Dataset) -> None:
        for elem in ds:
            if elem.VR != "SQ":
                continue
            for i, item in enumerate(elem.value):
                if str(item.get("ReferencedSOPInstanceUID", "")) == uid:
                    if elem.keyword == "SourceImageSequence":
                        # highdicom shares one item between sequences; only derivation
                        # references name a frame (a series' instance list has none)
                        item = elem.value[i] = copy.deepcopy(item)
                        item.ReferencedFrameNumber = frame
                    item.ReferencedSOPClassUID = source.SOPClassUID
                walk(item)

    walk(seg)


def build_seg(
    source: Dataset,
    masks: Sequence[np.ndarray],
    labels: Sequence[str],
    identity: ModelIdentity,
    uid_seed: str | None = None,
    frame: int | None = None,
    tracking: Sequence[tuple[str, str]] | None = None,
) -> Dataset:
    """A binary DICOM SEG with one segment per mask (rows x columns of the source, nonzero =
    region), labelled with its finding, numbered 1, 2, ... in order (segments may overlap),
    referencing the source instance (and `frame`, 1-based, of a multi-frame one). Empty masks
    are written too (all frames kept), so that "no region found" is stored, not lost."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    if len(masks) != len(labels) or not masks:
        raise ValueError(f"{len(masks)} masks for {len(labels)} labels")
    tracking = list(tracking) if tracking is not None else _tracking(uid_seed, len(masks))
    frames = _frames(source)
    if frames > 1 and frame is None:
        raise ValueError(f"the source has {frames} frames: say which one was read")
    algorithm = hd.AlgorithmIdentificationSequence(
        name=identity.name,
        family=codes.DCM.ArtificialIntelligence,
        version=identity.algorithm_version,
        parameters=identity.parameters,
    )
    segments = [
        hd.seg.SegmentDescription(
            segment_number=i,
            segment_label=text.strip()[:MAX_LO] or "region",
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=label_concept(text),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=uid,
            tracking_id=identifier,
        )
        for i, (text, (uid, identifier)) in enumerate(zip(labels, tracking, strict=True), 1)
    ]
    evidence = evidence_copy(source)
    stack = np.stack([np.asarray(m) != 0 for m in masks], axis=-1)  # rows, columns, segments
    legacy_multiframe = frames > 1 and not _has_geometry(source)
    if frames > 1 and not legacy_multiframe:
        # an enhanced multi-frame source: highdicom places frames by their plane positions;
        # only the frame read holds the masks, empty frames are left out
        pixels = np.zeros((frames, *stack.shape), dtype=bool)
        pixels[int(frame or 1) - 1] = stack
        omit_empty = True
    else:
        pixels, omit_empty = stack[None], False  # single frame: an empty mask is an answer too
    series_date, series_time = _now()
    with quiet_libraries():
        seg = hd.seg.Segmentation(
            source_images=[_single_frame_view(evidence) if legacy_multiframe else evidence],
            pixel_array=pixels,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=segments,
            series_instance_uid=_uid(uid_seed, "seg-series"),
            series_number=SEG_SERIES_NUMBER,
            sop_instance_uid=_uid(uid_seed, "seg"),
            instance_number=1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=identity.model_name,
            software_versions=identity.software_versions,
            device_serial_number=identity.short_digest,
            content_label="MEDPCLIP",
            content_description="MedP-CLIP region mask",
            series_description="MedP-CLIP region mask",
            omit_empty_frames=omit_empty,
            coding_schemes=_coding_schemes(),
            series_date=series_date,
            series_time=series_time,
            content_date=series_date,
            content_time=series_time,
        )
        if legacy_multiframe:
            _point_at_frame(seg, source, int(frame or 1))
        if not _has_geometry(source):
            # General Image: Patient Orientation is type 2C when nothing else orients the
            # image (no Frame of Reference), and highdicom leaves it out
            value = source.get("PatientOrientation")
            seg.PatientOrientation = value if _orientation(value) else None
    return seg


def _segment_frame(seg: Dataset, segment: int, source_frame: int | None) -> int | None:
    """The number of the SEG frame holding `segment` for the source frame read (None: none,
    e.g. an empty mask of an enhanced multi-frame source, whose empty frames are left out)."""
    shared = seg.get("SharedFunctionalGroupsSequence")
    shared_ids = shared[0].get("SegmentIdentificationSequence") if shared else None
    for i, group in enumerate(seg.PerFrameFunctionalGroupsSequence, 1):
        ids = group.get("SegmentIdentificationSequence") or shared_ids
        if not ids or int(ids[0].ReferencedSegmentNumber) != segment:
            continue
        if source_frame is None:
            return i
        for derivation in group.get("DerivationImageSequence", []):
            for ref in derivation.get("SourceImageSequence", []):
                if int(ref.get("ReferencedFrameNumber", 1) or 1) == source_frame:
                    return i
    return None


# --- SR ------------------------------------------------------------------------------------------


def build_sr(
    source: Dataset,
    findings: Sequence[Finding],
    identity: ModelIdentity,
    uid_seed: str | None = None,
    seg: Dataset | None = None,
    frame: int | None = None,
    tracking: Sequence[tuple[str, str]] | None = None,
) -> Dataset:
    """A Comprehensive 3D SR holding a TID 1500 measurement report with one planar ROI group
    per finding (several: several regions of the one source image, in order, each with its
    own tracking identifier "MedP-CLIP finding N"): finding = the label (local code), ROI = the
    predicted region (the `seg` frame of its segment, or the mask's outline), the prompt, the
    region probability (DCM 122157 "Probability", unitless), the whole-image probability and
    the predicted IoU, and the label's full text as a free-text qualitative evaluation."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    findings = list(findings)
    if not findings:
        raise ValueError("an SR needs at least one finding")
    tracking = list(tracking) if tracking is not None else _tracking(uid_seed, len(findings))
    evidence = evidence_copy(source)
    multiframe = _frames(source) > 1
    if multiframe and frame is None:
        raise ValueError(f"the source has {_frames(source)} frames: say which one was read")
    frames = [int(frame or 1)] if multiframe else None
    algorithm = hd.sr.AlgorithmIdentification(
        name=identity.name,
        version=identity.algorithm_version,
        parameters=[f"{k}={v}" for k, v in identity.parameters.items()],
    )
    series_date, series_time = _now()
    with quiet_libraries():
        groups = [
            _roi_group(evidence, f, algorithm, track, seg, i, frames)
            for i, (f, track) in enumerate(zip(findings, tracking, strict=True), 1)
        ]
        observer = hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=identity.device_uid,
                name=identity.name,
                manufacturer_name=MANUFACTURER,
                model_name=identity.model_name,
                serial_number=identity.short_digest,
            ),
        )
        report = hd.sr.MeasurementReport(
            observation_context=hd.sr.ObservationContext(observer_device_context=observer),
            procedure_reported=codes.SCT.ImagingProcedure,
            imaging_measurements=groups,
        )
        sr = hd.sr.Comprehensive3DSR(
            # the SEG is evidence too: the report references it, so its header lists it
            evidence=[evidence] if seg is None else [evidence, seg],
            content=report,
            series_instance_uid=_uid(uid_seed, "sr-series"),
            series_number=SR_SERIES_NUMBER,
            sop_instance_uid=_uid(uid_seed, "sr"),
            instance_number=1,
            manufacturer=MANUFACTURER,
            series_description="MedP-CLIP findings",
            manufacturer_model_name=identity.model_name,
            software_versions=identity.software_versions,
            device_serial_number=identity.short_digest,
            coding_schemes=_coding_schemes(),
            series_date=series_date,
            series_time=series_time,
        )
    return sr


def _roi_group(
    evidence: Dataset,
    finding: Finding,
    algorithm,
    tracking: tuple[str, str],
    seg: Dataset | None,
    segment: int,
    frames: list[int] | None,
):
    """One TID 1410 planar ROI measurement group (see `build_sr`)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    seg_frame = None if seg is None else _segment_frame(seg, segment, frames[0] if frames else None)
    region = segment_ref = None
    if seg is not None and seg_frame is not None:
        segment_ref = hd.sr.ReferencedSegmentationFrame(
            sop_class_uid=SEGMENTATION_STORAGE,
            sop_instance_uid=str(seg.SOPInstanceUID),
            frame_number=seg_frame,
            segment_number=segment,
            source_image=hd.sr.SourceImageForSegmentation(
                str(evidence.SOPClassUID), str(evidence.SOPInstanceUID), frames
            ),
        )
        # The Image Reference Macro (PS3.3 C.18.4) names a SEG frame OR segments, never both
        # (dciodvfy: an Error); the frame is the template's reference and belongs to exactly
        # one segment (and the segment shares this group's tracking UID)
        del segment_ref[0].ReferencedSOPSequence[0].ReferencedSegmentNumber
    else:
        roi = _roi_graphic(finding)
        region = hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues(roi.graphic_type),
            graphic_data=roi.data,
            source_image=hd.sr.SourceImageForRegion.from_source_image(evidence, frames),
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
    uid, identifier = tracking
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uid, identifier=identifier),
        referenced_region=region,
        referenced_segment=segment_ref,
        finding_type=label_concept(finding.label),
        algorithm_id=algorithm,
        measurements=measurements,
    )
    items = group[0].ContentSequence
    if finding.prompted:
        points = finding.graphic.graphic_type in ("POINT", "MULTIPOINT")
        prompt = hd.sr.ScoordContentItem(
            name=SEED_POINT if points else REGION_PROMPT,
            graphic_type=hd.sr.GraphicTypeValues(finding.graphic.graphic_type),
            graphic_data=finding.graphic.data,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
        prompt.ContentSequence = [hd.sr.SourceImageForRegion.from_source_image(evidence, frames)]
        items.append(prompt)
    items.append(
        hd.sr.TextContentItem(
            name=FREE_TEXT_EVALUATION,
            value=finding.label,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    return group


def build_reports(
    source: Dataset,
    findings: Sequence[Finding],
    identity: ModelIdentity,
    masks: Sequence[np.ndarray] | None = None,
    uid_seed: str | None = None,
    frame: int | None = None,
) -> tuple[Dataset, Dataset | None]:
    """The SR and, with `masks` (one per finding), the SEG it references: built together so
    that each SR group and its SEG segment share one tracking UID."""
    tracking = _tracking(uid_seed, len(findings))
    seg = None
    if masks is not None:
        labels = [f.label for f in findings]
        seg = build_seg(source, masks, labels, identity, uid_seed, frame, tracking)
    sr = build_sr(source, findings, identity, uid_seed, seg, frame, tracking)
    return sr, seg


# A stand-in for the dry run of `check_seg_possible` (the SEG is never stored).
_DRY_RUN_IDENTITY = ModelIdentity("MedP-CLIP", "check", "0" * 64, "0")


def check_seg_possible(source: Dataset, frame: int | None = None) -> str | None:
    """None if a SEG can reference `source` (its `frame`), else the reason. A dry run with an
    empty mask, so that an impossible SEG is found BEFORE inference and before anything is
    stored (e.g. a CT instance without the Frame of Reference UID its IOD requires)."""
    rows, columns = int(source.get("Rows", 0) or 0), int(source.get("Columns", 0) or 0)
    mask = np.zeros((rows, columns), np.uint8)
    if _frames(source) > 1 and _has_geometry(source):
        mask[0, 0] = 1  # an enhanced multi-frame SEG leaves empty frames out: keep one
    try:
        build_seg(source, [mask], ["check"], _DRY_RUN_IDENTITY, frame=frame)
    except Exception as exc:  # noqa: BLE001 - any failure means: no SEG for this source
        return redact(str(exc)) or type(exc).__name__
    return None
