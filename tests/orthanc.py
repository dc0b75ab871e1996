"""A real Orthanc (Debian's `orthanc` + `orthanc-dicomweb`) for the PACS tests.

Started from a generated configuration on 127.0.0.1 with a free HTTP port, no DICOM listener,
no authentication, storage in a temporary directory, and the DICOMweb plugin enabled at
/dicom-web/. `scripts/setup.sh` installs the packages; without them the tests skip.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

ORTHANC_BINARY = Path("/usr/sbin/Orthanc")
_PLUGIN_NAME = "libOrthancDicomWeb.so"


def dicomweb_plugin() -> Path | None:
    """The DICOMweb plugin of the Debian package (asked from dpkg, the package's own list)."""
    try:
        files = subprocess.run(
            ["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        files = []
    candidates = [Path(f) for f in files if Path(f).name.startswith(_PLUGIN_NAME)]
    # prefer the plugins-directory link, then any versioned library
    candidates.sort(key=lambda p: (p.name != _PLUGIN_NAME, len(str(p))))
    return next((p for p in candidates if p.is_file()), None)


def missing() -> str | None:
    """Why Orthanc cannot be started here, or None."""
    if not ORTHANC_BINARY.is_file():
        return f"{ORTHANC_BINARY} not found: run scripts/setup.sh (installs Debian's orthanc)"
    if dicomweb_plugin() is None:
        return "the DICOMweb plugin is not installed: run scripts/setup.sh (orthanc-dicomweb)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    """One Orthanc process; use as a context manager. `url` is its REST root, `dicomweb` the
    DICOMweb root."""

    def __init__(self, workdir: Path, startup_timeout_s: float = 30.0) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dicomweb = f"{self.url}/dicom-web"
        self.startup_timeout_s = startup_timeout_s
        self.log = workdir / "orthanc.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def config(self) -> dict[str, object]:
        plugin = dicomweb_plugin()
        return {
            "Name": "medpclip-tests",
            "HttpPort": self.port,
            "RemoteAccessAllowed": False,  # loopback only
            "AuthenticationEnabled": False,
            "DicomServerEnabled": False,  # no DICOM port needed: everything goes over HTTP
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "Plugins": [str(plugin)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }

    def __enter__(self) -> Orthanc:
        why = missing()
        if why:
            raise RuntimeError(why)
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(json.dumps(self.config(), indent=2))
        with open(self.log, "wb") as log:
            self._proc = subprocess.Popen(
                [str(ORTHANC_BINARY), str(cfg)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self._proc.returncode}:\n{self.tail()}")
            try:
                self.get("/system")
                self.get("/dicom-web/studies")  # the plugin answers too
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.1)
        self.__exit__(None, None, None)
        raise RuntimeError(
            f"Orthanc did not answer within {self.startup_timeout_s} s:\n{self.tail()}"
        )

    def __exit__(self, *exc: object) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # --- REST --------------------------------------------------------------------------------

    def get(self, path: str) -> object:
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return json.loads(r.read() or b"null")

    def upload(self, data: bytes) -> dict:
        """POST /instances: store one DICOM file; returns Orthanc's answer."""
        req = urllib.request.Request(
            self.url + "/instances",
            data=data,
            headers={"Content-Type": "application/dicom"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def count_instances(self) -> int:
        stats = self.get("/statistics")
        assert isinstance(stats, dict)
        return int(stats["CountInstances"])


def admin_key(directory: Path) -> Path:
    """A key file for the launcher's --admin-key-file (the PACS bridge needs only the API key:
    the served model's identity is in the public ensembles' configuration)."""
    path = directory / "admin.key"
    path.write_text("pacs-tests-admin-" + os.urandom(16).hex() + "\n")
    path.chmod(0o600)
    return path


def part10(ds) -> bytes:
    """A pydicom dataset as Part 10 bytes."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def without_pixel_data(data: bytes) -> bytes:
    """A copy of an image file (new SOP Instance and Series UIDs) without its Pixel Data."""
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(io.BytesIO(data))
    del ds.PixelData
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return part10(ds)


JPEG_XL_LOSSLESS = "1.2.840.10008.1.2.4.110"
_MPEG2 = "1.2.840.10008.1.2.4.100"  # same length as the JPEG XL UID, known to pydicom 3.0


def with_unsupported_syntax(data: bytes, syntax: str = JPEG_XL_LOSSLESS) -> bytes:
    """A copy of an image file (new UIDs) claiming a compressed transfer syntax that no
    installed decoder reads (JPEG XL): encapsulated dummy frame, syntax UID patched in the file
    meta (pydicom 3.0 refuses to write a syntax it does not know, so MPEG2 is written and the
    UID of equal length swapped)."""
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(io.BytesIO(data))
    ds.PixelData = encapsulate([b"\xff\x0a" + bytes(64)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = _MPEG2
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    out = part10(ds)
    assert len(syntax) == len(_MPEG2)
    patched = out.replace(_MPEG2.encode() + b"\0", syntax.encode() + b"\0", 1)
    assert patched != out
    return patched


def without_geometry(data: bytes) -> bytes:
    """A CT slice stripped of its Frame of Reference and plane geometry (non-conformant, as
    older archives hold): no SEG can reference it."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    for keyword in (
        "FrameOfReferenceUID",
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "PixelSpacing",
        "SliceThickness",
        "PositionReferenceIndicator",
    ):
        if keyword in ds:
            delattr(ds, keyword)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def conformant_ct(data: bytes, study_date: str) -> bytes:
    """A phantom CT slice with the CT Image IOD's spatial attributes (the phantoms carry none;
    a SEG must share the source's Frame of Reference) and a study date for QIDO filtering."""
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(io.BytesIO(data))
    ds.FrameOfReferenceUID = generate_uid()
    ds.PositionReferenceIndicator = ""
    ds.ImagePositionPatient = [0.0, 0.0, 0.0]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.7, 0.7]
    ds.SliceThickness = 1.0
    ds.StudyDate, ds.StudyTime = study_date, "120000"
    return part10(ds)


def enhanced_ct(data: bytes, frames: int = 3) -> bytes:
    """A multi-frame image WITH a Frame of Reference (per-frame plane positions in functional
    groups, as enhanced CT/MR scanners write): `frames` copies of a CT slice 5 mm apart,
    converted by highdicom to a Legacy Converted Enhanced CT image (pydicom's test files hold
    no enhanced multi-frame image)."""
    import copy

    import highdicom as hd
    import pydicom
    from pydicom.uid import generate_uid

    base = pydicom.dcmread(io.BytesIO(data))
    series = generate_uid()
    slices = []
    for i in range(frames):
        ds = copy.deepcopy(base)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = series
        ds.InstanceNumber = i + 1
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + 5.0 * i]
        slices.append(ds)
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        slices,
        series_instance_uid=generate_uid(),
        series_number=1,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    return part10(enhanced)
