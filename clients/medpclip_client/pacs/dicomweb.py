"""A thin DICOMweb client (WADO-RS, QIDO-RS, STOW-RS) over `dicomweb_client.DICOMwebClient`.

Why a wrapper: the bridge must tell the operator *what to do* when the archive misbehaves, and
a command line must map each failure to an exit code. `dicomweb_client` raises bare `requests`
exceptions (and retries any exception with back-off up to 30 s), so every call here goes through
`_call`, which turns connection errors, timeouts and HTTP statuses into one `PacsError` whose
`kind` says whether the archive is unreachable, the object is not there, the input is refused or
something else went wrong. Messages carry URLs and UIDs only, never patient attributes.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import requests
from pydicom import Dataset

__all__ = [
    "DicomWeb",
    "ErrorKind",
    "InstanceRef",
    "PacsError",
    "StoreResult",
]

T = TypeVar("T")

# WADO-RS: ask for the instance in the transfer syntax it is stored in ("*"): transcoding by the
# archive could be lossy, and we check decodability ourselves. EXPLICIT_LE is the fallback.
ANY_TRANSFER_SYNTAX = (("application/dicom", "*"),)
EXPLICIT_LE = (("application/dicom", "1.2.840.10008.1.2.1"),)

# QIDO-RS attributes needed to address and pre-sort an instance.
_QIDO_FIELDS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SOPClassUID",
    "Modality",
)
_TAGS = {
    "StudyInstanceUID": "0020000D",
    "SeriesInstanceUID": "0020000E",
    "SOPInstanceUID": "00080018",
    "SOPClassUID": "00080016",
    "Modality": "00080060",
}


class ErrorKind(enum.IntEnum):
    """What went wrong; the value is the command line's exit code."""

    OTHER = 1
    USAGE = 2  # the command line or its files are inconsistent
    REFUSED = 3  # the input cannot be processed (not an image, no pixels, syntax, bad prompt)
    UNREACHABLE = 4  # the archive or the inference server cannot be reached
    DENIED = 5  # the archive or the inference server refused this caller (credentials, API key)
    NOT_FOUND = 6  # the archive has no such study/series/instance
    # (the values are medpclip_client.arguments.EXIT_CODES, shared with medpclip-client)


class PacsError(Exception):
    """A failure with an actionable message; `kind` classifies it (and is the exit code)."""

    def __init__(self, message: str, kind: ErrorKind = ErrorKind.OTHER) -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind

    @property
    def exit_code(self) -> int:
        return int(self.kind)


@dataclass(frozen=True)
class InstanceRef:
    """The three UIDs that address an instance in DICOMweb, plus what QIDO said about it."""

    study: str
    series: str
    instance: str
    sop_class: str | None = None
    modality: str | None = None

    def __str__(self) -> str:
        return self.instance


@dataclass(frozen=True)
class StoreResult:
    """SOP Instance UIDs the archive accepted (`stored`) and rejected (`failed`: uid, reason)."""

    stored: list[str]
    failed: list[tuple[str, str]]


def _value(item: dict, keyword: str) -> str | None:
    """One string value of a DICOM JSON attribute (QIDO results), or None."""
    attr = item.get(_TAGS[keyword]) or {}
    values = attr.get("Value") or []
    return str(values[0]) if values else None


class DicomWeb:
    """DICOMweb access to one archive (e.g. Orthanc: ``http://host:8042/dicom-web``).

    One `DICOMwebClient` (and `requests.Session`) per thread, because sessions are not
    thread-safe and the bridge's query mode calls from a worker pool. `timeout_s` bounds every
    request (None: no limit); `attempts` is the number of tries (connection errors and
    429/503/504 are retried after 0.5 s, 1 s, ...; `dicomweb_client`'s own default would
    wait 30 s before giving up on a closed port).
    """

    def __init__(self, url: str, timeout_s: float | None = 30.0, attempts: int = 3) -> None:
        if not url.startswith(("http://", "https://")):
            raise PacsError(
                f"DICOMweb URL must start with http:// or https://, got {url!r} "
                "(e.g. http://127.0.0.1:8042/dicom-web for Orthanc)",
                ErrorKind.OTHER,
            )
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.attempts = max(1, attempts)
        self._local = threading.local()

    # --- plumbing -----------------------------------------------------------------------------

    def _client(self):  # -> dicomweb_client.DICOMwebClient (imported lazily: optional extra)
        client = getattr(self._local, "client", None)
        if client is None:
            from dicomweb_client import DICOMwebClient

            try:
                client = DICOMwebClient(
                    self.url,
                    session=requests.Session(),
                    timeout=self.timeout_s,
                    # real archives hold UIDs with leading zeros etc.; the archive is the judge
                    permissive_uid=True,
                )
            except ValueError as exc:
                raise PacsError(f"bad DICOMweb URL {self.url!r}: {exc}") from None
            client.set_http_retry_params(
                retry=self.attempts > 1,
                max_attempts=self.attempts,
                wait_exponential_multiplier=250,  # ms: waits 0.5 s, 1 s, ...
            )
            self._local.client = client
        return client

    def _call(self, what: str, fn: Callable[[], T], not_found: str | None = None) -> T:
        """Run `fn` (one DICOMweb transaction described by `what`) and translate failures."""
        try:
            return fn()
        except requests.exceptions.ConnectionError:
            raise PacsError(
                f"cannot connect to the DICOMweb server at {self.url} ({what}): is it running, "
                "and is --dicomweb the DICOMweb root (Orthanc: http://HOST:8042/dicom-web)?",
                ErrorKind.UNREACHABLE,
            ) from None
        except requests.exceptions.Timeout:
            raise PacsError(
                f"the DICOMweb server at {self.url} did not answer within {self.timeout_s} s "
                f"({what}); retry later or raise --pacs-timeout",
                ErrorKind.UNREACHABLE,
            ) from None
        except requests.exceptions.HTTPError as exc:
            raise self._http_error(exc, what, not_found) from None
        except requests.exceptions.RequestException as exc:
            raise PacsError(
                f"DICOMweb request failed ({what}): {type(exc).__name__}: {exc}"
            ) from None

    def _http_error(
        self, exc: requests.exceptions.HTTPError, what: str, not_found: str | None
    ) -> PacsError:
        status = exc.response.status_code if exc.response is not None else 0
        if status == 404:
            if not_found is not None:
                return PacsError(not_found, ErrorKind.NOT_FOUND)
            return PacsError(
                f"{self.url} answered 404 Not Found ({what}): check that --dicomweb is the "
                "DICOMweb root (Orthanc: http://HOST:8042/dicom-web, with its DICOMweb plugin)",
                ErrorKind.UNREACHABLE,
            )
        if status in (401, 403):
            return PacsError(
                f"the DICOMweb server at {self.url} refused access (HTTP {status}, {what}): "
                "it requires credentials or does not allow this client",
                ErrorKind.DENIED,
            )
        if status in (502, 503, 504):
            return PacsError(
                f"the DICOMweb server at {self.url} is unavailable (HTTP {status}, {what}); "
                "retry later",
                ErrorKind.UNREACHABLE,
            )
        reason = exc.response.reason if exc.response is not None else ""
        return PacsError(
            f"the DICOMweb server at {self.url} answered HTTP {status} {reason} ({what})"
        )

    # --- transactions -------------------------------------------------------------------------

    def retrieve(self, ref: InstanceRef, media_types: tuple = ANY_TRANSFER_SYNTAX) -> Dataset:
        """WADO-RS: the instance as a dataset, by default in its stored transfer syntax."""
        return self._call(
            f"retrieve instance {ref.instance}",
            lambda: self._client().retrieve_instance(
                ref.study, ref.series, ref.instance, media_types=media_types
            ),
            not_found=(
                f"instance {ref.instance} of series {ref.series} of study {ref.study} is not "
                f"in the archive at {self.url}: check the three UIDs (a QIDO search lists them)"
            ),
        )

    def search(
        self,
        modality: str | None = None,
        study_date: str | None = None,
        page_size: int = 500,
    ) -> list[InstanceRef]:
        """QIDO-RS: all instances matching the filters (paged with limit/offset until empty)."""
        filters: dict[str, str] = {}
        if modality:
            filters["Modality"] = modality
        if study_date:
            filters["StudyDate"] = study_date
        items = self._call(
            "search for instances",
            lambda: self._client().search_for_instances(
                search_filters=filters or None,
                fields=list(_QIDO_FIELDS),
                limit=page_size,
                get_remaining=True,
            ),
        )
        refs: list[InstanceRef] = []
        seen: set[str] = set()
        for item in items:
            study, series = _value(item, "StudyInstanceUID"), _value(item, "SeriesInstanceUID")
            instance = _value(item, "SOPInstanceUID")
            if not (study and series and instance) or instance in seen:
                continue  # an archive that omits the UIDs cannot be addressed by WADO-RS
            seen.add(instance)
            refs.append(
                InstanceRef(
                    study,
                    series,
                    instance,
                    sop_class=_value(item, "SOPClassUID"),
                    modality=_value(item, "Modality"),
                )
            )
        return refs

    def store(self, datasets: Sequence[Dataset]) -> StoreResult:
        """STOW-RS: all `datasets` in ONE request (one study); returns what the archive says.

        One request, so that an unreachable archive or a rejected request leaves nothing behind;
        a per-instance failure inside an accepted request is reported in `failed`.
        """
        if not datasets:
            return StoreResult([], [])
        study = str(datasets[0].StudyInstanceUID)
        response = self._call(
            "store " + ", ".join(str(ds.SOPInstanceUID) for ds in datasets),
            lambda: self._client().store_instances(list(datasets), study_instance_uid=study),
        )
        return _store_result(response, [str(ds.SOPInstanceUID) for ds in datasets])


def _store_result(response: Dataset, sent: Iterable[str]) -> StoreResult:
    """Read a STOW-RS response. An empty response (an archive that only answers 200) confirms
    all; otherwise instances it does not mention count as failed (unconfirmed)."""
    sent = list(sent)
    if "ReferencedSOPSequence" not in response and "FailedSOPSequence" not in response:
        return StoreResult(sent, [])
    stored = [
        str(item.ReferencedSOPInstanceUID)
        for item in response.get("ReferencedSOPSequence", [])
        if "ReferencedSOPInstanceUID" in item
    ]
    failed = [
        (str(item.get("ReferencedSOPInstanceUID", "?")), _reason(item.get("FailureReason")))
        for item in response.get("FailedSOPSequence", [])
    ]
    mentioned = set(stored) | {uid for uid, _ in failed}
    failed += [(uid, "not confirmed by the archive") for uid in sent if uid not in mentioned]
    return StoreResult(stored, failed)


def _reason(code: object) -> str:
    """A STOW-RS failure reason code (PS3.18 / PS3.4 status) in words."""
    names = {
        0xA700: "out of resources",
        0xA900: "data set does not match SOP class",
        0xC000: "cannot understand",
        0x0110: "processing failure",
        0x0122: "SOP class not supported",
        0x0111: "duplicate SOP instance",
    }
    try:
        value = int(code)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return "failure reason not given"
    return f"failure reason 0x{value:04X} ({names.get(value, 'see PS3.4 status codes')})"
