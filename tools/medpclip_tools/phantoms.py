"""Synthetic CT-like "phantom" slices with labelled findings, deterministic from a seed.

Each slice (Hounsfield units, int16-exact) has a body outline, an organ, noise and two or three
findings of different kinds at random places, each with its mask, box and label phrasings. The
embedded default model is trained and evaluated on these, since no MedP-CLIP weights are public.

    python -m medpclip_tools.phantoms --manifest OUT_DIR --count 300 --seed 0 [--format dicom]

writes phantoms as a fine-tuning manifest (`medpclip_tools.manifest`, `medpclip_tools.finetune`):
the images (DICOM, or 8-bit PNG in the soft-tissue window), one mask PNG per finding and
`manifest.jsonl`, one line per finding, prompted in turn by its box, its centre point and its
mask alone.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

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

    @property
    def centre(self) -> tuple[float, float]:
        """(x, y) of the mask pixel nearest the centroid, at the pixel's centre (inside even
        for a spiculated shape; the point `medpclip_tools.evaluate` prompts with)."""
        ys, xs = np.nonzero(self.mask)
        k = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))
        return float(xs[k]) + 0.5, float(ys[k]) + 0.5


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


# --- phantoms as a fine-tuning manifest ------------------------------------------------------

FORMATS = ("dicom", "png", "mixed")  # mixed: DICOM and PNG in turn
LABEL_STYLES = ("canonical", "kind")  # the first phrasing, or the bare kind ("nodule")
PROMPT_CYCLE = ("box", "points", "mask")  # the prompt each finding's line gives, in turn


def to_png(p: Phantom) -> bytes:
    """The slice in the soft-tissue window as an 8-bit greyscale PNG (what a viewer exports)."""
    from PIL import Image

    from medpclip_core.imaging import pixels_to_image

    display = pixels_to_image(p.hu.astype(np.float32), WINDOW)[..., 0]
    buf = io.BytesIO()
    Image.fromarray(np.round(display * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_manifest(
    out: Path, count: int, seed: int, fmt: str = "dicom", labels: str = "canonical"
) -> Path:
    """`count` phantoms of `seed` as images, masks and `out/manifest.jsonl`; returns its path.
    Finding j of image i is prompted by PROMPT_CYCLE[(i + j) % 3]; every line has its mask."""
    from .manifest import mask_png

    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if labels not in LABEL_STYLES:
        raise ValueError(f"labels must be one of {LABEL_STYLES}, got {labels!r}")
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, p in enumerate(phantoms(seed, count)):
        dicom = fmt == "dicom" or (fmt == "mixed" and i % 2 == 0)
        image = f"images/phantom-{i:05d}.{'dcm' if dicom else 'png'}"
        (out / image).write_bytes(to_dicom(p, i) if dicom else to_png(p))
        for j, f in enumerate(p.findings):
            mask = f"masks/phantom-{i:05d}-{j}.png"
            (out / mask).write_bytes(mask_png(f.mask))
            line: dict[str, object] = {
                "image": image,
                "label": f.label if labels == "canonical" else f.kind,
                "mask": mask,
            }
            form = PROMPT_CYCLE[(i + j) % len(PROMPT_CYCLE)]
            if form == "box":
                line["box"] = list(f.box)
            elif form == "points":
                line["points"] = [list(f.centre)]
            lines.append(json.dumps(line))
    path = out / "manifest.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m medpclip_tools.phantoms",
        description="Write phantom CT slices as a fine-tuning manifest (see "
        "medpclip_tools.manifest): OUT_DIR/images/, OUT_DIR/masks/ (one PNG per finding) and "
        "OUT_DIR/manifest.jsonl (one line per finding, prompted by its box, its centre point or "
        "its mask alone, in turn). Synthetic: no patient data.",
    )
    ap.add_argument("--manifest", type=Path, required=True, metavar="OUT_DIR")
    ap.add_argument("--count", type=int, default=300, help="images (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="phantom seed (default: %(default)s)")
    ap.add_argument(
        "--format",
        choices=FORMATS,
        default="dicom",
        help="DICOM files (window in the tags), 8-bit PNG in the soft-tissue window, or both in "
        "turn (default: %(default)s)",
    )
    ap.add_argument(
        "--labels",
        choices=LABEL_STYLES,
        default="canonical",
        help="each finding's first phrasing ('a dark cyst') or its bare kind ('cyst') "
        "(default: %(default)s)",
    )
    args = ap.parse_args(argv)
    if args.count < 1:
        ap.error("--count must be at least 1")
    path = write_manifest(args.manifest, args.count, args.seed, args.format, args.labels)
    n = sum(1 for _ in path.open())
    print(f"wrote {path}: {args.count} images, {n} regions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
