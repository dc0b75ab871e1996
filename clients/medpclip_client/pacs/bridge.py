"""PACS bridge: fetch an instance (WADO-RS), ask MedP-CLIP about a region, store the answer
back (STOW-RS) as an SR and, on request, a SEG.

Order of work, and why:

0. ask the inference server which model it serves (once per bridge): every SR and SEG names
   the model, its config and the SHA-256 of its weights as the server states them;
1. fetch the instance in its stored transfer syntax;
2. validate it BEFORE any inference: an image SOP class, pixel data present and not cut short,
   a single frame or the frame asked for, pixel data the installed decoders read, decoded as
   the server decodes it (`imaging.decode_pixel_data`: GDCM for 12-bit JPEG; else the archive
   is asked once to transcode to Explicit VR Little Endian), and, when a mask is wanted, that a
   SEG can reference it (a dry run of highdicom). Refusals cost no inference and store nothing;
3. infer through `MedPClipClient` with the instance's Part 10 bytes (the server decodes them
   exactly as for any other DICOM client; a frame of a multi-frame instance is decoded here,
   as the server decodes only the first); several regions of the instance use one session
   (`MedPClipClient.session`): the instance is uploaded and encoded once, then each region is
   one call with the encoded image;
4. build the SEG and the SR that references it completely in memory, then STOW them in ONE
   request, so that a failure at any step leaves nothing half-written in the archive. Several
   regions make one SR with one measurement group per region (and one SEG with one segment
   per region), not one report per region: one analysis of one instance is one report, stored
   or not as a whole.

Query mode searches with QIDO-RS filters and runs steps 1-4 per instance on a bounded worker pool
(at most `concurrency` instances, hence requests, in flight), recording each stored instance in
a JSON-lines state file right after its store, so that a rerun skips what is done.

Nothing here logs patient attributes; messages name instances by UID, and library messages
that may quote attribute values are redacted (`reports.redact`, `reports.quiet_libraries`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import pydicom
from pydicom import Dataset
from pydicom.uid import UID

from medpclip_core.dicom import local_request
from medpclip_core.imaging import (
    InputError,
    check_pixel_data,
    decode_pixel_data,
    register_gdcm_12bit,
)

from ..client import DEFAULT_URL, MedPClipClient, MedPClipError, Region, Result
from .dicomweb import EXPLICIT_LE, DicomWeb, ErrorKind, InstanceRef, PacsError
from .reports import (
    Finding,
    ModelIdentity,
    build_reports,
    check_seg_possible,
    mask_outline,
    quiet_libraries,
    redact,
    region_graphic,
)

__all__ = [
    "Bridge",
    "Outcome",
    "QuerySummary",
    "RegionPrompt",
    "Request",
    "StateFile",
    "is_non_image",
    "validate",
]

LOG = logging.getLogger("medpclip_client.pacs")

# SOP classes that hold no image to classify, by (part of) their pydicom name; QIDO results of
# these are skipped without a download, and a `run` on one is refused.
_NON_IMAGE_NAMES = (
    "SR Storage",
    "Segmentation Storage",
    "Key Object Selection",
    "Presentation State",
    "Encapsulated",
    "RT Structure Set",
    "RT Plan",
    "RT Beams Treatment Record",
    "Waveform",
    "Raw Data",
    "Spectroscopy",
    "Registration",
    "Report Storage",
    "Procedure Log",
)
_NON_IMAGE_MODALITIES = {"SR", "SEG", "KO", "PR", "DOC", "RTSTRUCT", "RTPLAN", "REG", "ECG"}
# names pydicom 3.0 does not know yet, for messages
_SYNTAX_NAMES = {
    "1.2.840.10008.1.2.4.110": "JPEG XL Lossless",
    "1.2.840.10008.1.2.4.111": "JPEG XL JPEG Recompression",
    "1.2.840.10008.1.2.4.112": "JPEG XL",
}


def _syntax_name(uid: str) -> str:
    name = _SYNTAX_NAMES.get(uid) or UID(uid).name
    return f"{uid} ({name})" if name and name != uid else uid


def is_non_image(sop_class: str | None, modality: str | None = None) -> bool:
    """True for SOP classes (or, without one, modalities) that carry no image."""
    if sop_class:
        name = UID(sop_class).name
        return any(part in name for part in _NON_IMAGE_NAMES)
    return (modality or "").upper() in _NON_IMAGE_MODALITIES


# --- the request ------------------------------------------------------------------------------


def _mask_digest(mask: np.ndarray | None) -> str | None:
    """A short, stable text of a prompt mask for fingerprints (its region, not its dtype)."""
    if mask is None:
        return None
    m = np.ascontiguousarray(np.asarray(mask) != 0)
    return hashlib.sha256(repr(m.shape).encode() + np.packbits(m).tobytes()).hexdigest()[:16]


@dataclass(frozen=True)
class RegionPrompt:
    """One region of a request in original image pixels (x = column, y = row): foreground
    points, or a box, or a mask (rows x columns of the image, nonzero = region), or none of
    them (the whole image). The SR keeps it as the region's prompt."""

    points: tuple[tuple[float, float], ...] | None = None
    box: tuple[float, float, float, float] | None = None  # given both, the box is used
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)  # before both

    def region(self) -> Region | None:
        if self.mask is not None:
            return Region(mask=np.asarray(self.mask))
        if self.box is not None:
            return Region(box=self.box)
        if self.points:
            return Region(points=list(self.points))
        return None

    def describe(self) -> str:
        if self.mask is not None:
            return f"mask of {int(np.count_nonzero(self.mask))} px"
        if self.box is not None:
            return "box " + ",".join(f"{v:g}" for v in self.box)
        if self.points:
            return " ".join("point " + ",".join(f"{v:g}" for v in p) for p in self.points)
        return "whole image"

    def fingerprint(self) -> list[object]:
        return [self.points, self.box] + (
            [_mask_digest(self.mask)] if self.mask is not None else []
        )


@dataclass(frozen=True)
class Request:
    """What to ask about every instance: candidate labels, the region prompt in original image
    pixels (x = column, y = row; points, or a box, or a mask, or none = the whole image), an
    optional display window, whether to store the mask as a SEG, and for multi-frame instances
    which frame to read (`frame`, 1-based as DICOM numbers frames; single-frame instances take
    None or 1).

    Several regions: `regions` (then `points`, `box` and `mask` stay None); each becomes one
    measurement group of the one SR (and one segment of the one SEG), and the instance is
    encoded once for all of them."""

    labels: tuple[str, ...]
    points: tuple[tuple[float, float], ...] | None = None
    box: tuple[float, float, float, float] | None = None
    mask_out: bool = False
    window: tuple[float, float] | None = None
    regions: tuple[RegionPrompt, ...] = ()
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)
    frame: int | None = None

    def __post_init__(self) -> None:
        if self.regions and (self.points or self.box is not None or self.mask is not None):
            raise ValueError("give points/box/mask (one region) or regions, not both")
        if self.frame is not None and self.frame < 1:
            raise ValueError("frames are numbered from 1")

    def prompts(self) -> tuple[RegionPrompt, ...]:
        """The regions, in order (one for a single-region request)."""
        return self.regions or (RegionPrompt(self.points, self.box, self.mask),)

    def region(self) -> Region | None:
        """The client `Region` of a single-region request."""
        if len(self.prompts()) > 1:
            raise ValueError("a request of several regions has no single region")
        return self.prompts()[0].region()

    def fingerprint(self) -> str:
        """A stable text of the request, seeding deterministic report UIDs (a single-region
        request without a mask or frame has the fingerprint it always had)."""
        parts: list[object] = [list(self.labels), self.points, self.box, self.mask_out, self.window]
        if self.regions:
            parts.append([r.fingerprint() for r in self.regions])
        if self.mask is not None:
            parts.append({"mask": _mask_digest(self.mask)})
        if self.frame is not None:
            parts.append({"frame": self.frame})
        return json.dumps(parts, separators=(",", ":"))

    def key(self) -> str:
        """A short hash of `fingerprint`, recorded in the state file per instance."""
        return hashlib.sha256(self.fingerprint().encode("utf-8")).hexdigest()[:16]


@dataclass
class Outcome:
    """One processed instance: the finding (the first region's) and the UIDs of what was
    stored; `findings` and `mask_areas` hold every region's, in order; `model` is the served
    model the objects name, `frame` the frame read of a multi-frame instance."""

    source: InstanceRef
    finding: Finding
    sr_uid: str
    sr_series_uid: str
    seg_uid: str | None
    seg_series_uid: str | None
    mask_area: int
    findings: list[Finding] = field(default_factory=list)
    mask_areas: list[int] = field(default_factory=list)
    model: ModelIdentity | None = None
    frame: int | None = None

    def __post_init__(self) -> None:
        if not self.findings:
            self.findings = [self.finding]
            self.mask_areas = [self.mask_area]

    @staticmethod
    def _finding_json(finding: Finding, mask_area: int) -> dict[str, object]:
        g = finding.graphic
        return {
            "label": finding.label,
            "probability": finding.probability,
            "image_probability": finding.image_probability,
            "iou": finding.iou,
            "region": {"graphic_type": g.graphic_type, "data": g.data.tolist()},
            "mask_area_px": mask_area,
        }

    def to_json(self) -> dict[str, object]:
        """One region: its fields at the top level; several: a list under "regions"."""
        where = {
            "study": self.source.study,
            "series": self.source.series,
            "instance": self.source.instance,
        }
        if len(self.findings) > 1:
            found: dict[str, object] = {
                "regions": [
                    self._finding_json(f, a)
                    for f, a in zip(self.findings, self.mask_areas, strict=True)
                ]
            }
        else:
            found = self._finding_json(self.finding, self.mask_area)
        extra: dict[str, object] = {}
        if self.frame is not None:
            extra["frame"] = self.frame
        if self.model is not None:
            extra["model"] = self.model.parameters
        return {
            **where,
            **found,
            "sr": {"instance": self.sr_uid, "series": self.sr_series_uid},
            "seg": None
            if self.seg_uid is None
            else {"instance": self.seg_uid, "series": self.seg_series_uid},
            **extra,
        }


# --- validation -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Unreadable:
    """Why the installed decoders cannot read an instance's pixel data. `corrupt`: they tried
    and failed (a damaged or truncated file: installing more will not help), as opposed to no
    decoder being installed for its transfer syntax."""

    reason: str
    corrupt: bool = False


def _undecodable(ds: Dataset) -> _Unreadable | None:
    """None if the installed decoders read the pixel data, else why not. Decodes with the
    client's shared helper, as the server does (GDCM first for 12-bit JPEG Extended, which
    pydicom's own plugins cannot read), so the bridge neither refuses what the server reads
    nor asks the archive to transcode it."""
    from pydicom.pixels import get_decoder

    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts is None:
        return _Unreadable("its file meta information names no transfer syntax")
    ts = str(ts)
    register_gdcm_12bit()  # before asking what is installed: GDCM may be its only 12-bit decoder
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        return _Unreadable(
            f"its transfer syntax {_syntax_name(ts)} has no pixel data decoder in pydicom "
            f"{pydicom.__version__}"
        )
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "a decoder plugin"
        return _Unreadable(
            f"its transfer syntax {_syntax_name(ts)} needs a decoder that is not installed: "
            f"{missing}"
        )
    try:
        decode_pixel_data(ds)
    except InputError:  # its message speaks to a client sending a file; ours names the archive
        plugins = ", ".join(decoder.available_plugins)
        return _Unreadable(
            f"its pixel data in {_syntax_name(ts)} could not be decoded by the installed "
            f"decoders ({plugins}): it may be corrupt or truncated",
            corrupt=True,
        )
    return None


def _as_stored(exc: InputError) -> str:
    """`check_pixel_data`'s message for an instance in an archive: its advice to a client
    ("send the whole file") becomes advice about the archive's copy."""
    message = str(exc)
    for client_advice in ("; send the whole file", ": send the whole file"):
        if message.endswith(client_advice):
            return (
                message.removesuffix(client_advice) + "; the archive holds an incomplete copy: "
                "store the complete file again"
            )
    return message


def validate(ds: Dataset, ref: InstanceRef, request: Request) -> None:
    """Refuse (PacsError, kind REFUSED) an instance the bridge cannot answer for, before any
    inference. The decoding check is separate (`Bridge.fetch`): it may re-fetch."""
    sop = str(ds.get("SOPClassUID", "")) or None
    modality = str(ds.get("Modality", "")) or None
    what = UID(sop).name if sop else "unknown SOP class"
    if is_non_image(sop, None if sop else modality):
        raise PacsError(
            f"instance {ref.instance} is a {what} (modality {modality or '?'}), not an image: "
            "point --instance at an image instance (CT, MR, CR, DX, ...)",
            ErrorKind.REFUSED,
        )
    try:
        # shared with the server: pixel data cut short is called truncated, before any decoder
        # runs (a decoder's own error would read as an unsupported transfer syntax)
        check_pixel_data(ds)
    except InputError as exc:
        raise PacsError(
            f"instance {ref.instance} ({what}) cannot be read: {_as_stored(exc)}",
            ErrorKind.REFUSED,
        ) from None
    except ValueError:
        # its last step (the uncompressed length) asks pydicom whether the transfer syntax is
        # encapsulated, which raises for one pydicom does not know (JPEG XL in pydicom 3.0);
        # the presence checks before it passed, and `_undecodable` names the syntax
        pass
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows < 1 or columns < 1:
        raise PacsError(
            f"instance {ref.instance} has no image size (Rows {rows}, Columns {columns})",
            ErrorKind.REFUSED,
        )
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1 and request.frame is None:
        raise PacsError(
            f"instance {ref.instance} has {frames} frames: say which one to read with --frame N "
            f"(1..{frames}); the SR and SEG name it",
            ErrorKind.REFUSED,
        )
    if (request.frame or 1) > frames:
        raise PacsError(
            f"instance {ref.instance} has {frames} frame(s), not frame {request.frame}",
            ErrorKind.REFUSED,
        )
    for i, prompt in enumerate(request.prompts(), 1):
        if prompt.mask is not None and np.shape(prompt.mask) != (rows, columns):
            shape = "x".join(str(v) for v in np.shape(prompt.mask)[::-1])
            raise PacsError(
                f"the prompt mask{f' of region {i}' if len(request.prompts()) > 1 else ''} is "
                f"{shape} pixels but instance {ref.instance} is {columns}x{rows}: a mask must "
                "have the image's size",
                ErrorKind.REFUSED,
            )
    if request.mask_out:
        reason = check_seg_possible(ds, request.frame if frames > 1 else None)
        if reason is not None:
            raise PacsError(
                f"a DICOM SEG cannot reference instance {ref.instance}: {reason.rstrip('.')}; "
                "run without --mask-out to store only the SR",
                ErrorKind.REFUSED,
            )


def _part10(ds: Dataset) -> bytes:
    """The dataset as a DICOM Part 10 file, the form the server decodes (pydicom's warnings
    about the values it writes are withheld: they quote them)."""
    buf = io.BytesIO()
    with quiet_libraries():
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


# --- one instance -----------------------------------------------------------------------------


class Bridge:
    """Processes instances of one archive with one inference server.

    `triton_url` is Triton's gRPC host:port; `timeout_s` bounds each inference. Thread-safe:
    each worker thread gets its own DICOMweb session and gRPC client.
    """

    def __init__(
        self,
        pacs: DicomWeb,
        triton_url: str = DEFAULT_URL,
        timeout_s: float | None = 60.0,
        client_options: Mapping[str, Any] | None = None,
    ) -> None:
        """`client_options`: further `MedPClipClient` arguments (TLS, headers, API key,
        retries), as `medpclip_client.arguments.client_options` builds them."""
        self.pacs = pacs
        self.triton_url = triton_url
        self.timeout_s = timeout_s
        self.client_options = dict(client_options or {})
        self._local = threading.local()
        self._clients: list[MedPClipClient] = []
        self._lock = threading.Lock()
        self._identity: ModelIdentity | None = None
        self._identity_lock = threading.Lock()  # one question to the server, not one per thread

    def close(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, []
        for c in clients:
            c.close()

    def __enter__(self) -> Bridge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _client(self) -> MedPClipClient:
        client = getattr(self._local, "client", None)
        if client is None:
            try:
                client = MedPClipClient(
                    self.triton_url, timeout_s=self.timeout_s, **self.client_options
                )
            except MedPClipError as exc:
                raise self._inference_error(exc, None) from None
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def model_identity(self) -> ModelIdentity:
        """Step 0: the served model as the server states it (asked once, then remembered),
        from the configuration of the ensemble the bridge calls: behind the medpclip gateway
        that needs what inference needs (the API key, when the server has one), never the admin
        key. PacsError DENIED when the caller is refused (as inference would be), OTHER when
        the repository does not name the model."""
        with self._identity_lock:
            if self._identity is None:
                try:
                    params = self._client().model_identity()
                except MedPClipError as exc:
                    raise self._inference_error(exc, None) from None
                try:
                    self._identity = ModelIdentity.from_server(params)
                except ValueError as exc:
                    raise PacsError(f"the inference server at {self.triton_url}: {exc}") from None
                LOG.info(
                    "model: %s %s, weights sha256 %s, medpclip %s",
                    self._identity.name,
                    self._identity.config,
                    self._identity.checkpoint_sha256,
                    self._identity.version,
                )
            return self._identity

    def _inference_error(self, exc: MedPClipError, ref: InstanceRef | None) -> PacsError:
        where = f" for instance {ref.instance}" if ref else ""
        if exc.invalid_input:
            return PacsError(
                f"the inference server refused the request{where}: {exc.message}",
                ErrorKind.REFUSED,
            )
        if exc.denied:
            return PacsError(
                f"the inference server at {self.triton_url} refused the caller: {exc.message}; "
                "give its API key with --api-key-file (or MEDPCLIP_API_KEY)",
                ErrorKind.DENIED,
            )
        if exc.unavailable:
            return PacsError(
                f"the inference server at {self.triton_url} is unreachable or not ready "
                f"({exc.status}): {exc.message}; start it (python -m medpclip_tools.serve) or fix "
                "--triton",
                ErrorKind.UNREACHABLE,
            )
        return PacsError(f"inference failed{where}: {exc}")

    def fetch(self, ref: InstanceRef, request: Request) -> Dataset:
        """Steps 1-2: the validated instance, which the installed decoders read."""
        ds = self.pacs.retrieve(ref)
        validate(ds, ref, request)
        unreadable = _undecodable(ds)
        if unreadable is None:
            return ds
        # One chance for the archive to transcode (Orthanc can for JPEG-LS, JPEG 2000, ...).
        try:
            transcoded = self.pacs.retrieve(ref, media_types=EXPLICIT_LE)
        except PacsError as exc:
            if exc.kind == ErrorKind.UNREACHABLE:
                raise
            transcoded = None
        if transcoded is not None and _undecodable(transcoded) is None:
            LOG.info("instance %s: using the archive's Explicit VR Little Endian copy", ref)
            return transcoded
        archive = (
            "the archive did not transcode it to Explicit VR Little Endian"
            if transcoded is None
            else "the archive's Explicit VR Little Endian copy cannot be read either"
        )
        remedy = (
            "check that it opens in a DICOM viewer: if not, store the complete file again; "
            "if it does, convert it (e.g. gdcmconv --raw)"
            if unreadable.corrupt
            else "convert it (e.g. dcmdjpeg, gdcmconv) or install a pydicom decoder plugin for it"
        )
        raise PacsError(
            f"instance {ref.instance} cannot be read: {unreadable.reason}, and {archive}; {remedy}",
            ErrorKind.REFUSED,
        )

    @staticmethod
    def _image(data: bytes, request: Request) -> tuple[bytes | np.ndarray, Any]:
        """What the server is sent, and the window: the Part 10 bytes (the server decodes them
        as it decodes any DICOM file), or for a frame of a multi-frame instance that frame
        decoded here (the server decodes only the first frame of a file)."""
        if request.frame is None:
            return data, request.window
        return local_request(data, request.frame - 1, request.window)

    def infer(self, data: bytes, ref: InstanceRef, request: Request) -> Result:
        """Step 3 for a single-region request."""
        try:
            image, window = self._image(data, request)
            return self._client().infer(image, request.region(), list(request.labels), window)
        except MedPClipError as exc:
            raise self._inference_error(exc, ref) from None
        except InputError as exc:
            raise PacsError(
                f"the request for instance {ref.instance} is invalid: {exc}", ErrorKind.REFUSED
            ) from None

    def infer_all(self, data: bytes, ref: InstanceRef, request: Request) -> list[Result]:
        """Step 3: one result per region, in order. One region: the plain call (`infer`);
        several: one session, so the instance is uploaded and encoded once."""
        prompts = request.prompts()
        if len(prompts) == 1:
            return [self.infer(data, ref, request)]
        results: list[Result] = []
        where = ""
        try:
            image, window = self._image(data, request)
            with self._client().session(image, window) as session:
                for i, prompt in enumerate(prompts, 1):
                    where = f" (region {i}: {prompt.describe()})"
                    results.append(session.infer(prompt.region(), list(request.labels)))
        except MedPClipError as exc:
            error = self._inference_error(exc, ref)
            raise PacsError(error.message + where, error.kind) from None
        except InputError as exc:
            raise PacsError(
                f"the request for instance {ref.instance} is invalid{where}: {exc}",
                ErrorKind.REFUSED,
            ) from None
        return results

    def process(self, ref: InstanceRef, request: Request, uid_seed: str | None = None) -> Outcome:
        """Fetch, validate, infer, and store one SR (+ SEG) in one STOW request.

        `uid_seed`: None for fresh report UIDs; a text (query mode: instance + request) for
        deterministic ones, so that a retried store cannot add a duplicate.
        Raises PacsError; nothing is stored unless this returns.
        """
        if not request.labels:
            raise PacsError("at least one label is needed to name the finding", ErrorKind.REFUSED)
        identity = self.model_identity()
        ds = self.fetch(ref, request)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        frame = request.frame if frames > 1 else None
        if request.frame is not None and frame is None:  # frame 1 of a single-frame instance
            request = dataclasses.replace(request, frame=None)
        results = self.infer_all(_part10(ds), ref, request)
        rows, columns = int(ds.Rows), int(ds.Columns)
        findings: list[Finding] = []
        for prompt, result in zip(request.prompts(), results, strict=True):
            if result.mask.shape[:2] != (rows, columns):
                raise PacsError(
                    f"the server's mask is {result.mask.shape[1]}x{result.mask.shape[0]} but "
                    f"instance {ref.instance} is {columns}x{rows}; is the server decoding another "
                    "frame?"
                )
            top = result.top(1)
            if not top:
                raise PacsError(f"the server returned no label probabilities for {ref.instance}")
            label, probability, image_probability = top[0]
            findings.append(
                Finding(
                    label=label,
                    probability=probability,
                    image_probability=image_probability,
                    iou=result.iou,
                    graphic=region_graphic(prompt.points, prompt.box, rows, columns, prompt.mask),
                    outline=mask_outline(result.mask),
                    prompted=prompt.region() is not None,
                )
            )
        try:
            sr, seg = build_reports(
                ds,
                findings,
                identity,
                masks=[r.mask for r in results] if request.mask_out else None,
                uid_seed=uid_seed,
                frame=frame,
            )
        except Exception as exc:  # noqa: BLE001 - highdicom raises several types
            raise PacsError(
                f"could not build the DICOM report for instance {ref.instance}: "
                f"{type(exc).__name__}: {redact(str(exc))}"
            ) from None
        objects = [sr] if seg is None else [sr, seg]
        stored = self.pacs.store(objects)
        if stored.failed:
            kept = [uid for uid in stored.stored if uid in {str(o.SOPInstanceUID) for o in objects}]
            detail = "; ".join(f"{uid}: {why}" for uid, why in stored.failed)
            partial = (
                f"; the archive did keep {', '.join(kept)}: delete it before retrying"
                if kept
                else "; nothing was kept"
            )
            raise PacsError(
                f"the archive rejected the report for {ref.instance} ({detail}){partial}"
            )
        areas = [int(np.count_nonzero(r.mask)) for r in results]
        return Outcome(
            source=ref,
            finding=findings[0],
            sr_uid=str(sr.SOPInstanceUID),
            sr_series_uid=str(sr.SeriesInstanceUID),
            seg_uid=None if seg is None else str(seg.SOPInstanceUID),
            seg_series_uid=None if seg is None else str(seg.SeriesInstanceUID),
            mask_area=areas[0],
            findings=findings,
            mask_areas=areas,
            model=identity,
            frame=frame,
        )

    # --- query mode ---------------------------------------------------------------------------

    def query(
        self,
        request: Request,
        state: StateFile,
        modality: str | None = None,
        study_date: str | None = None,
        concurrency: int = 4,
        retry_refused: bool = False,
        progress: Callable[[str, InstanceRef, Outcome | PacsError | None], None] | None = None,
    ) -> QuerySummary:
        """Process every instance QIDO finds for the filters, at most `concurrency` at a time.

        Skipped: instances in `state` (stored; refused too unless `retry_refused`) and non-image
        SOP classes. An unreachable archive or inference server stops the batch (instances not
        yet started stay unrecorded, so a rerun picks them up). `progress(event, ref, detail)`
        is called per instance with event "stored", "refused", "failed" or "skipped".
        """
        key = request.key()
        others = state.requests - {key}
        if others:
            raise PacsError(
                f"the state file {state.path} records a different request (labels, region, "
                "window or --mask-out): its instances would be skipped wrongly; use a new "
                "--state for a new request",
                ErrorKind.USAGE,
            )
        state.request = key
        refs = self.pacs.search(modality=modality, study_date=study_date)
        summary = QuerySummary(matched=len(refs))
        todo: list[InstanceRef] = []
        for ref in refs:
            if state.is_done(ref.instance, retry_refused):
                summary.skipped_done += 1
            elif is_non_image(ref.sop_class, ref.modality):
                summary.skipped_not_image += 1
                if progress:
                    progress("skipped", ref, None)
            else:
                todo.append(ref)

        stop = threading.Event()
        lock = threading.Lock()
        in_flight = 0

        def work(ref: InstanceRef) -> None:
            nonlocal in_flight
            if stop.is_set():
                return
            with lock:
                in_flight += 1
                summary.max_in_flight = max(summary.max_in_flight, in_flight)
            try:
                outcome = self.process(ref, request, uid_seed=ref.instance + request.fingerprint())
            except PacsError as exc:
                with lock:
                    if exc.kind == ErrorKind.REFUSED:
                        summary.refused.append((ref, exc))
                    else:
                        summary.failed.append((ref, exc))
                        # every later instance would fail alike: stop the batch
                        stops = (ErrorKind.UNREACHABLE, ErrorKind.DENIED)
                        if exc.kind in stops and summary.aborted is None:
                            summary.aborted = exc
                            stop.set()
                if exc.kind == ErrorKind.REFUSED:
                    state.record_refused(ref, exc)
                if progress:
                    progress("refused" if exc.kind == ErrorKind.REFUSED else "failed", ref, exc)
                return
            except Exception as exc:  # noqa: BLE001 - one bad instance must not end the batch
                err = PacsError(f"instance {ref.instance}: {type(exc).__name__}: {exc}")
                with lock:
                    summary.failed.append((ref, err))
                if progress:
                    progress("failed", ref, err)
                return
            finally:
                with lock:
                    in_flight -= 1
            state.record_stored(outcome)
            with lock:
                summary.stored.append(outcome)
            if progress:
                progress("stored", ref, outcome)

        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            try:
                for f in [pool.submit(work, ref) for ref in todo]:
                    f.result()
            except BaseException:  # Ctrl-C: start nothing new, let running ones finish
                stop.set()
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        summary.not_attempted = (
            len(todo) - len(summary.stored) - len(summary.refused) - len(summary.failed)
        )
        return summary


@dataclass
class QuerySummary:
    """Counts and details of a query run."""

    matched: int = 0
    skipped_done: int = 0
    skipped_not_image: int = 0
    stored: list[Outcome] = field(default_factory=list)
    refused: list[tuple[InstanceRef, PacsError]] = field(default_factory=list)
    failed: list[tuple[InstanceRef, PacsError]] = field(default_factory=list)
    not_attempted: int = 0
    aborted: PacsError | None = None
    max_in_flight: int = 0

    @property
    def exit_code(self) -> int:
        """0 all done; the batch-stopping error's code; else the first failure's; else 3 when
        instances were refused."""
        if self.aborted is not None:
            return self.aborted.exit_code
        if self.failed:
            return self.failed[0][1].exit_code
        if self.refused:
            return int(ErrorKind.REFUSED)
        return 0

    def to_json(self) -> dict[str, object]:
        return {
            "matched": self.matched,
            "stored": len(self.stored),
            "skipped_done": self.skipped_done,
            "skipped_not_image": self.skipped_not_image,
            "refused": [{"instance": r.instance, "message": e.message} for r, e in self.refused],
            "failed": [
                {"instance": r.instance, "exit_code": e.exit_code, "message": e.message}
                for r, e in self.failed
            ],
            "not_attempted": self.not_attempted,
            "aborted": None if self.aborted is None else self.aborted.message,
            "max_in_flight": self.max_in_flight,
            "results": [o.to_json() for o in self.stored],
        }


# --- resume state -----------------------------------------------------------------------------


class StateFile:
    """The resume state of query mode: a JSON-lines file, one line per finished instance
    (``{"sop_instance_uid", "status": "stored"|"refused", ...}``), appended and fsync'ed right
    after each store, so a crash loses at most the instance in progress (and deterministic
    report UIDs make re-storing it harmless). An exclusive lock keeps two runs from sharing it.
    A torn last line (crash mid-write) is ignored.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.request: str | None = None  # Request.key() of this run, written with each line
        self.requests: set[str] = set()  # request keys found in the file
        self._status: dict[str, str] = {}
        self._file: io.TextIOWrapper | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> StateFile:
        import fcntl

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            f = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held until __exit__
        except OSError as exc:
            raise PacsError(
                f"cannot open the state file {self.path}: {exc.strerror or exc}", ErrorKind.USAGE
            ) from None
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise PacsError(
                f"the state file {self.path} is in use by another run; wait for it or use "
                "another --state"
            ) from None
        f.seek(0)
        text = f.read()
        if text and not text.endswith("\n"):
            f.write("\n")  # a torn line stays ignored and does not swallow the next record
            f.flush()
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                self._status[str(entry["sop_instance_uid"])] = str(entry.get("status", "stored"))
                if entry.get("request"):
                    self.requests.add(str(entry["request"]))
            except (ValueError, KeyError, TypeError):
                LOG.warning("state file %s line %d is not a record; ignored", self.path, n)
        self._file = f
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._file is not None:
            self._file.close()  # closing releases the lock
            self._file = None

    def is_done(self, sop_instance_uid: str, retry_refused: bool = False) -> bool:
        status = self._status.get(sop_instance_uid)
        return status == "stored" or (status == "refused" and not retry_refused)

    def __len__(self) -> int:
        return len(self._status)

    def _append(self, entry: dict[str, object]) -> None:
        entry = {**entry, "request": self.request}
        line = json.dumps(entry, separators=(",", ":")) + "\n"
        with self._lock:
            if self._file is None:
                raise RuntimeError("StateFile used outside its `with` block")
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())
            self._status[str(entry["sop_instance_uid"])] = str(entry["status"])

    def record_stored(self, outcome: Outcome) -> None:
        entry: dict[str, object] = {
            "sop_instance_uid": outcome.source.instance,
            "status": "stored",
            "study": outcome.source.study,
            "series": outcome.source.series,
            "sr": outcome.sr_uid,
            "seg": outcome.seg_uid,
            "label": outcome.finding.label,
            "probability": outcome.finding.probability,
        }
        if len(outcome.findings) > 1:  # label, probability: the first region's
            entry["regions"] = [
                {"label": f.label, "probability": f.probability} for f in outcome.findings
            ]
        self._append({**entry, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

    def record_refused(self, ref: InstanceRef, error: PacsError) -> None:
        self._append(
            {
                "sop_instance_uid": ref.instance,
                "status": "refused",
                "study": ref.study,
                "series": ref.series,
                "reason": error.message,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
        )
