"""`medpclip-client` and `medpclip-pacs` speak one argument vocabulary (clients/medpclip_client/
arguments.py): the same strings parse to the same values, the same bad strings are refused with
the same message and exit code 2, --help describes the shared options identically, and the
exit codes mean the same. No server, archive or GPU needed."""

from __future__ import annotations

import argparse
import re

import pytest

from medpclip_client import arguments, cli
from medpclip_client.arguments import EXIT_CODES, RegionSpec, join_negative
from medpclip_client.client import MedPClipError
from medpclip_client.pacs import cli as pacs_cli
from medpclip_client.pacs.bridge import Bridge
from medpclip_client.pacs.dicomweb import DicomWeb, ErrorKind, PacsError
from medpclip_core.dicom import WINDOW_PRESETS

SHARED = (
    "point",
    "boxes",
    "regions",
    "window",
    "url",
    "timeout",
    "retries",
    "tls",
    "header",
    "api_key_file",
)
PACS_BASE = ["query", "--dicomweb", "http://127.0.0.1:1/dicom-web", "--state", "s.jsonl"]


@pytest.fixture(autouse=True)
def _fixed_environment(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")  # one help layout for both
    monkeypatch.delenv("MEDPCLIP_API_KEY_FILE", raising=False)
    monkeypatch.delenv("MEDPCLIP_API_KEY", raising=False)


def _client_args(argv: list[str]) -> argparse.Namespace:
    return cli.build_parser().parse_args(join_negative(["image.png", *argv]))


def _pacs_args(argv: list[str]) -> argparse.Namespace:
    return pacs_cli.build_parser().parse_args(join_negative([*PACS_BASE, "--labels", "a", *argv]))


def _shared(args: argparse.Namespace) -> dict[str, object]:
    return {name: getattr(args, name) for name in SHARED}


# --- the same strings, the same values --------------------------------------------------------

ACCEPTED = [
    (["--window", "lung"], "window", WINDOW_PRESETS["lung"]),
    (["--window", "LUNG"], "window", (-600.0, 1500.0)),
    (["--window", "-600,1500"], "window", (-600.0, 1500.0)),
    (["--window=-600,1500"], "window", (-600.0, 1500.0)),
    (["--window", "-600 1500"], "window", (-600.0, 1500.0)),
    (["--window", "40, 400"], "window", (40.0, 400.0)),
    (["--window", "mediastinum"], "window", (40.0, 400.0)),
    (["--box", "1,2,3,4"], "boxes", [(1.0, 2.0, 3.0, 4.0)]),
    (["--box", "1 2 3 4"], "boxes", [(1.0, 2.0, 3.0, 4.0)]),
    (["--box", "1, 2, 3, 4"], "boxes", [(1.0, 2.0, 3.0, 4.0)]),
    (["--box", "-1,-2,3.5,4"], "boxes", [(-1.0, -2.0, 3.5, 4.0)]),
    (["--box=0.5,1,3,4"], "boxes", [(0.5, 1.0, 3.0, 4.0)]),
    (["--box", "1,2,3,4", "--box", "5,6,7,8"], "boxes", [(1, 2, 3, 4), (5, 6, 7, 8)]),
    (["--region", "box=1,2,3,4"], "regions", [RegionSpec(box=(1, 2, 3, 4))]),
    (
        ["--region", "point=10,20 point=30,40,0", "--region", "point=-1,2"],
        "regions",
        [RegionSpec(((10, 20, 1), (30, 40, 0))), RegionSpec(((-1, 2, 1),))],
    ),
    (["--point", "62,70"], "point", [(62.0, 70.0, 1)]),
    (["--point", "62 70"], "point", [(62.0, 70.0, 1)]),
    (["--point", "62,70,1"], "point", [(62.0, 70.0, 1)]),
    (["--point", "-1,2"], "point", [(-1.0, 2.0, 1)]),
    (["--point", "1,2", "--point", "3,4"], "point", [(1.0, 2.0, 1), (3.0, 4.0, 1)]),
    (["--timeout", "0"], "timeout", 0.0),
    (["--timeout", "2.5"], "timeout", 2.5),
    (["--url", "h:1"], "url", "h:1"),
    (["--triton", "h:1"], "url", "h:1"),
    (["--retries", "0"], "retries", 0),
    (["--header", "X-Request-Id=a=b"], "header", [("x-request-id", "a=b")]),
    (["--tls"], "tls", True),
]


@pytest.mark.parametrize(("argv", "name", "value"), ACCEPTED, ids=lambda v: str(v))
def test_both_commands_parse_the_same_values(argv, name, value):
    client, pacs = _client_args(argv), _pacs_args(argv)
    assert getattr(client, name) == value
    assert _shared(client) == _shared(pacs)


def test_defaults_agree():
    assert _shared(_client_args([])) == _shared(_pacs_args([]))
    args = _client_args([])
    assert (args.url, args.timeout, args.point, args.boxes, args.regions, args.window) == (
        "127.0.0.1:8001",
        60.0,
        [],
        [],
        [],
        None,
    )


def test_api_key_file_default_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDPCLIP_API_KEY_FILE", str(tmp_path / "key"))
    assert _client_args([]).api_key_file == _pacs_args([]).api_key_file == tmp_path / "key"


# --- the same bad strings, the same message, exit 2 -------------------------------------------

REJECTED = [
    (["--window", "40,0"], "the window width must be >= 1, got '40,0'"),
    (["--window", "lungs"], "expected CENTRE,WIDTH or a preset (lung, mediastinum"),
    (["--window", "-600"], "expected CENTRE,WIDTH or a preset"),
    (["--window", "1,2,3"], "expected CENTRE,WIDTH or a preset"),
    (["--window", "nan,5"], "expected finite numbers, got 'nan,5'"),
    (["--box", "1,2"], "expected X0,Y0,X1,Y1 (top-left, bottom-right corner), got '1,2'"),
    (["--box", "3,2,1,4"], "expected X0 < X1 and Y0 < Y1, got '3,2,1,4'"),
    (["--box", "1,2,3,2"], "expected X0 < X1 and Y0 < Y1"),
    (["--box", "1;2;3;4"], "expected X0,Y0,X1,Y1"),
    (["--box", "1 2,3 4"], "expected X0,Y0,X1,Y1"),
    (["--box", "1,2,3,inf"], "expected finite numbers"),
    (["--point", "1;2"], "expected X,Y or X,Y,LABEL"),
    (["--point", "1,2,2"], "expected X,Y or X,Y,LABEL"),
    (["--point", "1,2,3,4"], "expected X,Y or X,Y,LABEL"),
    (["--point", "1,"], "expected X,Y or X,Y,LABEL"),
    (["--timeout", "-1"], "argument --timeout: must be seconds >= 0 (0: no limit), got '-1'"),
    (["--timeout", "soon"], "must be seconds >= 0 (0: no limit), got 'soon'"),
    (["--timeout", "inf"], "must be seconds >= 0"),
    (["--retries", "-1"], "argument --retries: must be an integer >= 0, got '-1'"),
    (["--retries", "2.5"], "must be an integer >= 0, got '2.5'"),
    (["--header", "no-value"], "argument --header: expected KEY=VALUE"),
    (["--box"], "argument --box: expected one argument"),
    (["--region", ""], 'argument --region: expected "ITEM ITEM ..." with ITEM point=X,Y[,LABEL]'),
    (["--region", "10,20"], 'argument --region: expected "ITEM ITEM ..."'),
    (["--region", "mask=m.png"], "argument --region: unknown item 'mask': expected"),
    (["--region", "point=1"], "argument --region: point: expected X,Y or X,Y,LABEL"),
    (["--region", "point=1,2,7"], "argument --region: point: expected X,Y or X,Y,LABEL"),
    (["--region", "box=3,2,1,4"], "argument --region: box: expected X0 < X1 and Y0 < Y1"),
    (["--region", "box=1,2,3,4 box=1,2,5,6"], "argument --region: a region has at most one box"),
    (["--region", "point=nan,1"], "argument --region: point: expected finite numbers"),
    (["--region"], "argument --region: expected one argument"),
]


def _error(capsys) -> str:
    """The message of a usage error, without the program name (which differs)."""
    err = capsys.readouterr().err
    found = re.search(r"error: (.*)", err, re.DOTALL)
    assert found, err
    return " ".join(found.group(1).split())


@pytest.mark.parametrize(("argv", "message"), REJECTED, ids=lambda v: str(v))
def test_both_commands_reject_the_same_strings_alike(argv, message, capsys):
    assert cli.main(["image.png", *argv]) == 2
    client = _error(capsys)
    assert pacs_cli.main([*PACS_BASE, "--labels", "a", *argv]) == 2
    pacs = _error(capsys)
    assert message in client
    assert client == pacs


def test_unreadable_local_files_are_usage_errors_in_both(tmp_path, capsys):
    image = tmp_path / "image.png"
    image.write_bytes(b"only read, never sent")
    missing = str(tmp_path / "missing")
    for option, message in (
        ("--api-key-file", f"--api-key-file: cannot read key file {missing}"),
        ("--labels-file", "cannot read --labels-file: No such file or directory"),
    ):
        assert cli.main([str(image), option, missing]) == 2
        client = _error(capsys)
        argv = [*PACS_BASE, option, missing]
        if option != "--labels-file":
            argv += ["--labels", "a"]
        assert pacs_cli.main(argv) == 2
        pacs = _error(capsys)
        assert message in client and client == pacs
    empty = tmp_path / "empty-key"
    empty.write_text("\n")
    assert cli.main([str(image), "--api-key-file", str(empty)]) == 2
    assert pacs_cli.main([*PACS_BASE, "--labels", "a", "--api-key-file", str(empty)]) == 2
    assert "is empty" in capsys.readouterr().err


def test_what_only_the_pacs_bridge_cannot_express_is_a_usage_error(capsys):
    # the SR holds one region drawn from foreground points: LABEL 0 and point + box are refused
    assert _client_args(["--point", "1,2,0"]).point == [(1.0, 2.0, 0)]
    assert pacs_cli.main([*PACS_BASE, "--labels", "a", "--point", "1,2,0"]) == 2
    assert "foreground points only" in _error(capsys)
    assert pacs_cli.main([*PACS_BASE, "--labels", "a", "--point", "1,2", "--box", "0,0,5,5"]) == 2
    assert "not allowed with argument --point" in _error(capsys)
    # the same for a --region, which may also not mix points and a box
    assert pacs_cli.main([*PACS_BASE, "--labels", "a", "--region", "point=1,2,0"]) == 2
    assert "argument --region: medpclip-pacs takes foreground points only" in _error(capsys)
    assert pacs_cli.main([*PACS_BASE, "--labels", "a", "--region", "box=0,0,5,5 point=1,2"]) == 2
    assert "from its points or from its box, not both" in _error(capsys)
    assert (
        pacs_cli.main([*PACS_BASE, "--labels", "a", "--region", "box=0,0,5,5", "--box", "0,0,5,5"])
        == 2
    )
    assert "not allowed with argument --region" in _error(capsys)
    # `run` needs a region prompt
    run = ["run", "--dicomweb", "http://x", "--study", "1", "--series", "1.2", "--instance", "1.3"]
    assert pacs_cli.main([*run, "--labels", "a"]) == 2
    assert "one of the arguments --point --box --region is required" in _error(capsys)


def test_regions_from_args():
    def regions(argv):
        return arguments.regions_from_args(_client_args(argv))

    assert regions([]) == []
    # repeated --point: ONE region (with the one --box, if given)
    assert regions(["--point", "1,2", "--point", "3,4,0", "--box", "0,0,9,9"]) == [
        RegionSpec(((1, 2, 1), (3, 4, 0)), (0, 0, 9, 9))
    ]
    # several --box: one region each, then each --region, in order
    assert regions(
        ["--region", "point=5,6", "--box", "0,0,2,2", "--box", "1,1,3,3", "--region", "box=2,2,4,4"]
    ) == [
        RegionSpec(box=(0, 0, 2, 2)),
        RegionSpec(box=(1, 1, 3, 3)),
        RegionSpec(((5, 6, 1),)),
        RegionSpec(box=(2, 2, 4, 4)),
    ]
    assert regions(["--point", "1,2", "--region", "box=0,0,5,5"]) == [
        RegionSpec(((1, 2, 1),)),
        RegionSpec(box=(0, 0, 5, 5)),
    ]
    with pytest.raises(arguments.UsageError, match="which box would the points belong to"):
        regions(["--point", "1,2", "--box", "0,0,2,2", "--box", "1,1,3,3"])
    spec = arguments.parse_region(" point=10.5, 20 ; point=30,40,0  box=1,2,3,4 ")
    assert spec == RegionSpec(((10.5, 20, 1), (30, 40, 0)), (1, 2, 3, 4))
    assert spec.describe() == "point=10.5,20 point=30,40,0 box=1,2,3,4"
    assert arguments.parse_region(spec.describe()) == spec
    region = spec.region()
    assert region.points == [(10.5, 20), (30, 40)] and region.point_labels == [1, 0]
    assert region.box == (1, 2, 3, 4)
    with pytest.raises(argparse.ArgumentTypeError, match="at most 16 points per region"):
        arguments.parse_region(" ".join(["point=1,1"] * 17))


def test_client_region_usage_errors(tmp_path, capsys):
    image = tmp_path / "image.png"
    image.write_bytes(b"only read, never sent")
    (tmp_path / "folder").mkdir()
    two = ["--box", "0,0,2,2", "--region", "point=1,1"]
    for argv, message in (
        ([str(image), "--point", "1,2", "--box", "0,0,2,2", "--box", "1,1,3,3"], "which box"),
        ([str(image), *two, "--mask", "m.png"], "--mask joins a single region"),
        ([str(tmp_path / "folder"), *two], "several regions need one IMAGE file, not a folder"),
    ):
        assert cli.main(argv) == 2
        assert message in _error(capsys)


def test_join_negative():
    argv = ["--window", "-600,1500", "--box", "-1,0,5,5", "--timeout", "-1", "--labels", "-x"]
    assert join_negative(argv) == [
        "--window=-600,1500",
        "--box=-1,0,5,5",
        "--timeout=-1",
        "--labels",
        "-x",
    ]
    assert join_negative(["--", "--window", "-1,2"]) == ["--", "--window", "-1,2"]


# --- one --help for the shared options --------------------------------------------------------


def _help(capsys, main, argv) -> str:
    assert main(argv) == 0
    return capsys.readouterr().out


def _option_block(text: str, option: str) -> str:
    """The help lines of one option: its line and the indented continuation lines."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"  {option}[ ,]", line + " "))
    end = start + 1
    while end < len(lines) and lines[end].startswith(" " * 24):
        end += 1
    return "\n".join(lines[start:end])


def test_help_describes_the_shared_options_identically(capsys):
    client = _help(capsys, cli.main, ["--help"])
    for command in ("run", "query"):
        pacs = _help(capsys, pacs_cli.main, [command, "--help"])
        for option in (
            "--point",
            "--box",
            "--window",
            "--url",
            "--timeout",
            "--retries",
            "--tls",
            "--root-cert",
            "--client-cert",
            "--client-key",
            "--header",
            "--api-key-file",
            "--labels-file",
        ):
            assert _option_block(client, option) == _option_block(pacs, option), option
        for section in (
            arguments.REGION_TITLE,
            arguments.REGION_EPILOG,
            arguments.SEVERAL_REGIONS_EPILOG,
            arguments.WINDOW_EPILOG,
            arguments.CONNECTION_EPILOG,
            arguments.exit_codes_help(),
        ):
            assert section in client and section in pacs, section
    assert "--mask MASK.png" in client and "exit codes (the same" in client


# --- exit codes -------------------------------------------------------------------------------


def test_exit_codes_are_one_table():
    assert sorted(EXIT_CODES) == [0, 1, 2, 3, 4, 5, 6, 130]
    for name in ("EXIT_OK", "EXIT_ERROR", "EXIT_USAGE", "EXIT_REJECTED", "EXIT_UNAVAILABLE"):
        assert getattr(cli, name) == getattr(arguments, name)
    assert cli.EXIT_DENIED == arguments.EXIT_DENIED == 5
    assert pacs_cli.EXIT_REFUSED == cli.EXIT_REJECTED == 3
    assert pacs_cli.EXIT_UNREACHABLE == cli.EXIT_UNAVAILABLE == 4
    # every kind of PACS failure is its shared code
    expected = {
        ErrorKind.OTHER: arguments.EXIT_ERROR,
        ErrorKind.USAGE: arguments.EXIT_USAGE,
        ErrorKind.REFUSED: arguments.EXIT_REJECTED,
        ErrorKind.UNREACHABLE: arguments.EXIT_UNAVAILABLE,
        ErrorKind.DENIED: arguments.EXIT_DENIED,
        ErrorKind.NOT_FOUND: arguments.EXIT_NOT_FOUND,
    }
    for kind in ErrorKind:
        assert PacsError("x", kind).exit_code == expected[kind], kind


def test_pacs_inference_clients_get_the_connection_options(tmp_path):
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    args = _pacs_args(
        ["--url", "127.0.0.1:1", "--timeout", "5", "--retries", "0", "--header", "x-a=b"]
        + ["--api-key-file", str(key)]
    )
    options = arguments.connection_options(args)
    same = ["--triton", "127.0.0.1:1", "--timeout", "5", "--retries", "0", "--header", "x-a=b"]
    assert options == arguments.connection_options(
        _client_args([*same, "--api-key-file", str(key)])
    )
    url, timeout_s = options.pop("url"), options.pop("timeout_s")
    bridge = Bridge(DicomWeb("http://127.0.0.1:1/dicom-web"), url, timeout_s, options)
    with bridge:
        client = bridge._client()  # no call made: nothing listens on port 1
        assert client is bridge._client()
        assert client.url == "127.0.0.1:1" and client.timeout_s == 5.0
        assert client.retry.retries == 0
        assert client.headers == {"x-a": "b", "authorization": "Bearer s3cret"}
        # a refused caller: exit 5, and it stops a query batch like an unreachable server
        refused = bridge._inference_error(
            MedPClipError("needs an API key", "StatusCode.UNAUTHENTICATED"), None
        )
        assert refused.exit_code == 5 and refused.kind == ErrorKind.DENIED
        assert "--api-key-file" in refused.message
        invalid = MedPClipError("bad box", "StatusCode.INVALID_ARGUMENT")
        assert bridge._inference_error(invalid, None).exit_code == 3
