"""Manifests of annotated images for fine-tuning (`medpclip_tools.finetune`): reading and checking.

A manifest is a JSON Lines file, one annotated region per line:

    {"image": "images/ct-0001.dcm", "label": "a dark cyst", "mask": "masks/ct-0001-a.png",
     "box": [40, 52, 71, 80], "points": [[55.5, 66.5]], "split": "val"}

- image   (required) path of a DICOM Part 10 file or a PNG/JPEG, relative to the manifest's
          folder (or absolute). Decoded as the server decodes it: DICOM through its modality LUT
          and the window in its tags, PNG/JPEG as display values (8-bit).
- label   (required) free text naming what the region shows; the candidate labels of the
          fine-tuned model are the manifest's distinct labels.
- mask    PNG of the image's size, nonzero = inside the region. When present it is the target
          of the mask decoder and the truth for Dice.
- box     [x0, y0, x1, y1] in image pixels (x = column, y = row; edges, x0 < x1 <= width).
- points  [[x, y], ...] foreground points in image pixels (inside the image).
- split   "train" or "val" (optional). Every region of one image must be on the same side.

At least one of mask, box and points. The prompt a region is trained and evaluated with is its
box and/or points when given, else its mask. Any other key is refused (a misspelt "split"
would otherwise be silently ignored). Lines that are empty or start with '#' are skipped.

Every problem is reported as `ManifestError` naming the manifest line and the problem, before
anything is trained; messages name paths and keys from the manifest, never values read from an
image (no DICOM tag values).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medpclip_core import inputs
from medpclip_core.errors import InputError
from medpclip_core.tensors import MAX_LABEL_CHARS, MAX_LABELS, MAX_POINTS

KEYS = ("image", "label", "mask", "box", "points", "split")
SPLITS = ("train", "val")


class ManifestError(ValueError):
    """A manifest that cannot be used as it is: the message names the line and the problem."""


@dataclass
class Region:
    line: int  # 1-based line of the manifest
    image: Path  # resolved path
    label: str
    mask: Path | None = None  # resolved path
    box: tuple[float, float, float, float] | None = None
    points: list[tuple[float, float]] | None = None
    split: str | None = None

    @property
    def prompt_form(self) -> str:
        """What the region is prompted with: 'box', 'points', 'box+points' or 'mask'."""
        parts = [k for k, v in (("box", self.box), ("points", self.points)) if v]
        return "+".join(parts) or "mask"


@dataclass
class Image:
    path: Path  # resolved
    shown: str  # as the manifest first wrote it (for messages)
    line: int  # first line that names it
    height: int
    width: int
    regions: list[Region] = field(default_factory=list)


@dataclass
class Manifest:
    path: Path
    sha256: str  # of the manifest file's bytes
    regions: list[Region]
    images: dict[Path, Image]  # in order of first appearance

    @property
    def labels(self) -> list[str]:
        """The candidate label set: the distinct labels, sorted."""
        return sorted({r.label for r in self.regions})

    def first_line_of(self, label: str) -> int:
        return next(r.line for r in self.regions if r.label == label)


def _where(path: Path, line: int) -> str:
    return f"{path.name} line {line}"


def _number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def load_mask(path: Path) -> np.ndarray:
    """A mask image -> bool [H, W], nonzero (in any colour channel, alpha ignored) = inside."""
    from PIL import Image as PILImage

    with PILImage.open(path) as img:
        img.load()
        if img.mode in ("RGBA", "LA", "PA", "P"):
            img = img.convert("RGBA" if img.mode in ("RGBA", "PA", "P") else "LA")
            a = np.asarray(img)[..., :-1]
        else:
            a = np.asarray(img)
    return a.any(axis=-1) if a.ndim == 3 else a != 0


def decode_size(data: bytes) -> tuple[int, int]:
    """(height, width) of an image as the server decodes it (InputError if it cannot)."""
    return tuple(inputs.decode(data).shape[:2])  # type: ignore[return-value]


def read_manifest(path: str | Path) -> Manifest:
    """Parse and check a manifest: every line, every file it names, every prompt against its
    image. Raises ManifestError naming the first bad line."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} not found")
    raw = path.read_bytes()
    folder = path.parent
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ManifestError(f"{path.name} is not UTF-8 text (JSON Lines)") from None
    regions: list[Region] = []
    images: dict[Path, Image] = {}
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        regions.append(_region(path, folder, n, line, images))
    if not regions:
        raise ManifestError(f"{path.name} has no regions (one JSON object per line)")
    seen: list[str] = []
    for r in regions:
        if r.label not in seen:
            seen.append(r.label)
            if len(seen) > MAX_LABELS:
                raise ManifestError(
                    f"{_where(path, r.line)}: label number {len(seen)}; the distinct labels are "
                    f"the candidates of every request, at most {MAX_LABELS}"
                )
    return Manifest(path, hashlib.sha256(raw).hexdigest(), regions, images)


def _region(path: Path, folder: Path, n: int, line: str, images: dict[Path, Image]) -> Region:
    where = _where(path, n)

    def fail(problem: str) -> ManifestError:
        return ManifestError(f"{where}: {problem}")

    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise fail(f"not JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise fail(f"not a JSON object but {type(obj).__name__}")
    unknown = sorted(set(obj) - set(KEYS))
    if unknown:
        raise fail(f"unknown key(s) {', '.join(map(repr, unknown))}; known: {', '.join(KEYS)}")

    label = obj.get("label")
    if not isinstance(label, str):
        raise fail("'label' missing or not a string")
    if not label.strip():
        raise fail("empty 'label'")
    if len(label) > MAX_LABEL_CHARS:
        raise fail(f"'label' has {len(label)} characters; at most {MAX_LABEL_CHARS}")
    split = obj.get("split")
    if split is not None and split not in SPLITS:
        raise fail(f"'split' must be one of {', '.join(SPLITS)}")
    if not any(obj.get(k) is not None for k in ("mask", "box", "points")):
        raise fail("no region: give at least one of 'mask', 'box', 'points'")

    image = _image(obj.get("image"), folder, n, images, fail)
    h, w = image.height, image.width
    region = Region(n, image.path, label, split=split)

    box = obj.get("box")
    if box is not None:
        if not (isinstance(box, list) and len(box) == 4 and all(map(_number, box))):
            raise fail("'box' must be [x0, y0, x1, y1], four numbers")
        x0, y0, x1, y1 = (float(v) for v in box)
        if not (x0 < x1 and y0 < y1):
            raise fail("'box' must have x0 < x1 and y0 < y1")
        if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
            raise fail(f"'box' reaches outside the {w}x{h} image")
        region.box = (x0, y0, x1, y1)

    points = obj.get("points")
    if points is not None:
        ok = isinstance(points, list) and len(points) > 0
        ok = ok and all(
            isinstance(p, list) and len(p) == 2 and all(map(_number, p)) for p in points
        )
        if not ok:
            raise fail("'points' must be a non-empty list of [x, y] pairs of numbers")
        if len(points) > MAX_POINTS:
            raise fail(f"{len(points)} points; at most {MAX_POINTS}")
        for i, (x, y) in enumerate(points):
            if not (0 <= x < w and 0 <= y < h):
                raise fail(f"point {i} is outside the {w}x{h} image")
        region.points = [(float(x), float(y)) for x, y in points]

    mask = obj.get("mask")
    if mask is not None:
        if not isinstance(mask, str) or not mask:
            raise fail("'mask' must be a path (a string)")
        mpath = _resolve(folder, mask)
        if not mpath.is_file():
            raise fail(f"mask {mask!r} not found")
        try:
            m = load_mask(mpath)
        except Exception as exc:  # PIL raises many types for bad files
            raise fail(f"mask {mask!r} is not a readable image ({type(exc).__name__})") from None
        if m.shape != (h, w):
            raise fail(
                f"mask {mask!r} is {m.shape[1]}x{m.shape[0]} but its image is {w}x{h}; "
                "a mask has the image's size"
            )
        if not m.any():
            raise fail(f"mask {mask!r} is empty (no nonzero pixel)")
        region.mask = mpath
    image.regions.append(region)
    return region


def _resolve(folder: Path, name: str) -> Path:
    p = Path(name)
    return (p if p.is_absolute() else folder / p).resolve()


def _image(value: object, folder: Path, n: int, images: dict[Path, Image], fail) -> Image:
    if not isinstance(value, str) or not value:
        raise fail("'image' missing or not a path (a string)")
    p = _resolve(folder, value)
    if p in images:
        return images[p]
    if not p.is_file():
        raise fail(f"image {value!r} not found")
    try:
        h, w = decode_size(p.read_bytes())
    except InputError as exc:
        # the decoder's messages name formats, sizes and syntaxes, never tag values
        raise fail(f"image {value!r}: {exc}") from None
    images[p] = Image(p, value, n, h, w)
    return images[p]


def assign_splits(manifest: Manifest, holdout: float, seed: int) -> dict[Path, str]:
    """Image -> 'train' or 'val'. An image takes the `split` of its lines (they must agree);
    images whose lines carry none are held out at random (`holdout` of them, seeded), so the
    regions of one image are always on one side."""
    if not 0 <= holdout < 1:
        raise ManifestError(f"--holdout must be in [0, 1), got {holdout}")
    out: dict[Path, str] = {}
    free: list[Path] = []
    for p, img in manifest.images.items():
        given = {r.split for r in img.regions if r.split is not None}
        if len(given) > 1:
            lines = ", ".join(str(r.line) for r in img.regions if r.split is not None)
            raise ManifestError(
                f"{_where(manifest.path, img.regions[-1].line)}: image {img.shown!r} has regions "
                f"in both splits (lines {lines}); all regions of one image go to one side"
            )
        if given:
            out[p] = given.pop()
        else:
            free.append(p)
    if free:
        rng = np.random.default_rng(seed)
        k = round(holdout * len(free))
        if holdout > 0 and len(free) >= 2:
            k = min(max(k, 1), len(free) - 1)
        held = set(rng.permutation(len(free))[:k].tolist())
        for i, p in enumerate(free):
            out[p] = "val" if i in held else "train"
    return out


def mask_png(mask: np.ndarray) -> bytes:
    """A bool/0-1 mask as an 8-bit PNG (0 outside, 255 inside), the manifest's mask format."""
    from PIL import Image as PILImage

    buf = io.BytesIO()
    PILImage.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255).save(buf, format="PNG")
    return buf.getvalue()
