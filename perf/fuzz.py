"""The big bad-input run: the CI fuzz strategies (perf/fuzz_strategies.py), many more cases.

    python perf/fuzz.py --cases 10000 --url HOST:8001                 # a running server
    python perf/fuzz.py --cases 10000 --repository build/model_repository   # start one here

Sends every malformed request once (cases split evenly over every (ensemble, validation path)),
then prints the counts by status code and by validation path, whether the server stayed ready,
and whether a fixed good request per ensemble still gets the answers it got before (within
1e-6, absolute or relative). A case whose answer is not INVALID_ARGUMENT, or whose message
echoes request data, is a problem; problems that perf/fuzz_strategies.KNOWN_BUGS lists are
reported apart.

With --repository the server is started the way users run it (`medpclip_tools.serve`: the gateway in
front of Triton), or bare Triton with --bare-triton. Default export: `python -m medpclip.export
--out build` writes build/model_repository.

Exit codes: 0 every case answered as it must, 1 a new problem, a server not ready after, or
changed good answers, 2 usage.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import tritonclient.grpc as grpcclient
from hypothesis import HealthCheck, Phase, given, seed, settings

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fuzz_strategies as fs  # noqa: E402


class ServerDown(Exception):
    """The server stopped being ready: the remaining cases would only measure that."""


@dataclass
class Report:
    by_path: dict[tuple[str, str], collections.Counter] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter)
    )
    problems: dict[tuple[str, str], list[str]] = field(
        default_factory=lambda: collections.defaultdict(list)
    )
    ready_after: bool = True
    changed: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(sum(c.values()) for c in self.by_path.values())

    def by_status(self) -> collections.Counter:
        out: collections.Counter = collections.Counter()
        for counts in self.by_path.values():
            out.update(counts)
        return out

    def new_problems(self) -> dict[tuple[str, str], list[str]]:
        return {k: v for k, v in self.problems.items() if k not in fs.KNOWN_BUGS}


def _split(cases: int, count: int) -> list[int]:
    """`cases` spread over `count` targets as evenly as integers allow."""
    return [cases // count + (1 if i < cases % count else 0) for i in range(count)]


def _fuzz_target(client, model: str, path: str, n: int, args, limits, report: Report) -> None:
    """`n` cases of one (ensemble, path): generate only, no shrinking (every case counts)."""

    @settings(
        max_examples=n,
        database=None,
        deadline=None,
        phases=(Phase.generate,),
        suppress_health_check=list(HealthCheck),
    )
    @seed(zlib.crc32(f"{model}/{path}/{args.seed}".encode()))
    @given(fs.cases(model, path, limits))
    def one(case: fs.Case) -> None:
        outcome = fs.send(client, case, args.timeout)
        report.by_path[(model, path)][outcome.status] += 1
        found = fs.problems(case, outcome)
        if found:
            report.problems[(model, path)].append(f"{case!r}: {found[0]}")
        if not client.is_server_ready():
            report.ready_after = False
            raise ServerDown(f"not ready after {case!r}")

    one()


def fuzz(client, args, limits: fs.Limits) -> Report:
    report = Report()
    good = fs.good_cases()
    before = [fs.answers(client, case) for case in good]
    targets = fs.targets()
    start = time.monotonic()
    try:
        for (model, path), n in zip(targets, _split(args.cases, len(targets)), strict=True):
            if n:
                _fuzz_target(client, model, path, n, args, limits, report)
    except ServerDown as exc:
        print(f"stopped early: {exc}", file=sys.stderr)
    report.seconds = time.monotonic() - start
    report.ready_after = report.ready_after and client.is_server_ready()
    if report.ready_after:
        for case, old in zip(good, before, strict=True):
            report.changed += [
                f"{case.model} {d}" for d in fs.differences(old, fs.answers(client, case))
            ]
    return report


def print_report(report: Report, url: str, out=sys.stdout) -> None:
    rate = report.total / report.seconds if report.seconds else 0.0
    print(
        f"fuzzed {report.total} cases in {report.seconds:.1f} s ({rate:.0f}/s) on {url}", file=out
    )
    print("\nby status:", file=out)
    for status, count in report.by_status().most_common():
        print(f"  {status:<20} {count:>7}", file=out)
    print("\nby validation path (cases per ensemble; statuses; problems):", file=out)
    header = f"  {'path':<34}" + "".join(f"{m:>17}" for m in fs.ENSEMBLES)
    print(header + "  statuses", file=out)
    paths = dict.fromkeys(p for _, p in report.by_path)
    for path in paths:
        row = f"  {path:<34}"
        statuses: collections.Counter = collections.Counter()
        for model in fs.ENSEMBLES:
            counts = report.by_path.get((model, path))
            row += f"{sum(counts.values()) if counts else '-':>17}"
            statuses.update(counts or {})
        bad = sum(len(report.problems.get((m, path), [])) for m in fs.ENSEMBLES)
        flags = ", ".join(f"{s} {c}" for s, c in statuses.most_common())
        print(f"{row}  {flags}{f'; {bad} problem(s)' if bad else ''}", file=out)
    print(f"\nserver ready after: {'yes' if report.ready_after else 'NO'}", file=out)
    unchanged = "yes (within 1e-6)" if not report.changed else f"NO: {report.changed}"
    print(f"good answers unchanged: {unchanged if report.ready_after else 'not checked'}", file=out)
    _print_problems(report, out)


def _print_problems(report: Report, out) -> None:
    if not report.problems:
        print("problems: none", file=out)
        return
    print("problems (first example of each):", file=out)
    for (model, path), found in report.problems.items():
        tag = "known" if (model, path) in fs.KNOWN_BUGS else "NEW"
        print(f"  {tag:<5} {model}/{path}: {len(found)} case(s)", file=out)
        print(f"        {found[0][:400]}", file=out)
        if tag == "known":
            print(f"        known bug: {fs.KNOWN_BUGS[(model, path)]}", file=out)


@contextlib.contextmanager
def _server(args) -> Iterator[str]:
    """The gRPC url to fuzz: --url as is, or a server started on --repository."""
    if args.url:
        yield args.url
        return
    from medpclip_tools.serve import ServeProcess, TritonServer

    server = TritonServer(args.repository) if args.bare_triton else ServeProcess(args.repository)
    with server:
        yield server.grpc_url


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="gRPC HOST:PORT of a running server")
    where.add_argument("--repository", type=Path, help="model repository to serve here")
    p.add_argument("--cases", type=int, default=2000, help="malformed requests (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the run (default 0)")
    p.add_argument("--timeout", type=float, default=30.0, help="client deadline per request, s")
    p.add_argument("--bare-triton", action="store_true", help="with --repository: no gateway")
    p.add_argument(
        "--context-length",
        type=int,
        help="the text context the over-context labels exceed (default: read from "
        f"--repository, else {fs.LARGEST_CONTEXT}, the largest shipped model's)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cases < 1:
        _parser().error("--cases must be at least 1")
    limits = fs.Limits.from_repository(args.repository) if args.repository else fs.Limits()
    if args.context_length:
        limits = dataclasses.replace(limits, context_length=args.context_length)
    with _server(args) as url:
        client = grpcclient.InferenceServerClient(url)
        try:
            report = fuzz(client, args, limits)
        finally:
            client.close()
    print_report(report, url)
    ok = report.ready_after and not report.changed and not report.new_problems()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
