"""The command-line vocabulary `medpclip-client` and `medpclip-pacs` share: one definition of the
region prompt (--point, --box), --window, the inference-server connection (--url, --timeout,
--retries, TLS, --header, --api-key-file), the labels, the number parsers, the exit codes and
the help text describing them, so that the two commands cannot drift apart.

Values are parsed here once: a command gets (x, y, label) points, (x0, y0, x1, y1) boxes and a
(centre, width) window whatever spelling was used on its command line, and the list of regions
(`RegionSpec`) that --point, --box and --region describe (`regions_from_args`).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import textwrap
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medpclip_core.auth import read_key_file
from medpclip_core.dicom import WINDOW_PRESETS
from medpclip_core.tensors import MAX_POINTS

from .client import DEFAULT_URL, Region, RetryPolicy

__all__ = [
    "EXIT_CODES",
    "EXIT_DENIED",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_REJECTED",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "SEVERAL_REGIONS_EPILOG",
    "RegionSpec",
    "UsageError",
    "add_connection_arguments",
    "add_label_arguments",
    "add_region_arguments",
    "add_window_argument",
    "connection_options",
    "join_negative",
    "parse_box",
    "parse_header",
    "parse_point",
    "parse_region",
    "parse_window",
    "read_api_key",
    "read_labels_file",
    "regions_from_args",
]

# --- exit codes -------------------------------------------------------------------------------

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_REJECTED = 3
EXIT_UNAVAILABLE = 4
EXIT_DENIED = 5
EXIT_NOT_FOUND = 6
EXIT_INTERRUPTED = 130

# The meaning of each code, the same for both commands (printed in each --help).
EXIT_CODES: dict[int, str] = {
    EXIT_OK: "success",
    EXIT_ERROR: "other error (e.g. the mask or the report could not be stored, an unexpected "
    "server error)",
    EXIT_USAGE: "usage error: a bad option or option value, or a local file that cannot be read "
    "(image, --labels-file, --mask, --api-key-file)",
    EXIT_REJECTED: "the input was rejected, by the inference server (INVALID_ARGUMENT) or while "
    "reading or decoding it here (e.g. not an image, no pixel data, an undecodable transfer "
    "syntax); the message is printed on stderr",
    EXIT_UNAVAILABLE: "the inference server (or the DICOMweb archive) is unreachable, not ready, "
    "or did not answer within --timeout (--pacs-timeout)",
    EXIT_DENIED: "the inference server refused the caller: no API key or a wrong one (see "
    "--api-key-file)",
    EXIT_NOT_FOUND: "the study, series or instance is not in the DICOMweb archive (medpclip-pacs)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
}


def exit_codes_help(notes: str = "") -> str:
    """The "exit codes" section of an epilog: the shared table, then the command's `notes`."""
    lines = ["exit codes (the same for medpclip-client and medpclip-pacs):"]
    for code, meaning in EXIT_CODES.items():
        lines += textwrap.wrap(
            meaning, width=94, initial_indent=f"  {code:<4} ", subsequent_indent=" " * 7
        )
    if notes:
        lines.append(textwrap.indent(notes.strip("\n"), "  "))
    return "\n".join(lines) + "\n"


class UsageError(Exception):
    """A command-line problem found after parsing (e.g. an unreadable local file): exit 2."""


# --- value parsers (argparse `type=` functions) ------------------------------------------------


def _numbers(text: str, counts: tuple[int, ...], syntax: str) -> list[float]:
    """Comma-separated numbers ("1,2" or "1, 2"), or, without any comma, space-separated ones
    ("1 2", one quoted argument); finite only."""
    body = text.strip()
    parts = [p.strip() for p in body.split(",")] if "," in body else body.split()
    if len(parts) not in counts:
        raise argparse.ArgumentTypeError(f"expected {syntax}, got {text!r}")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {syntax}, got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers, got {text!r}")
    return values


POINT_SYNTAX = "X,Y or X,Y,LABEL with LABEL 1 (foreground) or 0 (background)"
BOX_SYNTAX = "X0,Y0,X1,Y1 (top-left, bottom-right corner)"
WINDOW_SYNTAX = f"CENTRE,WIDTH or a preset ({', '.join(WINDOW_PRESETS)})"


def parse_point(text: str) -> tuple[float, float, int]:
    """'X,Y' or 'X,Y,LABEL' (LABEL 1 = foreground, the default, 0 = background)."""
    v = _numbers(text, (2, 3), POINT_SYNTAX)
    label = 1
    if len(v) == 3:
        if v[2] not in (0.0, 1.0):
            raise argparse.ArgumentTypeError(f"expected {POINT_SYNTAX}, got {text!r}")
        label = int(v[2])
    return v[0], v[1], label


def parse_box(text: str) -> tuple[float, float, float, float]:
    """'X0,Y0,X1,Y1' with X0 < X1 and Y0 < Y1 (whether it fits the image is the server's
    check: only it knows the image's size)."""
    x0, y0, x1, y1 = _numbers(text, (4,), BOX_SYNTAX)
    if not (x0 < x1 and y0 < y1):
        raise argparse.ArgumentTypeError(f"expected X0 < X1 and Y0 < Y1, got {text!r}")
    return x0, y0, x1, y1


REGION_SYNTAX = (
    '"ITEM ITEM ..." with ITEM point=X,Y[,LABEL] (repeatable) or box=X0,Y0,X1,Y1 (at most one)'
)


@dataclass(frozen=True)
class RegionSpec:
    """One region of a command line: (x, y, label) points and at most one box."""

    points: tuple[tuple[float, float, int], ...] = ()
    box: tuple[float, float, float, float] | None = None

    def is_empty(self) -> bool:
        return not self.points and self.box is None

    def region(self) -> Region | None:
        """The client's `Region` (None for an empty spec: the whole image)."""
        if self.is_empty():
            return None
        return Region(
            points=[(x, y) for x, y, _ in self.points] or None,
            point_labels=[lab for _, _, lab in self.points] or None,
            box=self.box,
        )

    def describe(self) -> str:
        """The spec in --region syntax (numbers as given, without trailing .0)."""
        items = [
            "point=" + ",".join(f"{v:g}" for v in (x, y)) + ("" if lab == 1 else f",{lab}")
            for x, y, lab in self.points
        ]
        if self.box is not None:
            items.append("box=" + ",".join(f"{v:g}" for v in self.box))
        return " ".join(items) or "whole image"

    def to_json(self) -> dict[str, object]:
        return {
            "points": [[x, y, lab] for x, y, lab in self.points],
            "box": None if self.box is None else list(self.box),
        }


_REGION_ITEM = re.compile(r"([A-Za-z_]+)\s*=")


def parse_region(text: str) -> RegionSpec:
    """One region: 'point=X,Y[,LABEL] ... [box=X0,Y0,X1,Y1]', items separated by spaces (or
    ';'), e.g. "point=62,70 point=80,75,0" or "box=10,20,60,80 point=30,40"."""
    body = text.strip()
    keys = list(_REGION_ITEM.finditer(body))
    if not body or not keys or keys[0].start() != 0:
        raise argparse.ArgumentTypeError(f"expected {REGION_SYNTAX}, got {text!r}")
    points: list[tuple[float, float, int]] = []
    box = None
    for i, key in enumerate(keys):
        end = keys[i + 1].start() if i + 1 < len(keys) else len(body)
        value = body[key.end() : end].strip().rstrip(";").strip()
        name = key.group(1).lower()
        try:
            if name == "point":
                points.append(parse_point(value))
            elif name == "box":
                if box is not None:
                    raise argparse.ArgumentTypeError(
                        f"a region has at most one box (give each box its own --region), "
                        f"got {text!r}"
                    )
                box = parse_box(value)
            else:
                raise argparse.ArgumentTypeError(
                    f"unknown item {key.group(1)!r}: expected {REGION_SYNTAX}, got {text!r}"
                )
        except argparse.ArgumentTypeError as exc:
            message = str(exc)
            if name in ("point", "box") and not message.startswith("a region"):
                message = f"{name}: {message}"
            raise argparse.ArgumentTypeError(message) from None
    if len(points) > MAX_POINTS:
        raise argparse.ArgumentTypeError(
            f"at most {MAX_POINTS} points per region, got {len(points)} in {text!r}"
        )
    return RegionSpec(tuple(points), box)


def parse_window(text: str) -> tuple[float, float]:
    """'CENTRE,WIDTH' (WIDTH >= 1, as DICOM and the server require) or a preset name
    (`medpclip_core.dicom.WINDOW_PRESETS`, any case)."""
    preset = WINDOW_PRESETS.get(text.strip().lower())
    if preset is not None:
        return preset
    centre, width = _numbers(text, (2,), WINDOW_SYNTAX)
    if width < 1:
        raise argparse.ArgumentTypeError(f"the window width must be >= 1, got {text!r}")
    return centre, width


def parse_header(text: str) -> tuple[str, str]:
    """'KEY=VALUE' gRPC metadata (the key lower-cased, as gRPC requires)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError("expected KEY=VALUE")  # no value echoed: may be a secret
    return key.strip().lower(), value


def integer(low: int, high: int | None = None) -> Callable[[str], int]:
    """A `type=` for an integer in low..high (no upper bound without `high`)."""
    expected = f"an integer >= {low}" if high is None else f"an integer {low}..{high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}")
        return value

    return parse


def seconds(text: str) -> float:
    """A time limit in seconds, >= 0; 0 means no limit (the option's value is then 0.0)."""
    try:
        t = float(text)
    except ValueError:
        t = -1.0
    if not (math.isfinite(t) and t >= 0):
        raise argparse.ArgumentTypeError(f"must be seconds >= 0 (0: no limit), got {text!r}")
    return t


# --- negative numbers -------------------------------------------------------------------------

# Options whose value may start with "-": argparse would take "-600,1500" for an option.
VALUE_OPTIONS = (
    "--point",
    "--box",
    "--window",
    "--timeout",
    "--pacs-timeout",
    "--retries",
    "--concurrency",
    "--frame",
    "--top",
)
_NEGATIVE = re.compile(r"^-[\d.]")


def join_negative(argv: Sequence[str], options: Iterable[str] = VALUE_OPTIONS) -> list[str]:
    """`--window -600,1500` -> `--window=-600,1500` for the `options` that take numbers, so
    that argparse reads a negative value as the value (and an out-of-range one, such as
    `--timeout -1`, gets the option's own message). Nothing after `--` is touched."""
    names = set(options)
    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            out.extend(argv[i:])
            break
        if a in names and i + 1 < len(argv) and _NEGATIVE.match(argv[i + 1]):
            out.append(f"{a}={argv[i + 1]}")
            i += 2
            continue
        out.append(a)
        i += 1
    return out


# --- option groups ----------------------------------------------------------------------------

REGION_TITLE = "region prompt (original image pixels, x = column, y = row)"
POINT_HELP = (
    "a point; LABEL 1 = inside the region (default), 0 = outside; repeatable (all --point "
    "options form one region)"
)
BOX_HELP = "a box around the region: top-left and bottom-right corner; repeatable (one region each)"
REGION_HELP = (
    'one more region, e.g. "point=62,70 point=80,75,0" or "box=10,20,60,80"; repeatable (see '
    '"several regions" below)'
)
WINDOW_HELP = "display window CENTRE,WIDTH (e.g. -600,1500) or a preset name (lung, bone, ...)"

_PRESETS = textwrap.fill(
    ", ".join(f"{k} ({c:g},{w:g})" for k, (c, w) in WINDOW_PRESETS.items()),
    width=94,
    initial_indent="  ",
    subsequent_indent="  ",
)

REGION_EPILOG = f"""\
coordinates:
  All prompts are in pixels of the ORIGINAL image (before any resizing by the server):
  x = column (0 at the left edge), y = row (0 at the top edge). Points must lie inside the
  image; a box must satisfy 0 <= X0 < X1 <= width and 0 <= Y0 < Y1 <= height. At most
  {MAX_POINTS} points. Numbers are separated by commas (--box 40,50,90,100) or, in one quoted
  argument, by spaces (--box "40 50 90 100"); a negative value may follow its option directly
  (--window -600,1500) or after = (--window=-600,1500).
"""

SEVERAL_REGIONS_EPILOG = """\
several regions (the image is sent and encoded once; one answer per region):
  All --point options form ONE region (with the --box, if there is one). Several --box
  options are one region each. --region SPEC adds one region: a quoted list of items,
  point=X,Y[,LABEL] (repeatable) and at most one box=X0,Y0,X1,Y1, separated by spaces, e.g.
      --region "point=62,70 point=80,75,0" --region "box=10,20,60,80"
  Answers come in this order: the --point region (or each --box), then each --region.
  With several regions the image goes to the server once (medp_clip_encode) and each region
  is one call carrying the encoded image (medp_clip_prompt).
"""

WINDOW_EPILOG = f"""\
window:
  --window C,W sets the display window (centre, width >= 1), e.g. --window -600,1500 for a CT
  lung window, or names a preset (any case):
{_PRESETS}
  For DICOM it overrides the window stored in the file.
"""

CONNECTION_EPILOG = """\
connection (to the inference server):
  --url (or --triton) is Triton's gRPC endpoint host:port. --tls encrypts the channel
  (verifying the server with --root-cert, else the system CAs); --client-cert/--client-key add
  a client certificate (mutual TLS). --header KEY=VALUE adds gRPC metadata to every call (never
  printed). The server's API key comes from --api-key-file FILE, MEDPCLIP_API_KEY_FILE or
  MEDPCLIP_API_KEY (never on the command line). A call that finds the server UNAVAILABLE is
  retried --retries times with backoff; --timeout bounds each inference call, retries included
  (0: no limit).
"""


def add_region_arguments(
    parser: argparse.ArgumentParser,
    *,
    exclusive: bool = False,
    required: bool = False,
) -> argparse._ArgumentGroup:
    """--point, --box and --region in the "region prompt" group (returned, for command-specific
    prompt options). `exclusive`: at most one of the three options (each may repeat);
    `required`: at least one. Turn them into regions with `regions_from_args`."""
    group = parser.add_argument_group(REGION_TITLE)
    target: Any = (
        group.add_mutually_exclusive_group(required=required) if exclusive or required else group
    )
    target.add_argument(
        "--point",
        metavar="X,Y[,LABEL]",
        type=parse_point,
        action="append",
        default=[],
        help=POINT_HELP,
    )
    target.add_argument(
        "--box",
        metavar="X0,Y0,X1,Y1",
        dest="boxes",
        type=parse_box,
        action="append",
        default=[],
        help=BOX_HELP,
    )
    target.add_argument(
        "--region",
        metavar="SPEC",
        dest="regions",
        type=parse_region,
        action="append",
        default=[],
        help=REGION_HELP,
    )
    return group


def regions_from_args(args: argparse.Namespace) -> list[RegionSpec]:
    """The regions of --point, --box and --region, in answer order (see REGION_EPILOG): the
    --point region (with a single --box) or one per --box, then each --region. Empty: no
    region prompt. UsageError for points beside several boxes (which box would they join?)."""
    points = tuple(args.point)
    boxes = list(args.boxes)
    if points and len(boxes) > 1:
        raise UsageError(
            "--point with several --box: which box would the points belong to? give each "
            'region as --region, e.g. --region "box=10,20,60,80 point=30,40"'
        )
    regions: list[RegionSpec] = []
    if len(boxes) > 1:
        regions += [RegionSpec(box=b) for b in boxes]
    elif points or boxes:
        regions.append(RegionSpec(points, boxes[0] if boxes else None))
    return regions + list(args.regions)


def add_window_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--window", metavar="C,W|PRESET", type=parse_window, help=WINDOW_HELP)


def add_label_arguments(parser: argparse.ArgumentParser, *, required: bool = False) -> None:
    """--labels LABEL... | --labels-file F (read with `read_labels_file`)."""
    lab = parser.add_mutually_exclusive_group(required=required)
    lab.add_argument("--labels", metavar="LABEL", nargs="+", help="candidate labels (free text)")
    lab.add_argument("--labels-file", metavar="F", help="candidate labels, one per line")


def add_connection_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The inference-server connection: --url/--triton, --timeout, --retries, TLS, --header,
    --api-key-file (turned into client keyword arguments by `connection_options`)."""
    c = parser.add_argument_group("connection (to the inference server)")
    c.add_argument(
        "--url",
        "--triton",
        dest="url",
        metavar="HOST:PORT",
        default=DEFAULT_URL,
        help=f"Triton gRPC endpoint (default {DEFAULT_URL})",
    )
    c.add_argument(
        "--timeout",
        metavar="S",
        type=seconds,
        default=60.0,
        help="seconds to wait for each inference, retries included (default 60; 0: no limit)",
    )
    c.add_argument(
        "--retries",
        metavar="N",
        type=integer(0),
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
    return c


# --- after parsing ----------------------------------------------------------------------------


def read_api_key(path: str | Path | None) -> str | None:
    """The key in `path` (surrounding whitespace stripped); None without a path, which lets the
    client fall back to MEDPCLIP_API_KEY. UsageError if the file cannot be read or is empty."""
    if path is None:
        return None
    try:
        return read_key_file(path)
    except ValueError as exc:
        raise UsageError(f"--api-key-file: {exc}") from None


def connection_options(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of `MedPClipClient` / `AsyncMedPClipClient` from the options of
    `add_connection_arguments` (reads --api-key-file: UsageError if it cannot)."""
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


def read_labels_file(path: str | Path) -> list[str]:
    """One label per line (UTF-8); blank lines and lines starting with # skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read --labels-file: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError("--labels-file is not UTF-8 text") from None
    labels = [s.strip() for s in text.splitlines()]
    return [s for s in labels if s and not s.startswith("#")]
