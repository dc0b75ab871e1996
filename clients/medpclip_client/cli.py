"""`medpclip-client`: score labels for a region of a medical image on a MedP-CLIP server."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import sys
import textwrap
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from medpclip_core.dicom import WINDOW_PRESETS, local_request
from medpclip_core.imaging import InputError, is_dicom
from medpclip_core.tensors import MAX_LABEL_CHARS, MAX_LABELS, MAX_POINTS

from .client import (
    DEFAULT_URL,
    STATUS_RETRYABLE,
    MedPClipClient,
    MedPClipError,
    Region,
    Request,
    Result,
    RetryPolicy,
    load_mask,
    read_key_file,
    save_mask,
)

PROG = "medpclip-client"

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_REJECTED = 3
EXIT_UNAVAILABLE = 4
EXIT_DENIED = 5

DESCRIPTION = """\
Send a PNG, JPEG or DICOM image (decoded by the server) with an optional region prompt to a
MedP-CLIP Triton server; print how well each candidate label matches the region and the whole
image, the predicted region mask's IoU estimate and area.

IMAGE may also be a folder: every PNG, JPEG and DICOM file in it (DICOM recognised by its
extension .dcm/.dicom or by its content, for files named by UIDs) is sent, --concurrency at a
time, with the same prompt and labels, and one JSON object per file is printed per line as the
answers arrive (JSON lines), with a progress bar on stderr when it is a terminal."""

_PRESETS = textwrap.fill(
    ", ".join(f"{k} ({c:g},{w:g})" for k, (c, w) in WINDOW_PRESETS.items()),
    width=94,
    initial_indent="  ",
    subsequent_indent="  ",
)

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
  window, or names a preset:
{_PRESETS}
  For DICOM it overrides the window stored in the file.

DICOM:
  By default files are sent as they are and the server decodes them (first frame, the file's
  window). --decode-locally decodes here with pydicom and sends only pixels: for transfer
  syntaxes the server cannot decode, and so that no DICOM tags leave this machine. --frame N
  picks frame N of multi-frame DICOM files (decoded here: the server reads only frame 0).

folders (IMAGE is a directory):
  Each output line is {{"file": NAME, ...}} with NAME relative to the folder and the fields of
  --json, or {{"file": NAME, "error": MESSAGE, "status": STATUS}} for a file that failed; a
  failed file does not stop the batch. Lines come in completion order. --recursive descends
  into subfolders; --save-mask DIR writes DIR/NAME.mask.png.

connection:
  --tls encrypts the channel (verifying the server with --root-cert, else the system CAs);
  --client-cert/--client-key add a client certificate (mutual TLS). --header KEY=VALUE adds
  gRPC metadata to every call (never printed). The server's API key comes from
  --api-key-file FILE, MEDPCLIP_API_KEY_FILE or MEDPCLIP_API_KEY (never on the command line).
  A call that finds the server UNAVAILABLE is retried --retries times with backoff; --timeout
  bounds each file's call, retries included.

exit codes:
  0  success (folder: every file succeeded)
  1  other error (e.g. the mask could not be saved, unexpected server error; folder: a file
     failed for such a reason)
  2  usage error (bad option or option value, unreadable local file)
  3  the input was rejected, by the server or while decoding it here (the message is printed
     on stderr; folder: at least one file was rejected, see its "error")
  4  the server or model is unreachable, not ready, or did not answer within --timeout
     (folder: the batch stops at the first unreachable-server error)
  5  the server refused the caller: no API key or a wrong one (see --api-key-file)

No patient data is printed: DICOM tags are never printed, and with --decode-locally never sent;
in folder mode file names appear only relative to the folder.
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
    """'CENTRE,WIDTH' or a preset name (see dicom.WINDOW_PRESETS)."""
    preset = WINDOW_PRESETS.get(text.strip().lower())
    if preset is not None:
        return preset
    centre, width = _floats(text, 2, f"CENTRE,WIDTH or a preset ({', '.join(WINDOW_PRESETS)})")
    return centre, width


def parse_header(text: str) -> tuple[str, str]:
    """'KEY=VALUE' gRPC metadata."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError("expected KEY=VALUE")  # no value echoed: may be a secret
    return key.strip().lower(), value


def _count(text: str) -> int:
    try:
        k = int(text)
    except ValueError:
        k = -1
    if k < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return k


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
    p.add_argument(
        "image", metavar="IMAGE", help="PNG, JPEG or DICOM Part 10 file, or a folder of them"
    )
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
    p.add_argument(
        "--window",
        metavar="C,W|PRESET",
        type=parse_window,
        help="display window centre,width or a preset name (lung, bone, ...)",
    )
    d = p.add_argument_group("DICOM")
    d.add_argument(
        "--frame",
        metavar="N",
        type=_count,
        default=0,
        help="frame of multi-frame DICOM files (default 0); N > 0 decodes them here",
    )
    d.add_argument(
        "--decode-locally",
        action="store_true",
        help="decode images here and send pixels (no DICOM tags leave this machine)",
    )
    b = p.add_argument_group("folders")
    b.add_argument("--recursive", action="store_true", help="include subfolders")
    b.add_argument(
        "--concurrency",
        metavar="N",
        type=_positive_int,
        default=4,
        help="requests in flight at once (default 4)",
    )
    b.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
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
    c = p.add_argument_group("connection")
    c.add_argument(
        "--retries",
        metavar="N",
        type=_count,
        default=RetryPolicy.retries,
        help=f"retries when the server is UNAVAILABLE (default {RetryPolicy.retries}, about "
        "30 s: enough to ride out a server restart)",
    )
    c.add_argument("--tls", action="store_true", help="connect with TLS")
    c.add_argument("--root-cert", metavar="PEM", help="CA certificate(s) to verify the server")
    c.add_argument("--client-cert", metavar="PEM", help="client certificate chain (mutual TLS)")
    c.add_argument("--client-key", metavar="PEM", help="client private key (mutual TLS)")
    c.add_argument(
        "--header",
        metavar="KEY=VALUE",
        type=parse_header,
        action="append",
        default=[],
        help="gRPC metadata sent with every call, e.g. x-request-id=...; repeatable",
    )
    c.add_argument(
        "--api-key-file",
        metavar="FILE",
        type=Path,
        default=os.environ.get("MEDPCLIP_API_KEY_FILE") or None,
        help="file holding the server's API key (default: env MEDPCLIP_API_KEY_FILE, else the "
        "key in env MEDPCLIP_API_KEY); never pass a key itself on the command line",
    )
    p.add_argument("--top", metavar="K", type=_positive_int, help="show only the K best labels")
    p.add_argument(
        "--save-mask",
        metavar="OUT.png|DIR",
        help="write the predicted mask (PNG, 0/255); for a folder, a directory for the masks",
    )
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


def _unavailable(url: str, exc: MedPClipError) -> str:
    tries = f" (after {exc.attempts} attempts)" if exc.attempts > 1 else ""
    return f"server unavailable at {url} ({exc.status}): {exc.message}{tries}"


def client_options(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of `MedPClipClient` / `AsyncMedPClipClient` from the options."""
    return {
        "url": args.url,
        "timeout_s": args.timeout or None,
        "retries": args.retries,
        "ssl": args.tls,
        "root_certificates": args.root_cert,
        "certificate_chain": args.client_cert,
        "private_key": args.client_key,
        "headers": dict(args.header),
        "api_key": read_api_key(args.api_key_file),
    }


def read_api_key(path: Path | None) -> str | None:
    """The key in ``path`` (surrounding whitespace stripped); None without a path, which lets
    the client fall back to MEDPCLIP_API_KEY."""
    if path is None:
        return None
    try:
        return read_key_file(path)
    except ValueError as exc:
        raise SystemExit(f"{PROG}: --api-key-file: {exc}") from None


def image_input(
    data: bytes, args: argparse.Namespace
) -> tuple[bytes | Any, tuple[float, float] | None]:
    """(image, window) to send for a file's bytes: the bytes themselves, or decoded pixels with
    --decode-locally, and for DICOM files when --frame N > 0 (the server reads frame 0 only)."""
    if args.decode_locally or (args.frame and is_dicom(data)):
        return local_request(data, args.frame, args.window)
    return data, args.window


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (see --help)."""
    with warnings.catch_warnings():
        # pydicom's warnings about malformed attributes quote their values (PHI, e.g. a name)
        warnings.filterwarnings("ignore", module="pydicom")
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(_join_negative(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        folder = Path(args.image).is_dir()
        image = None if folder else Path(args.image).read_bytes()
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
    if folder:
        try:
            return asyncio.run(run_folder(Path(args.image), args, region, labels or None))
        except KeyboardInterrupt:
            return 130
    assert image is not None
    try:
        pixels_or_bytes, window = image_input(image, args)
        with MedPClipClient(**client_options(args)) as client:
            result = client.infer(pixels_or_bytes, region, labels or None, window)
    except MedPClipError as exc:
        if exc.invalid_input:
            _err(f"input rejected by the server: {exc.message}")
            return EXIT_REJECTED
        if exc.unavailable:
            _err(_unavailable(args.url, exc))
            return EXIT_UNAVAILABLE
        if exc.denied:
            _err(f"refused by the server: {exc.message}")
            return EXIT_DENIED
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
    return _print(text)


def _print(text: str) -> int:
    try:
        print(text, flush=True)
    except BrokenPipeError:  # e.g. `| head`: stop quietly, no traceback at interpreter exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    return EXIT_OK


# --- folders ----------------------------------------------------------------------------------

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom"}
# A server-side or client-side error that means "the server is not there": stop the batch.
_STOP_STATUSES = (STATUS_RETRYABLE, "StatusCode.NOT_FOUND")


def find_images(root: Path, recursive: bool = False) -> list[Path]:
    """PNG/JPEG/DICOM files under `root`, sorted; DICOM also without a known extension (PACS
    exports are often named by UID), recognised by its 'DICM' preamble. Hidden files skipped."""
    candidates = root.rglob("*") if recursive else root.iterdir()
    found = []
    for path in candidates:
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES or _sniff_dicom(path):
            found.append(path)
    return sorted(found)


def _sniff_dicom(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return is_dicom(f.read(132))
    except OSError:
        return False


class _Report:
    """Writes one JSON line per file (beside the progress bar) and tallies the exit code."""

    def __init__(self, total: int, args: argparse.Namespace) -> None:
        self.args = args
        self.rejected = self.failed = 0
        self.bar = _progress_bar(total, disabled=args.no_progress)
        self.write: Callable[[str], None] = getattr(self.bar, "write", None) or print

    def result(self, name: str, result: Result) -> None:
        saved = None
        if self.args.save_mask:
            target = Path(self.args.save_mask) / f"{name}.mask.png"
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                save_mask(result.mask, target)
                saved = f"{name}.mask.png"  # relative to --save-mask, like "file"
            except (OSError, ValueError) as exc:
                self.error(name, MedPClipError(f"cannot save the mask: {exc}"), rejected=False)
                return
        self._line({"file": name, **to_json(result, self.args.top, saved, self.args.embeddings)})

    def error(self, name: str, exc: Exception, rejected: bool) -> None:
        if rejected:
            self.rejected += 1
        else:
            self.failed += 1
        status = exc.status if isinstance(exc, MedPClipError) else None
        message = exc.message if isinstance(exc, MedPClipError) else str(exc)
        if isinstance(exc, OSError):
            message = f"cannot read the file: {exc.strerror or type(exc).__name__}"
        self._line({"file": name, "error": message, "status": status})

    def _line(self, doc: dict[str, object]) -> None:
        self.write(json.dumps(doc))
        sys.stdout.flush()
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> int:
        if self.bar is not None:
            self.bar.close()
        return EXIT_ERROR if self.failed else EXIT_REJECTED if self.rejected else EXIT_OK


def _progress_bar(total: int, disabled: bool) -> Any:
    """A tqdm bar on stderr, shown when stderr is a terminal (None without tqdm)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, file=sys.stderr, unit="img", disable=True if disabled else None)


async def run_folder(
    root: Path, args: argparse.Namespace, region: Region | None, labels: list[str] | None
) -> int:
    """Every image under `root` through the asyncio client, `--concurrency` in flight."""
    from .aio import AsyncMedPClipClient

    files = find_images(root, args.recursive)
    if not files:
        _err("error: no PNG, JPEG or DICOM files in the folder")
        return EXIT_USAGE
    report = _Report(len(files), args)

    def requests() -> Iterator[Request]:
        # read lazily, as infer_many frees a slot: at most --concurrency images in memory
        for path in files:
            name = path.relative_to(root).as_posix()
            try:
                image, window = image_input(path.read_bytes(), args)
            except InputError as exc:
                report.error(name, exc, rejected=True)
                continue
            except OSError as exc:
                report.error(name, exc, rejected=False)
                continue
            yield Request(image, region, labels, window, tag=name)

    try:
        async with AsyncMedPClipClient(**client_options(args)) as client:
            batch = client.infer_many(requests(), concurrency=args.concurrency)
            async with contextlib.aclosing(batch):
                async for out in batch:
                    name = out.request.tag
                    if out.result is not None:
                        report.result(name, out.result)
                        continue
                    exc = out.error
                    if isinstance(exc, MedPClipError) and exc.status in _STOP_STATUSES:
                        report.close()
                        _err(_unavailable(args.url, exc) + "; batch stopped")
                        return EXIT_UNAVAILABLE
                    if isinstance(exc, MedPClipError) and exc.denied:
                        report.close()  # every other file would be refused the same way
                        _err(f"refused by the server: {exc.message}; batch stopped")
                        return EXIT_DENIED
                    rejected = isinstance(exc, InputError) or (
                        isinstance(exc, MedPClipError) and exc.invalid_input
                    )
                    assert exc is not None
                    report.error(name, exc, rejected)
    except MedPClipError as exc:  # the client could not be created (e.g. a TLS file)
        report.close()
        _err(f"error: {exc}")
        return EXIT_ERROR
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    code = report.close()
    done = len(files) - report.rejected - report.failed
    _err(f"{len(files)} files: {done} ok, {report.rejected} rejected, {report.failed} failed")
    return code
