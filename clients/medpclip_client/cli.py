"""`medpclip-client`: score labels for a region of a medical image on a MedP-CLIP server."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from .client import DEFAULT_URL, MedPClipClient, MedPClipError, Region, Result, load_mask, save_mask
from .imaging import InputError
from .tensors import MAX_LABEL_CHARS, MAX_LABELS, MAX_POINTS

PROG = "medpclip-client"

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_REJECTED = 3
EXIT_UNAVAILABLE = 4

DESCRIPTION = """\
Send a PNG, JPEG or DICOM image (decoded by the server) with an optional region prompt to a
MedP-CLIP Triton server; print how well each candidate label matches the region and the whole
image, the predicted region mask's IoU estimate and area."""

EPILOG = f"""\
coordinates:
  All prompts are in pixels of the ORIGINAL image (before any resizing by the server):
  x = column (0 at the left edge), y = row (0 at the top edge). Points must lie inside the
  image; a box must satisfy 0 <= X0 < X1 <= width and 0 <= Y0 < Y1 <= height. At most
  {MAX_POINTS} points. --mask takes a PNG of exactly the image's size; any nonzero pixel
  (any colour channel, alpha ignored) marks the region. Points, box and mask can be combined.
  Without any prompt the model gets no region hint.

labels:
  Each label is one argument; quote labels that contain spaces:
      --labels "a lung nodule" "a cyst" "normal lung"
  Put IMAGE before --labels (or end the list with --) so that IMAGE is not taken as a label.
  --labels-file reads one label per line (UTF-8); blank lines and lines starting with # are
  skipped. At most {MAX_LABELS} labels of at most {MAX_LABEL_CHARS} characters. Without labels
  only the mask, IoU and embeddings are computed.

window:
  --window C,W sets the display window (centre, width), e.g. --window=-600,1500 for a CT lung
  window; for DICOM it overrides the window stored in the file.

exit codes:
  0  success
  1  other error (e.g. the mask could not be saved, unexpected server error)
  2  usage error (bad option or option value, unreadable local file)
  3  the server rejected the input (its message is printed on stderr)
  4  the server or model is unreachable, not ready, or did not answer within --timeout

No patient data is printed: DICOM files are sent as bytes and never parsed by this tool.
"""


class UsageError(Exception):
    """A command-line problem: exit code 2."""


# --- parsing ----------------------------------------------------------------------------------


def _floats(text: str, n: int | tuple[int, ...], syntax: str) -> list[float]:
    parts = [p.strip() for p in text.split(",")]
    counts = (n,) if isinstance(n, int) else n
    if len(parts) not in counts:
        raise argparse.ArgumentTypeError(f"expected {syntax}, got {text!r}")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {syntax}, got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers, got {text!r}")
    return values


def parse_point(text: str) -> tuple[float, float, int]:
    """'X,Y' or 'X,Y,LABEL' (LABEL 1 = foreground, the default, 0 = background)."""
    syntax = "X,Y or X,Y,LABEL with LABEL 1 (foreground) or 0 (background)"
    v = _floats(text, (2, 3), syntax)
    label = 1
    if len(v) == 3:
        if v[2] not in (0.0, 1.0):
            raise argparse.ArgumentTypeError(f"expected {syntax}, got {text!r}")
        label = int(v[2])
    return v[0], v[1], label


def parse_box(text: str) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = _floats(text, 4, "X0,Y0,X1,Y1 (top-left, bottom-right corner)")
    return x0, y0, x1, y1


def parse_window(text: str) -> tuple[float, float]:
    centre, width = _floats(text, 2, "CENTRE,WIDTH")
    return centre, width


def _positive_int(text: str) -> int:
    try:
        k = int(text)
    except ValueError:
        k = 0
    if k < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return k


def _timeout(text: str) -> float:
    try:
        t = float(text)
    except ValueError:
        t = -1.0
    if not (math.isfinite(t) and t >= 0):
        raise argparse.ArgumentTypeError(f"must be seconds >= 0 (0: no limit), got {text!r}")
    return t


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("image", metavar="IMAGE", help="PNG, JPEG or DICOM Part 10 file")
    g = p.add_argument_group("region prompt (original image pixels, x = column, y = row)")
    g.add_argument(
        "--point",
        metavar="X,Y[,LABEL]",
        type=parse_point,
        action="append",
        default=[],
        help="a point; LABEL 1 = inside the region (default), 0 = outside; repeatable",
    )
    g.add_argument("--box", metavar="X0,Y0,X1,Y1", type=parse_box, help="a bounding box")
    g.add_argument(
        "--mask", metavar="MASK.png", help="a mask of the image's size, nonzero = region"
    )
    lab = p.add_mutually_exclusive_group()
    lab.add_argument("--labels", metavar="LABEL", nargs="+", help="candidate labels (free text)")
    lab.add_argument("--labels-file", metavar="F", help="candidate labels, one per line")
    p.add_argument("--window", metavar="C,W", type=parse_window, help="display window centre,width")
    p.add_argument(
        "--url", default=DEFAULT_URL, help=f"Triton gRPC endpoint host:port (default {DEFAULT_URL})"
    )
    p.add_argument(
        "--timeout",
        metavar="S",
        type=_timeout,
        default=60.0,
        help="seconds to wait for the server (default 60; 0: no limit)",
    )
    p.add_argument("--top", metavar="K", type=_positive_int, help="show only the K best labels")
    p.add_argument("--save-mask", metavar="OUT.png", help="write the predicted mask (PNG, 0/255)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument(
        "--embeddings",
        action="store_true",
        help="include the global and region embeddings in the JSON (implies --json)",
    )
    return p


_VALUE_OPTIONS = ("--point", "--box", "--window")
_NEGATIVE = re.compile(r"^-[\d.]")


def _join_negative(argv: Sequence[str]) -> list[str]:
    """`--window -600,1500` -> `--window=-600,1500`: argparse would take the value for an
    option."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            out.extend(argv[i:])
            break
        if a in _VALUE_OPTIONS and i + 1 < len(argv) and _NEGATIVE.match(argv[i + 1]):
            out.append(f"{a}={argv[i + 1]}")
            i += 2
            continue
        out.append(a)
        i += 1
    return out


def read_labels_file(path: str) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read --labels-file: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError("--labels-file is not UTF-8 text") from None
    labels = [s.strip() for s in text.splitlines()]
    return [s for s in labels if s and not s.startswith("#")]


def region_from_args(args: argparse.Namespace) -> Region | None:
    """The Region the options describe, or None without any prompt option."""
    mask = None
    if args.mask:
        try:
            mask = load_mask(args.mask)
        except InputError as exc:
            raise UsageError(f"--mask: {exc}") from None
    region = Region(
        points=[(x, y) for x, y, _ in args.point] or None,
        point_labels=[lab for _, _, lab in args.point] or None,
        box=args.box,
        mask=mask,
    )
    return None if region.is_empty() else region


# --- output -----------------------------------------------------------------------------------


def format_table(rows: Sequence[tuple[str, float, float | None]]) -> str:
    """Aligned label / region probability / whole-image probability table."""
    header = ("label", "region", "image")
    cells = [(lab, f"{r:.4f}", "-" if i is None else f"{i:.4f}") for lab, r, i in rows]
    width = max([len(header[0])] + [len(c[0]) for c in cells])
    lines = [f"{header[0]:<{width}}  {header[1]:>7}  {header[2]:>7}"]
    lines += [f"{lab:<{width}}  {r:>7}  {i:>7}" for lab, r, i in cells]
    return "\n".join(lines)


def format_text(result: Result, top: int | None, saved: str | None) -> str:
    lines: list[str] = []
    if result.labels:
        rows = result.top(top)
        lines.append(format_table(rows))
        if len(rows) < len(result.labels):
            lines.append(f"({len(rows)} of {len(result.labels)} labels shown)")
        lines.append("")
    else:
        lines.append(f"no labels given: embeddings only (dimension {result.global_embedding.size})")
    h, w = result.mask.shape[:2]
    area = result.mask_area
    pct = 100.0 * area / (h * w) if h * w else 0.0
    lines.append(f"IoU (predicted)  {result.iou:.3f}")
    lines.append(f"mask area        {area} px ({pct:.2f}% of {w}x{h})")
    if saved:
        lines.append(f"mask saved to    {saved}")
    return "\n".join(lines)


def to_json(
    result: Result, top: int | None, saved: str | None, embeddings: bool = False
) -> dict[str, object]:
    h, w = result.mask.shape[:2]
    out: dict[str, object] = {
        "labels": [
            {"label": lab, "region_prob": r, "image_prob": i} for lab, r, i in result.top(top)
        ],
        "iou": result.iou,
        "mask": {"area_px": result.mask_area, "width": int(w), "height": int(h), "saved": saved},
        "dims": {
            "global_embedding": list(result.global_embedding.shape),
            "region_embedding": list(result.region_embedding.shape),
            "patch_features": list(result.patch_features.shape),
        },
    }
    if embeddings:
        out["global_embedding"] = [float(v) for v in result.global_embedding.reshape(-1)]
        out["region_embedding"] = [float(v) for v in result.region_embedding.reshape(-1)]
    return out


# --- main -------------------------------------------------------------------------------------


def _err(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (see --help)."""
    parser = build_parser()
    try:
        args = parser.parse_args(_join_negative(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        image = Path(args.image).read_bytes()
        labels = read_labels_file(args.labels_file) if args.labels_file else args.labels
        region = region_from_args(args)
    except OSError as exc:
        parser.print_usage(sys.stderr)
        _err(f"error: cannot read IMAGE: {exc.strerror or exc}")
        return EXIT_USAGE
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        _err(f"error: {exc}")
        return EXIT_USAGE
    timeout = args.timeout or None
    try:
        with MedPClipClient(args.url, timeout_s=timeout) as client:
            result = client.infer(image, region, labels or None, args.window)
    except MedPClipError as exc:
        if exc.invalid_input:
            _err(f"input rejected by the server: {exc.message}")
            return EXIT_REJECTED
        if exc.unavailable:
            _err(f"server unavailable at {args.url} ({exc.status}): {exc.message}")
            return EXIT_UNAVAILABLE
        _err(f"error: {exc}")
        return EXIT_ERROR
    except InputError as exc:
        _err(f"input rejected: {exc}")
        return EXIT_REJECTED
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - a CLI reports, it does not trace back
        _err(f"error: {type(exc).__name__}: {exc}")
        return EXIT_ERROR

    saved = None
    if args.save_mask:
        try:
            save_mask(result.mask, args.save_mask)
        except (OSError, ValueError) as exc:
            _err(f"error: cannot save the mask: {exc}")
            return EXIT_ERROR
        saved = args.save_mask
    if args.json or args.embeddings:
        text = json.dumps(to_json(result, args.top, saved, args.embeddings))
    else:
        text = format_text(result, args.top, saved)
    try:
        print(text, flush=True)
    except BrokenPipeError:  # e.g. `| head`: stop quietly, no traceback at interpreter exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    return EXIT_OK
