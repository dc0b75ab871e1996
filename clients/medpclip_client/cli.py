"""`medpclip-client`: score labels for a region of a medical image on a MedP-CLIP server."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from medpclip_core.dicom import local_request
from medpclip_core.errors import InputError
from medpclip_core.imaging import is_dicom
from medpclip_core.tensors import MAX_LABEL_CHARS, MAX_LABELS

from .arguments import (
    CONNECTION_EPILOG,
    EXIT_DENIED,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_REJECTED,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    REGION_EPILOG,
    SEVERAL_REGIONS_EPILOG,
    WINDOW_EPILOG,
    RegionSpec,
    UsageError,
    add_connection_arguments,
    add_label_arguments,
    add_region_arguments,
    add_window_argument,
    connection_options,
    exit_codes_help,
    integer,
    join_negative,
    parse_box,  # noqa: F401 - the parsers' former home; kept importable
    parse_header,  # noqa: F401
    parse_point,  # noqa: F401
    parse_window,  # noqa: F401
    read_labels_file,
    regions_from_args,
)
from .client import (
    STATUS_RETRYABLE,
    MedPClipClient,
    MedPClipError,
    Region,
    Request,
    Result,
    load_mask,
    save_mask,
)

PROG = "medpclip-client"

DESCRIPTION = """\
Send a PNG, JPEG or DICOM image (decoded by the server) with an optional region prompt to a
MedP-CLIP Triton server; print how well each candidate label matches the region and the whole
image, the predicted region mask's IoU estimate and area.

IMAGE may also be a folder: every PNG, JPEG and DICOM file in it (DICOM recognised by its
extension .dcm/.dicom or by its content, for files named by UIDs) is sent, --concurrency at a
time, with the same prompt and labels, and one JSON object per file is printed per line as the
answers arrive (JSON lines), with a progress bar on stderr when it is a terminal.

Several regions of one image (several --box, or --region) are answered with one upload and
one encoding of the image: one table (or, with --json, one JSON object in a list) per region,
in order."""

FOLDER_EXIT_NOTES = """\
folder: 0 only if every file succeeded; else 1 if a file failed for another reason, else 3 if
a file was rejected (see its "error"); an unreachable server (4) or a refused caller (5) stops
the batch."""

MASK_NOTES = """\
  --mask takes a PNG of exactly the image's size; any nonzero pixel (any colour channel, alpha
  ignored) marks the region. Points, box and mask can be combined. Without any prompt the
  model gets no region hint.
"""

REGIONS_NOTES = """\
  Several regions print one table each, headed by the region (--json: a list of objects,
  each with its "region"); --save-mask OUT.png writes OUT.1.png, OUT.2.png, ... --mask joins
  a single region and cannot go with several; a folder IMAGE takes a single region.
"""

EPILOG = f"""\
{REGION_EPILOG}{MASK_NOTES}
{SEVERAL_REGIONS_EPILOG}{REGIONS_NOTES}
labels:
  Each label is one argument; quote labels that contain spaces:
      --labels "a lung nodule" "a cyst" "normal lung"
  Put IMAGE before --labels (or end the list with --) so that IMAGE is not taken as a label.
  --labels-file reads one label per line (UTF-8); blank lines and lines starting with # are
  skipped. At most {MAX_LABELS} labels of at most {MAX_LABEL_CHARS} characters. Without labels
  only the mask, IoU and embeddings are computed.

{WINDOW_EPILOG}
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

{CONNECTION_EPILOG}
{exit_codes_help(FOLDER_EXIT_NOTES)}
No patient data is printed: DICOM tags are never printed, and with --decode-locally never sent;
in folder mode file names appear only relative to the folder.
"""

# --- parsing ----------------------------------------------------------------------------------


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
    g = add_region_arguments(p)
    g.add_argument(
        "--mask", metavar="MASK.png", help="a mask of the image's size, nonzero = region"
    )
    add_window_argument(p)
    add_label_arguments(p)
    d = p.add_argument_group("DICOM")
    d.add_argument(
        "--frame",
        metavar="N",
        type=integer(0),
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
        type=integer(1),
        default=4,
        help="requests in flight at once (default 4)",
    )
    b.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_connection_arguments(p)
    p.add_argument("--top", metavar="K", type=integer(1), help="show only the K best labels")
    p.add_argument(
        "--save-mask",
        metavar="OUT.png|DIR",
        help="write the predicted mask (PNG, 0/255); for several regions OUT.1.png, OUT.2.png, "
        "...; for a folder, a directory for the masks",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object instead of a table (several regions: a list, one each)",
    )
    p.add_argument(
        "--embeddings",
        action="store_true",
        help="include the global and region embeddings in the JSON (implies --json)",
    )
    return p


def region_from_args(args: argparse.Namespace) -> Region | None:
    """The one Region the options describe (with --mask), or None without any prompt option;
    UsageError when they describe several (see `regions_from_args`)."""
    regions = regions_from_args(args)
    if len(regions) > 1:
        raise UsageError(f"the options describe {len(regions)} regions; expected one")
    region = (regions[0].region() if regions else None) or Region()
    if args.mask:
        try:
            region.mask = load_mask(args.mask)
        except InputError as exc:
            raise UsageError(f"--mask: {exc}") from None
    return None if region.is_empty() else region


def _regions(args: argparse.Namespace, folder: bool) -> list[RegionSpec]:
    """The regions of the options when there are several (else [] and `region_from_args`
    gives the one region); UsageError for what cannot go with several regions."""
    regions = regions_from_args(args)
    if len(regions) < 2:
        return []
    if args.mask:
        raise UsageError(
            "--mask joins a single region; with several regions give the mask's region alone"
        )
    if folder:
        raise UsageError("several regions need one IMAGE file, not a folder")
    return regions


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


def mask_path(template: str, index: int) -> str:
    """Where --save-mask OUT.png puts region `index`'s mask (1-based): OUT.<index>.png."""
    path = Path(template)
    return str(path.with_name(f"{path.stem}.{index}{path.suffix or '.png'}"))


def format_regions(
    specs: Sequence[RegionSpec],
    results: Sequence[Result],
    top: int | None,
    saved: Sequence[str | None],
    tokens_nbytes: int = 0,
) -> str:
    """One block per region (`format_text`), headed by the region, in order."""
    blocks = [
        f"region {i}: {spec.describe()}\n{format_text(result, top, path)}"
        for i, (spec, result, path) in enumerate(zip(specs, results, saved, strict=True), 1)
    ]
    kib = f"; {tokens_nbytes / 1024:.0f} KiB of image tokens per region" if tokens_nbytes else ""
    blocks.append(f"(image encoded once for {len(specs)} regions{kib})")
    return "\n\n".join(blocks)


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
    """Keyword arguments of `MedPClipClient` / `AsyncMedPClipClient` from the options
    (`arguments.connection_options`; UsageError if --api-key-file cannot be read)."""
    return connection_options(args)


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
        args = parser.parse_args(join_negative(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        folder = Path(args.image).is_dir()
        image = None if folder else Path(args.image).read_bytes()
        labels = read_labels_file(args.labels_file) if args.labels_file else args.labels
        regions = _regions(args, folder)
        region = None if regions else region_from_args(args)
        options = client_options(args)
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
            return asyncio.run(
                run_folder(Path(args.image), args, region, labels or None, options=options)
            )
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED
    assert image is not None
    try:
        pixels_or_bytes, window = image_input(image, args)
        with MedPClipClient(**options) as client:
            if regions:
                results, tokens_nbytes = infer_regions(
                    client, pixels_or_bytes, window, regions, labels or None
                )
            else:
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
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - a CLI reports, it does not trace back
        _err(f"error: {type(exc).__name__}: {exc}")
        return EXIT_ERROR

    if regions:
        return _print_regions(args, regions, results, tokens_nbytes)
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


def infer_regions(
    client: MedPClipClient,
    image: bytes | Any,
    window: tuple[float, float] | None,
    regions: Sequence[RegionSpec],
    labels: Sequence[str] | None,
) -> tuple[list[Result], int]:
    """Every region of one image with one encode (`MedPClipClient.session`): the results in
    order and the image tokens' size. A failed region raises, its message naming it."""
    results = []
    with client.session(image, window) as session:
        for i, spec in enumerate(regions, 1):
            try:
                results.append(session.infer(spec.region(), labels))
            except (MedPClipError, InputError) as exc:
                message = getattr(exc, "message", None) or str(exc)
                message = f"region {i} ({spec.describe()}): {message}"
                if isinstance(exc, MedPClipError):
                    raise MedPClipError(message, exc.status, exc.attempts) from None
                raise InputError(message) from None
        return results, session.tokens_nbytes


def _print_regions(
    args: argparse.Namespace,
    regions: Sequence[RegionSpec],
    results: Sequence[Result],
    tokens_nbytes: int,
) -> int:
    saved: list[str | None] = []
    for i, result in enumerate(results, 1):
        path = mask_path(args.save_mask, i) if args.save_mask else None
        if path is not None:
            try:
                save_mask(result.mask, path)
            except (OSError, ValueError) as exc:
                _err(f"error: cannot save the mask of region {i}: {exc}")
                return EXIT_ERROR
        saved.append(path)
    if args.json or args.embeddings:
        docs = [
            {"region": spec.to_json(), **to_json(result, args.top, path, args.embeddings)}
            for spec, result, path in zip(regions, results, saved, strict=True)
        ]
        return _print(json.dumps(docs))
    return _print(format_regions(regions, results, args.top, saved, tokens_nbytes))


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
    root: Path,
    args: argparse.Namespace,
    region: Region | None,
    labels: list[str] | None,
    *,
    options: dict[str, Any] | None = None,
) -> int:
    """Every image under `root` through the asyncio client, `--concurrency` in flight;
    `options`: the client's keyword arguments (default: `client_options(args)`)."""
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
        async with AsyncMedPClipClient(**(options or client_options(args))) as client:
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
