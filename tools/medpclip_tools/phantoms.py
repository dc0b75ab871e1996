"""Synthetic CT-like "phantom" slices with labelled findings, deterministic from a seed.

Each slice (Hounsfield units, int16-exact) has a body outline, an organ, noise and two or three
findings of different kinds at random places, each with its mask, box and label phrasings. The
embedded default model is trained and evaluated on these, since no MedP-CLIP weights are public.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

# kind -> phrasings (the first is the canonical label used for evaluation)
FINDINGS: dict[str, list[str]] = {
    "nodule": [
        "a round hyperdense nodule",
        "a nodule",
        "a solid round nodule",
        "a well-defined hyperdense nodule",
    ],
    "cyst": [
        "a dark cyst",
        "a cyst",
        "a hypodense cystic lesion",
        "a round cyst with smooth margins",
    ],
    "mass": [
        "a spiculated mass",
        "an irregular mass with spiculated borders",
        "a spiculated tumour",
        "a mass with spiculated margins",
    ],
    "calcification": [
        "a calcification",
        "a small bright calcified focus",
        "a calcified granuloma",
        "a dense calcification",
    ],
}
KINDS = list(FINDINGS)
CANONICAL = [FINDINGS[k][0] for k in KINDS]
WINDOW = (40.0, 400.0)  # soft-tissue window (centre, width), written into the DICOM tags


@dataclass
class Finding:
    kind: str
    mask: np.ndarray  # bool [H,W]
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 (pixel edges)

    @property
    def label(self) -> str:
        return FINDINGS[self.kind][0]

    @property
    def kind_index(self) -> int:
        return KINDS.index(self.kind)


@dataclass
class Phantom:
    hu: np.ndarray  # int16 [H,W], Hounsfield units
    findings: list[Finding]


def _disc(yy, xx, cy, cx, r):
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def _spiculated(yy, xx, cy, cx, r, rng):
    """A core disc with thin spikes radiating out."""
    core = _disc(yy, xx, cy, cx, r)
    angle = np.arctan2(yy - cy, xx - cx)
    dist = np.hypot(yy - cy, xx - cx)
    spikes = np.zeros_like(core)
    for a in rng.uniform(0, 2 * np.pi, rng.integers(7, 11)):
        length = r * rng.uniform(1.5, 2.0)
        d = np.abs(np.angle(np.exp(1j * (angle - a))))
        spikes |= (d * dist < 1.6) & (dist < length)
    return core | spikes


def make_phantom(rng: np.random.Generator) -> Phantom:
    h, w = int(rng.integers(144, 209)), int(rng.integers(144, 209))
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    hu = np.full((h, w), -1000.0, np.float32)  # air
    cy, cx = h / 2 + rng.uniform(-4, 4), w / 2 + rng.uniform(-4, 4)
    ry, rx = h * rng.uniform(0.42, 0.47), w * rng.uniform(0.42, 0.47)
    body = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    hu[body] = 35
    oy, ox = cy + rng.uniform(-0.3, 0.3) * ry, cx + rng.uniform(-0.3, 0.3) * rx
    organ = ((yy - oy) / (ry * 0.5)) ** 2 + ((xx - ox) / (rx * 0.45)) ** 2 <= 1
    hu[organ & body] = 60

    findings: list[Finding] = []
    occupied = np.zeros((h, w), bool)
    kinds = list(rng.choice(KINDS, size=int(rng.integers(2, 4)), replace=False))
    for kind in kinds:
        for _ in range(100):  # place without overlap, inside the body
            r = {"nodule": (9, 14), "cyst": (10, 16), "mass": (8, 11), "calcification": (5, 7)}
            radius = rng.uniform(*r[kind])
            fy = rng.uniform(cy - ry * 0.7, cy + ry * 0.7)
            fx = rng.uniform(cx - rx * 0.7, cx + rx * 0.7)
            if kind == "mass":
                m = _spiculated(yy, xx, fy, fx, radius, rng)
            else:
                m = _disc(yy, xx, fy, fx, radius)
            grown = _disc(yy, xx, fy, fx, radius * (2.2 if kind == "mass" else 1.0) + 6)
            if (m & ~body).any() or (grown & occupied).any():
                continue
            occupied |= grown
            hu[m] = {"nodule": 180, "cyst": 0, "mass": 110, "calcification": 900}[kind]
            ys, xs = np.nonzero(m)
            box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
            findings.append(Finding(kind, m, box))
            break
    hu += rng.normal(0, 12, (h, w)).astype(np.float32) * body
    return Phantom(np.clip(np.round(hu), -1024, 3071).astype(np.int16), findings)


def phantoms(seed: int, count: int) -> list[Phantom]:
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < count:
        p = make_phantom(rng)
        if len(p.findings) >= 2:
            out.append(p)
    return out


def to_dicom(p: Phantom, index: int = 0) -> bytes:
    """A CT Image Storage Part 10 file: stored = HU + 1024 (slope 1, intercept -1024), with the
    soft-tissue window in the tags. Synthetic: no patient data."""
    from pydicom import Dataset
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "CT"
    # the CT Image IOD's geometry (a SEG needs its Frame of Reference): 1 mm axial pixels
    ds.FrameOfReferenceUID = generate_uid()
    ds.ImagePositionPatient = [0.0, 0.0, float(index)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [1.0, 1.0]
    ds.SliceThickness = 1.0
    ds.PatientName, ds.PatientID = "PHANTOM^SYNTHETIC", f"PHANTOM{index:05d}"
    ds.Rows, ds.Columns = p.hu.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.WindowCenter, ds.WindowWidth = WINDOW
    ds.PixelData = (p.hu.astype(np.int32) + 1024).astype(np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
