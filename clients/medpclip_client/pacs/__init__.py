"""PACS bridge: DICOMweb archive in, MedP-CLIP on Triton, DICOM SR (+ SEG) back to the archive.

Needs the `pacs` extra (dicomweb-client, highdicom, requests). Command line: `medpclip-pacs`
(or ``python -m medpclip_client.pacs``); library use::

    from medpclip_client.pacs import Bridge, DicomWeb, InstanceRef, RegionPrompt, Request

    with Bridge(DicomWeb("http://127.0.0.1:8042/dicom-web"), "127.0.0.1:8001") as bridge:
        outcome = bridge.process(
            InstanceRef(study_uid, series_uid, instance_uid),
            Request(labels=("a nodule", "a cyst"), points=((62, 70),), mask_out=True),
        )
        print(outcome.finding.label, outcome.finding.probability, outcome.sr_uid)

Several regions of an instance (encoded once; one SR with a measurement group per region)::

    Request(labels=..., regions=(RegionPrompt(points=((62, 70),)), RegionPrompt(box=(1, 2, 6, 8))))

The SR and SEG name the served model as the server states it (`Bridge.model_identity`, read
from the configuration of the ensemble it calls: behind the medpclip gateway that needs only
what inference needs, the API key as ``client_options={"api_key": ...}`` when the server has
one).
"""

from .bridge import (
    Bridge,
    Outcome,
    QuerySummary,
    RegionPrompt,
    Request,
    StateFile,
    is_non_image,
    validate,
)
from .dicomweb import DicomWeb, ErrorKind, InstanceRef, PacsError, StoreResult
from .reports import (
    LOCAL_SCHEME,
    Finding,
    Graphic,
    ModelIdentity,
    build_reports,
    build_seg,
    build_sr,
    label_concept,
)

__all__ = [
    "LOCAL_SCHEME",
    "Bridge",
    "DicomWeb",
    "ErrorKind",
    "Finding",
    "Graphic",
    "InstanceRef",
    "ModelIdentity",
    "Outcome",
    "PacsError",
    "QuerySummary",
    "RegionPrompt",
    "Request",
    "StateFile",
    "StoreResult",
    "build_reports",
    "build_seg",
    "build_sr",
    "is_non_image",
    "label_concept",
    "validate",
]
