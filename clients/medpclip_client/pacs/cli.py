"""`medpclip-pacs`: run MedP-CLIP on instances of a DICOMweb archive and store the answers back
as DICOM SR (+ SEG).

    medpclip-pacs run --dicomweb http://127.0.0.1:8042/dicom-web \\
        --study 1.2.3 --series 1.2.3.4 --instance 1.2.3.4.5 --point 62,70 --mask-out \\
        --labels "a nodule" "a cyst"
    medpclip-pacs query --dicomweb http://127.0.0.1:8042/dicom-web --modality CT \\
        --study-date 20240101-20241231 --state state.jsonl --concurrency 4 --labels ...
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import re
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from ..arguments import (
    CONNECTION_EPILOG,
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
    parse_box,  # noqa: F401 - kept importable from here
    parse_point,  # noqa: F401
    parse_window,  # noqa: F401
    read_labels_file,
    regions_from_args,
    seconds,
)

PROG = "medpclip-pacs"

# former names of the shared exit codes (arguments.EXIT_CODES says what each means)
EXIT_REFUSED = EXIT_REJECTED
EXIT_UNREACHABLE = EXIT_UNAVAILABLE

DESCRIPTION = """\
Fetch DICOM instances from a DICOMweb archive (WADO-RS), ask a MedP-CLIP Triton server which
candidate label fits a region, and store the answer back (STOW-RS) as a DICOM Comprehensive 3D
SR (TID 1500 measurement report: finding label, its probability, the predicted region, the
prompt, a reference to the source) and, with --mask-out, a DICOM SEG of the mask, which the SR
references. The SR and SEG go to the archive in one request: on any error nothing is stored.
Several regions of an instance are answered with one encoding of it and stored as one SR with
one measurement group per region (and one SEG with one segment per region). Every object
names the served model (name, config, SHA-256 of its weights, version) as the server states
it."""

REGION_NOTES = """\
  `run` needs --point, --box, --region or --mask; `query` applies --point, --box or --region
  to every instance (without one the whole image is scored). Give one kind (each may repeat:
  several --point are one region, several --box or --region several regions). Each region is
  prompted by foreground points (LABEL 1), or a box, or a mask, not a mix: the SR keeps the
  prompt as it was given (points as seed points) beside the predicted region (the SEG
  segment with --mask-out, else the outline of the served mask).
  --mask PNG (run): a mask of the instance's size, any nonzero pixel marks the region.
  --frame N: the frame (1-based) to read of a multi-frame instance (required for one; the SR
  and SEG name it); single-frame instances take 1.
"""

REGIONS_NOTES = """\
  Several regions of an instance make ONE SR with one measurement group per region, in order
  ("MedP-CLIP finding 1", "2", ...), and with --mask-out one SEG with one segment per region;
  they are stored in one STOW-RS request, all or nothing.
"""

QUERY_EXIT_NOTES = """\
query: the code of the error that stopped the batch, else of the first failed instance, else 3
if any instance was refused in this run."""

EPILOG = f"""\
{REGION_EPILOG}{REGION_NOTES}
{SEVERAL_REGIONS_EPILOG}{REGIONS_NOTES}
labels:
  --labels "a nodule" "a cyst" (one argument each) or --labels-file F (one per line, # comments).
  The best-scoring label is the finding; it is coded in the private scheme 99MEDPCLIP and its
  full text is stored too.

{WINDOW_EPILOG}
query mode:
  QIDO-RS filters --modality and --study-date (YYYYMMDD, or a range YYYYMMDD-YYYYMMDD, open
  ranges -YYYYMMDD and YYYYMMDD- too). Non-image instances (SR, SEG, ...) are skipped. --state
  is a JSON-lines file: each stored (or refused) instance is appended right after its store, a
  rerun skips them (refused ones are retried with --retry-refused); a state file belongs to one
  request (labels, region, window, --mask-out). At most --concurrency instances are in flight.

DICOMweb:
  --dicomweb is the archive's DICOMweb root; --pacs-timeout bounds each DICOMweb request.

{CONNECTION_EPILOG}
{exit_codes_help(QUERY_EXIT_NOTES)}
Model identity: the bridge asks the server which model it serves (the parameters of the
configuration of the ensemble it calls) and refuses to store objects without it. Behind the
medpclip gateway that needs the API key only (--api-key-file, when the server has one), as
inference does; never the admin key.

No patient attributes are printed or logged, at any verbosity (library warnings and messages,
which may quote attribute values, are withheld); instances are named by UID.
"""

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_MODALITY = re.compile(r"^[A-Z0-9_]{1,16}$")
_DATE = re.compile(r"^(\d{8})?(-)?(\d{8})?$")


# --- argument types ---------------------------------------------------------------------------


def parse_uid(text: str) -> str:
    if len(text) > 64 or not _UID.match(text):
        raise argparse.ArgumentTypeError(f"not a DICOM UID (digits and dots, <= 64): {text!r}")
    return text


def parse_modality(text: str) -> str:
    value = text.strip().upper()
    if not _MODALITY.match(value):
        raise argparse.ArgumentTypeError(f"not a DICOM modality (e.g. CT, MR): {text!r}")
    return value


def parse_study_date(text: str) -> str:
    """YYYYMMDD, YYYYMMDD-YYYYMMDD, -YYYYMMDD or YYYYMMDD- (DICOM range matching)."""
    m = _DATE.match(text.strip())
    if not m or not (m.group(1) or m.group(3)) or (m.group(1) and m.group(3) and not m.group(2)):
        raise argparse.ArgumentTypeError(
            f"expected YYYYMMDD or YYYYMMDD-YYYYMMDD (open ranges allowed), got {text!r}"
        )
    dates = []
    for g in (m.group(1), m.group(3)):
        if g:
            try:
                dates.append(datetime.datetime.strptime(g, "%Y%m%d").date())
            except ValueError:
                raise argparse.ArgumentTypeError(f"not a calendar date: {g!r}") from None
    if len(dates) == 2 and dates[0] > dates[1]:
        raise argparse.ArgumentTypeError(f"the range ends before it starts: {text!r}")
    return text.strip()


def _common(p: argparse.ArgumentParser, with_mask: bool) -> None:
    p.add_argument(
        "--dicomweb",
        metavar="URL",
        required=True,
        help="DICOMweb root of the archive, e.g. http://127.0.0.1:8042/dicom-web (Orthanc)",
    )
    group = add_region_arguments(p, exclusive=True)
    if with_mask:
        group.add_argument(
            "--mask",
            metavar="MASK.png",
            help="a prompt mask of the instance's size, nonzero = region (one region)",
        )
    group.add_argument(
        "--frame",
        metavar="N",
        type=integer(1, 2**31 - 1),
        help="the frame (1-based) to read of a multi-frame instance",
    )
    add_window_argument(p)
    add_label_arguments(p, required=True)
    p.add_argument("--mask-out", action="store_true", help="also store the mask as a DICOM SEG")
    p.add_argument(
        "--pacs-timeout",
        metavar="S",
        type=seconds,
        default=30.0,
        help="seconds per DICOMweb request (default 30; 0: no limit)",
    )
    add_connection_arguments(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument(
        "-v", "--verbose", action="store_true", help="log progress (UIDs and the model only)"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="{run,query}")
    run = sub.add_parser(
        "run",
        help="process one instance",
        description="Process one instance, addressed by its three UIDs.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--study", metavar="UID", type=parse_uid, required=True)
    run.add_argument("--series", metavar="UID", type=parse_uid, required=True)
    run.add_argument("--instance", metavar="UID", type=parse_uid, required=True)
    _common(run, with_mask=True)
    query = sub.add_parser(
        "query",
        help="process every instance a QIDO-RS search finds (resumable)",
        description="Process every instance matching the filters; resumable with --state.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    query.add_argument("--modality", type=parse_modality, help="QIDO filter, e.g. CT")
    query.add_argument(
        "--study-date", metavar="DATE", type=parse_study_date, help="QIDO filter (see below)"
    )
    query.add_argument("--state", metavar="FILE", required=True, help="resume state (JSON lines)")
    query.add_argument(
        "--concurrency",
        metavar="N",
        type=integer(1, 64),
        default=4,
        help="instances in flight at most (default 4)",
    )
    query.add_argument(
        "--retry-refused", action="store_true", help="retry instances the state lists as refused"
    )
    _common(query, with_mask=False)
    return p


def _labels(args: argparse.Namespace) -> list[str]:
    labels = read_labels_file(args.labels_file) if args.labels_file else args.labels
    labels = [s.strip() for s in labels]
    if not labels or not all(labels):
        raise UsageError("give at least one non-empty label")
    return labels


def _prompts(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[RegionSpec]:
    """The regions of --point, --box and --region (at most one kind, argparse checks; --mask
    is a region of its own). Each is prompted by foreground points, or a box, or a mask: a
    background point (LABEL 0) or points beside a box are usage errors here."""
    regions = regions_from_args(args)
    mask = getattr(args, "mask", None)
    if mask and regions:
        parser.error(
            "argument --mask: a mask is a region of its own, not combined with "
            "--point, --box or --region"
        )
    if args.command == "run" and not regions and not mask:
        parser.error("one of the arguments --point --box --region is required (or --mask)")
    option = "--region" if args.regions else "--point"
    for spec in regions:
        if any(label == 0 for _, _, label in spec.points):
            parser.error(
                f"argument {option}: medpclip-pacs takes foreground points only (LABEL 1): "
                "the SR's region is drawn from them"
            )
        if spec.points and spec.box is not None:
            parser.error(
                f"argument {option}: medpclip-pacs draws a region from its points or from its "
                f"box, not both: {spec.describe()!r}"
            )
    return regions


# --- output -----------------------------------------------------------------------------------


def _err(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def _outcome_text(o) -> str:  # o: Outcome
    lines = [f"instance  {o.source.instance}" + (f"  frame {o.frame}" if o.frame else "")]
    for i, (f, area) in enumerate(zip(o.findings, o.mask_areas, strict=True), 1):
        image = "-" if f.image_probability is None else f"{f.image_probability:.4f}"
        if len(o.findings) > 1:
            lines.append(f"region {i}  {f.graphic.graphic_type} {_graphic_text(f.graphic)}")
        lines += [
            f"finding   {f.label}",
            f"region p  {f.probability:.4f}   image p {image}   IoU {f.iou:.3f}   mask {area} px",
        ]
    if o.model is not None:
        m = o.model
        lines.append(
            f"model     {m.name} {m.config}, weights sha256 {m.checkpoint_sha256}, "
            f"medpclip {m.version}"
        )
    lines.append(f"SR        {o.sr_uid}  (series {o.sr_series_uid})")
    if o.seg_uid:
        lines.append(f"SEG       {o.seg_uid}  (series {o.seg_series_uid})")
    return "\n".join(lines)


def _graphic_text(graphic) -> str:  # graphic: reports.Graphic
    return " ".join(",".join(f"{v:g}" for v in row) for row in graphic.data.tolist())


# Libraries whose log records and warnings may quote attribute values (pydicom's VR checks and
# highdicom's person-name check quote patient names; dicomweb_client logs response bodies).
_QUOTING_LIBRARIES = ("pydicom", "highdicom", "dicomweb_client")


class _Withhold(logging.Filter):
    """Keeps a library record's origin and level, and withholds its text."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".")[0] in _QUOTING_LIBRARIES:
            record.msg = (
                f"{record.name}: a {record.levelname.lower()} message was withheld "
                "(it may quote patient attributes)"
            )
            record.args = None
            record.exc_info = record.exc_text = None
        return True


def _withhold_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: object = None,
    line: str | None = None,
) -> None:
    """`warnings.showwarning` for the run: a warning's origin without its text (library
    warnings quote attribute values), logged only with -v."""
    logging.getLogger(PROG).info(
        "%s: a %s was withheld (it may quote patient attributes)",
        filename.rsplit("/", 1)[-1],
        category.__name__,
    )


def _configure_logging(verbose: bool) -> None:
    """Library log records can quote attribute values: their text never reaches the output
    (`_Withhold`), and without -v only their errors are counted at all."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _Withhold) for f in handler.filters):
            handler.addFilter(_Withhold())
    for name in _QUOTING_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING if verbose else logging.ERROR)


# --- main -------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (see --help)."""
    parser = build_parser()
    try:
        args = parser.parse_args(join_negative(sys.argv[1:] if argv is None else argv))
        regions = _prompts(args, parser)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        labels = _labels(args)
        options = connection_options(args)
    except UsageError as exc:
        _err(f"error: {exc}")
        return EXIT_USAGE
    _configure_logging(args.verbose)
    with warnings.catch_warnings():
        # for the whole run, every thread: no warning text reaches stderr (see _withhold_warning)
        warnings.simplefilter("default" if args.verbose else "ignore")
        warnings.showwarning = _withhold_warning
        return _execute(args, labels, regions, options)


# --- exit codes -------------------------------------------------------------------------------
# A PacsError's kind (pacs.dicomweb.ErrorKind) is its exit code, from the table both commands
# share (arguments.EXIT_CODES); QuerySummary.exit_code gives a batch's.


# --- the subcommands --------------------------------------------------------------------------


def _execute(
    args: argparse.Namespace,
    labels: list[str],
    regions: list[RegionSpec],
    options: dict[str, Any],
) -> int:
    """The subcommand, after parsing; returns the exit code."""
    try:
        from ..client import InputError, load_mask
        from .bridge import Bridge, RegionPrompt, Request, StateFile
        from .dicomweb import DicomWeb, InstanceRef, PacsError
    except ImportError as exc:
        _err(
            "error: the PACS bridge needs the 'pacs' extra "
            f"(pip install 'medpclip-client[pacs]'): {exc}"
        )
        return EXIT_ERROR

    prompts = [
        RegionPrompt(tuple((x, y) for x, y, _ in spec.points) or None, spec.box) for spec in regions
    ]
    mask = None
    if getattr(args, "mask", None):
        try:
            mask = load_mask(args.mask)
        except InputError as exc:
            _err(f"error: --mask: {exc}")
            return EXIT_USAGE
    one = prompts[0] if len(prompts) == 1 else RegionPrompt()
    request = Request(
        labels=tuple(labels),
        points=one.points,
        box=one.box,
        mask_out=args.mask_out,
        window=args.window,
        regions=tuple(prompts) if len(prompts) > 1 else (),
        mask=mask,
        frame=args.frame,
    )
    try:
        pacs = DicomWeb(args.dicomweb, timeout_s=args.pacs_timeout or None)
        with Bridge(
            pacs, options.pop("url"), options.pop("timeout_s"), client_options=options
        ) as bridge:
            if args.command == "run":
                ref = InstanceRef(args.study, args.series, args.instance)
                outcome = bridge.process(ref, request)
                print(json.dumps(outcome.to_json()) if args.json else _outcome_text(outcome))
                return EXIT_OK

            def progress(event: str, ref, detail) -> None:
                if args.json:
                    return
                if event == "stored":
                    seg = f", SEG {detail.seg_uid}" if detail.seg_uid else ""
                    found = "; ".join(f"{f.label!r} p={f.probability:.4f}" for f in detail.findings)
                    print(
                        f"stored   {ref.instance}: {found} -> SR {detail.sr_uid}{seg}",
                        flush=True,
                    )
                elif event == "skipped":
                    print(f"skipped  {ref.instance}: not an image", flush=True)
                else:
                    print(f"{event:<8} {ref.instance}: {detail.message}", flush=True)

            with StateFile(args.state) as state:
                summary = bridge.query(
                    request,
                    state,
                    modality=args.modality,
                    study_date=args.study_date,
                    concurrency=args.concurrency,
                    retry_refused=args.retry_refused,
                    progress=progress,
                )
            if args.json:
                print(json.dumps(summary.to_json()))
            else:
                print(
                    f"query: {summary.matched} matched, {len(summary.stored)} stored, "
                    f"{summary.skipped_done} already done, {summary.skipped_not_image} not "
                    f"images, {len(summary.refused)} refused, {len(summary.failed)} failed, "
                    f"{summary.not_attempted} not attempted (at most {summary.max_in_flight} "
                    "in flight)"
                )
            if summary.aborted is not None:
                _err(f"stopped: {summary.aborted.message}")
            return summary.exit_code
    except PacsError as exc:
        _err(f"error: {exc.message}")
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - a CLI reports, it does not trace back
        from .reports import redact  # library messages may quote attribute values

        _err(f"error: {type(exc).__name__}: {redact(str(exc))}")
        return EXIT_ERROR
