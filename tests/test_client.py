"""The client library against the real server: asyncio batches, retries, deadlines, headers, TLS,
DICOM decoding on the client, and the folder CLI."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import sample_image, self_signed_certificate
from PIL import Image
from pydicom.data import get_testdata_file

from medpclip_client import cli
from medpclip_client.aio import AsyncMedPClipClient
from medpclip_client.client import MedPClipClient, MedPClipError, Region, Request
from medpclip_core.dicom import WINDOW_PRESETS, read_dicom, to_request
from medpclip_core.imaging import InputError
from medpclip_tools.serve import ServeProcess

LABELS = ["a round hyperdense nodule", "a dark cyst", "normal tissue"]
UNAVAILABLE = "StatusCode.UNAVAILABLE"


def _testdata(name: str) -> Path:
    """A DICOM file bundled with pydicom (never downloaded)."""
    return Path(get_testdata_file(name, download=False))


def _png(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _count_calls(client, method: str = "infer") -> dict[str, int]:
    """Count the RPCs a client sends (and the most in flight at once) by wrapping the
    tritonclient method; works for the sync and the asyncio client."""
    real = getattr(client.triton, method)
    state = {"calls": 0, "now": 0, "peak": 0}

    def enter() -> None:
        state["calls"] += 1
        state["now"] += 1
        state["peak"] = max(state["peak"], state["now"])

    if asyncio.iscoroutinefunction(real):

        async def wrapper(*args, **kwargs):
            enter()
            try:
                return await real(*args, **kwargs)
            finally:
                state["now"] -= 1
    else:

        def wrapper(*args, **kwargs):
            enter()
            try:
                return real(*args, **kwargs)
            finally:
                state["now"] -= 1

    setattr(client.triton, method, wrapper)
    return state


def _ct_with(tmp_path: Path, name: str, **tags: object) -> Path:
    """A copy of CT_small.dcm with some attributes changed."""
    ds = pydicom.dcmread(_testdata("CT_small.dcm"))
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    path = tmp_path / name
    ds.save_as(path)
    return path


# --- asyncio batches --------------------------------------------------------------------------


def _batch() -> list[Request]:
    ct = _testdata("CT_small.dcm").read_bytes()
    png = _png(sample_image())
    requests = []
    for i in range(16):
        if i % 2:
            requests.append(Request(ct, Region(points=[(10 + 7 * i, 60)]), LABELS, tag=i))
        else:
            box = (5 + i, 10, 60 + 5 * i, 100)
            requests.append(Request(png, Region(box=box), LABELS if i % 4 else None, tag=i))
    return requests


def test_infer_many_16_in_flight_matches_the_sync_client(server):
    requests = _batch()
    bad = Request(requests[1].image, Region(points=[(500, 5)]), LABELS, tag="bad")

    async def run(batch, concurrency):
        async with AsyncMedPClipClient(server.grpc_url) as client:
            calls = _count_calls(client)
            outcomes = [o async for o in client.infer_many(batch, concurrency=concurrency)]
        return outcomes, calls

    outcomes, calls = asyncio.run(run([*requests, bad], 16))
    assert calls["peak"] == 16 and calls["calls"] == 17
    assert sorted(o.index for o in outcomes) == list(range(17))
    failed = [o for o in outcomes if not o.ok]
    assert [o.request.tag for o in failed] == ["bad"]  # one bad item does not stop the batch
    assert isinstance(failed[0].error, MedPClipError) and failed[0].error.invalid_input

    with MedPClipClient(server.grpc_url) as client:
        expected = [client.infer(r.image, r.region, r.labels, r.window) for r in requests]
    for out in outcomes:
        if out.request.tag == "bad":
            continue
        got, want = out.result, expected[out.index]
        assert out.request is requests[out.index]
        for name in ("global_embedding", "region_embedding", "region_probs", "image_probs"):
            a, b = getattr(got, name), getattr(want, name)
            assert (a is None) == (b is None), name
            if a is not None:
                np.testing.assert_allclose(a, b, atol=1e-5, err_msg=name)
        assert np.array_equal(got.mask, want.mask) and got.iou == pytest.approx(want.iou, abs=1e-5)

    _, calls = asyncio.run(run(requests[:10], 4))  # the window bounds what is in flight
    assert calls["peak"] == 4 and calls["calls"] == 10


# --- retries and deadlines --------------------------------------------------------------------


def test_unavailable_is_retried_with_backoff(server):
    url = f"127.0.0.1:{_closed_port()}"
    waits: list[tuple[int, float]] = []
    client = MedPClipClient(
        url, retries=2, backoff_s=0.05, on_retry=lambda n, err, d: waits.append((n, d))
    )
    calls = _count_calls(client)
    start = time.monotonic()
    with pytest.raises(MedPClipError) as info:
        client.infer(_png(sample_image()), labels=["a"])
    elapsed = time.monotonic() - start
    client.close()
    assert calls["calls"] == 3 and info.value.attempts == 3
    assert info.value.status == UNAVAILABLE and info.value.unavailable
    # exponential backoff with jitter in [0.5, 1] of 0.05 s, then 0.1 s
    assert [n for n, _ in waits] == [1, 2]
    assert 0.025 <= waits[0][1] <= 0.05 and 0.05 <= waits[1][1] <= 0.1
    assert elapsed >= sum(d for _, d in waits)

    async def run_async() -> tuple[int, MedPClipError]:
        async with AsyncMedPClipClient(url, retries=2, backoff_s=0.01) as aclient:
            acalls = _count_calls(aclient)
            try:
                await aclient.infer(_png(sample_image()), labels=["a"])
            except MedPClipError as exc:
                return acalls["calls"], exc
        raise AssertionError("a closed port must fail")

    n, exc = asyncio.run(run_async())
    assert n == 3 and exc.status == UNAVAILABLE and exc.attempts == 3


@pytest.fixture
def fake_server():
    """A bare gRPC server answering every call with a chosen status (or too late), recording
    the metadata of each call it receives: retries and headers seen from the server's side,
    and deadlines, without cancelling work on Triton (2.51 can crash on that, server#7368)."""
    import grpc

    seen: list[dict[str, str]] = []
    behaviour = {"status": grpc.StatusCode.UNAVAILABLE}

    def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
        seen.append(dict(context.invocation_metadata()))
        status = behaviour["status"]
        if status is None:  # never answer in time
            while context.is_active():
                time.sleep(0.01)
            return b""
        context.abort(status, f"fake {status.name}")

    class Handler(grpc.GenericRpcHandler):
        def service(self, details):
            return grpc.unary_unary_rpc_method_handler(handle)

    srv = grpc.server(ThreadPoolExecutor(4))
    srv.add_generic_rpc_handlers((Handler(),))
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    yield f"127.0.0.1:{port}", seen, behaviour
    srv.stop(0)


def test_only_unavailable_is_retried(server, fake_server):
    import grpc

    url, seen, behaviour = fake_server
    image = _png(sample_image())
    with MedPClipClient(url, retries=2, backoff_s=0.01, headers={"X-Trace": "t1"}) as client:
        with pytest.raises(MedPClipError) as info:
            client.infer(image, labels=["a"])
        assert info.value.status == UNAVAILABLE and len(seen) == 3  # the server saw 3 calls
        assert all(m.get("x-trace") == "t1" for m in seen)  # headers on every attempt
        seen.clear()
        behaviour["status"] = grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(MedPClipError) as info:
            client.infer(image, labels=["a"])
        assert info.value.invalid_input and info.value.attempts == 1 and len(seen) == 1
        seen.clear()
        behaviour["status"] = None
        start = time.monotonic()
        with pytest.raises(MedPClipError) as info:
            client.infer(image, labels=["a"], timeout_s=0.3)
        assert info.value.status == "StatusCode.DEADLINE_EXCEEDED" and len(seen) == 1
        assert 0.25 <= time.monotonic() - start < 1.0

    # and the real server's INVALID_ARGUMENT: one call, the message says what to fix
    with MedPClipClient(server.grpc_url, retries=3, backoff_s=0.05) as client:
        calls = _count_calls(client)
        with pytest.raises(MedPClipError) as info:
            client.infer(image, Region(points=[(500, 5)]), labels=["a"])
        assert info.value.invalid_input and calls["calls"] == 1
        assert "outside the 200x120 image" in info.value.message
        # the client still works: one channel, reused
        assert client.infer(image, labels=["a"]).region_probs.shape == (1,)


def test_headers_are_sent_and_harmless(server):
    headers = {"Authorization": "Bearer test-token", "x-request-source": "pytest"}
    with MedPClipClient(server.grpc_url, headers=headers) as client:
        assert client.headers["authorization"] == "Bearer test-token"  # gRPC wants lower case
        assert client.ready()
        assert client.text_embeddings(["a cyst"]).shape[0] == 1
        r = client.infer(_png(sample_image()), Region(points=[(50, 40)]), labels=LABELS)
        assert r.region_probs.sum() == pytest.approx(1, abs=1e-4)


# --- DICOM on the client ----------------------------------------------------------------------


def test_read_dicom_modality_lut_and_window_precedence(tmp_path):
    path = _testdata("CT_small.dcm")
    ds = pydicom.dcmread(path)
    d = read_dicom(path)
    expected = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + ds.RescaleIntercept
    assert d.pixels.dtype == np.float32 and np.array_equal(d.pixels, expected)  # HU
    assert d.transfer_syntax == "1.2.840.10008.1.2.1" and d.frames == 1
    # CT_small has no window tags: min-max, expressed as the equivalent window
    assert d.window_source == "min-max"
    lo, hi = float(expected.min()), float(expected.max())
    assert d.window == pytest.approx(((lo + hi) / 2 + 0.5, hi - lo + 1))
    np.testing.assert_allclose(d.display(), (expected - lo) / (hi - lo), atol=1e-6)

    tagged = _ct_with(tmp_path, "w.dcm", WindowCenter=[40, 400], WindowWidth=[400, 2000])
    assert read_dicom(tagged).window == (40.0, 400.0)  # the file's first window
    assert read_dicom(tagged).window_source == "file"
    assert read_dicom(tagged, window="Lung").window == WINDOW_PRESETS["lung"]
    assert read_dicom(tagged, window="lung").window_source == "preset"
    assert read_dicom(tagged, window=(10, 20)).window == (10.0, 20.0)
    with pytest.raises(InputError, match="unknown window preset 'lungs'.*mediastinum"):
        read_dicom(path, window="lungs")


def test_read_dicom_compressed_transfer_syntaxes():
    # RLE: the same image as the uncompressed MR_small.dcm, window from the file
    rle = read_dicom(_testdata("MR_small_RLE.dcm").read_bytes())
    assert rle.transfer_syntax == "1.2.840.10008.1.2.5"
    assert np.array_equal(rle.pixels, read_dicom(_testdata("MR_small.dcm")).pixels)
    assert rle.window == (600.0, 1600.0) and rle.window_source == "file"
    # JPEG 2000 (pylibjpeg-openjpeg)
    j2k = read_dicom(_testdata("JPEG2000.dcm"))
    assert j2k.transfer_syntax == "1.2.840.10008.1.2.4.91" and j2k.pixels.shape == (1024, 256)
    assert np.isfinite(j2k.pixels).all() and j2k.pixels.max() > j2k.pixels.min()
    # JPEG baseline in YBR_FULL (pylibjpeg-libjpeg), converted to RGB: close to the RGB original
    ybr = read_dicom(_testdata("SC_rgb_jpeg_dcmtk.dcm"))
    ref = pydicom.dcmread(_testdata("SC_rgb_rle.dcm")).pixel_array.astype(np.float32)
    assert ybr.photometric == "YBR_FULL" and ybr.is_color and ybr.pixels.shape == (100, 100, 3)
    assert np.abs(ybr.pixels - ref).max() <= 8  # lossy JPEG, not a colour-space mix-up
    pixels, window = to_request(ybr)
    assert window is None and np.array_equal(pixels, ybr.pixels)  # 8-bit: 0..255 as stored


def test_read_dicom_errors_name_the_transfer_syntax(tmp_path):
    # JPEG Extended whose fragment no installed decoder can read (the real 12-bit file decodes:
    # tests/test_hard_inputs.py)
    from pydicom.encaps import encapsulate

    broken = pydicom.dcmread(_testdata("JPEG-lossy.dcm"))
    broken.PixelData = encapsulate([b"\xff\xd8" + bytes(100) + b"\xff\xd9"])
    with pytest.raises(InputError, match=r"1\.2\.840\.10008\.1\.2\.4\.51.*failed on it"):
        read_dicom(broken)
    ds = pydicom.dcmread(_testdata("CT_small.dcm"))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no handler at all
    with pytest.raises(InputError, match=r"1\.2\.840\.10008\.1\.2\.4\.100 \(MPEG2.*no installed"):
        read_dicom(ds)
    with pytest.raises(InputError, match="not a readable DICOM"):
        read_dicom(b"a PNG, perhaps, but no DICOM")
    with pytest.raises(InputError, match="no pixel data"):
        read_dicom(b"\0" * 128 + b"DICM" + b"garbage")


def test_read_dicom_frames(tmp_path):
    path = _testdata("SC_rgb_rle_2frame.dcm")
    f0, f1 = read_dicom(path, frame=0), read_dicom(path, frame=1)
    assert f0.frames == 2 and f1.frame == 1
    assert not np.array_equal(f0.pixels, f1.pixels)
    with pytest.raises(InputError, match=r"frame 5 requested but the file has 2 frame\(s\)"):
        read_dicom(path, frame=5)

    # enhanced multi-frame: the rescale lives in the per-frame functional groups
    ds = pydicom.dcmread(_testdata("CT_small.dcm"))
    raw = ds.pixel_array
    ds.PixelData = np.concatenate([raw, raw]).tobytes()
    ds.NumberOfFrames = 2
    del ds.RescaleIntercept, ds.RescaleSlope
    ds.PerFrameFunctionalGroupsSequence = [
        pydicom.Dataset(),
        pydicom.Dataset(),
    ]
    for item, intercept in zip(ds.PerFrameFunctionalGroupsSequence, (-1024, -1000), strict=True):
        pvt = pydicom.Dataset()
        pvt.RescaleIntercept, pvt.RescaleSlope, pvt.RescaleType = intercept, 1, "HU"
        item.PixelValueTransformationSequence = [pvt]
    a, b = read_dicom(ds, frame=0), read_dicom(ds, frame=1)
    assert np.array_equal(a.pixels, raw - 1024.0) and np.array_equal(b.pixels, raw - 1000.0)


def test_monochrome1_is_inverted_after_windowing(tmp_path):
    mono2 = read_dicom(_testdata("CT_small.dcm"), window="abdomen")
    mono1 = read_dicom(_ct_with(tmp_path, "m1.dcm", PhotometricInterpretation="MONOCHROME1"))
    assert mono1.photometric == "MONOCHROME1"
    np.testing.assert_allclose(
        mono1.display(), 1 - read_dicom(_testdata("CT_small.dcm")).display(), atol=1e-6
    )
    # sent as display values (the server windows PIXELS as MONOCHROME2): no window
    pixels, window = to_request(mono1)
    assert window is None and pixels.min() >= 0 and pixels.max() <= 255
    np.testing.assert_allclose(pixels, 255 * mono1.display(), atol=1e-4)
    # MONOCHROME2: modality values and the window, windowed by the server
    pixels, window = to_request(mono2)
    assert window == WINDOW_PRESETS["abdomen"] and np.array_equal(pixels, mono2.pixels)


def _mr_with_voi_lut(tmp_path: Path) -> Path:
    """MR_small.dcm (no rescale) with a non-linear VOI LUT instead of its window."""
    ds = pydicom.dcmread(_testdata("MR_small.dcm"))
    del ds.WindowCenter, ds.WindowWidth
    item = pydicom.Dataset()
    item.add_new("LUTDescriptor", "US", [4096, 0, 16])
    item.add_new("LUTData", "US", (np.sqrt(np.arange(4096) / 4095) * 65535).astype(int).tolist())
    ds.VOILUTSequence = [item]
    path = tmp_path / "voi.dcm"
    ds.save_as(path)
    return path


def test_voi_lut_sequence(tmp_path):
    d = read_dicom(_mr_with_voi_lut(tmp_path))
    assert d.window_source == "voi_lut" and d.window is None
    raw = pydicom.dcmread(_testdata("MR_small.dcm")).pixel_array.astype(np.float64)
    lut = np.sqrt(raw / 4095)
    np.testing.assert_allclose(d.display(), (lut - lut.min()) / (lut.max() - lut.min()), atol=1e-4)
    pixels, window = to_request(d)
    assert window is None and np.allclose(pixels, 255 * d.display())


def test_decoded_pixels_and_bytes_give_the_same_embeddings(server, tmp_path):
    """What `to_request` sends makes the server see the image it decodes from the file."""
    cases = [
        (_testdata("CT_small.dcm"), None),  # modality LUT, min-max
        (_testdata("CT_small.dcm"), "lung"),  # a preset, sent as WINDOW both ways
        (_testdata("MR_small_RLE.dcm"), None),  # RLE, the file's window
        (_ct_with(tmp_path, "m1.dcm", PhotometricInterpretation="MONOCHROME1"), None),
        (_mr_with_voi_lut(tmp_path), None),  # a VOI LUT Sequence (no rescale in this file)
    ]
    worst = 0.0
    with MedPClipClient(server.grpc_url) as client:
        for path, window in cases:
            data = path.read_bytes()
            d = read_dicom(data, window=window)
            region = Region(points=[(30, 30)])
            sent = client.infer(data, region, LABELS, d.window if window else None)
            pixels, pixel_window = to_request(d)
            decoded = client.infer(pixels, region, LABELS, pixel_window)
            for name in ("global_embedding", "region_embedding", "region_probs"):
                diff = np.abs(getattr(sent, name) - getattr(decoded, name)).max()
                worst = max(worst, float(diff))
            assert np.array_equal(sent.mask, decoded.mask)
    assert worst <= 1e-4, worst


# --- the folder CLI ---------------------------------------------------------------------------


def test_cli_folder_writes_json_lines(server, tmp_path, capsys):
    folder = tmp_path / "batch"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.png").write_bytes(_png(sample_image()))
    (folder / "sub" / "b.jpg").write_bytes(_png(sample_image(seed=1), "JPEG"))
    shutil.copy(_testdata("CT_small.dcm"), folder / "sub" / "1.2.840.99")  # DICOM by content
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (folder / "notes.txt").write_text("not an image")
    patient = str(pydicom.dcmread(_testdata("CT_small.dcm")).PatientName)
    base = [str(folder), "--url", server.grpc_url, "--recursive", "--labels", *LABELS]

    for extra in ([], ["--decode-locally", "--window", "lung"]):
        assert cli.main([*base, "--concurrency", "4", "--no-progress", *extra]) == 3
        captured = capsys.readouterr()
        lines = [json.loads(line) for line in captured.out.splitlines()]
        assert sorted(d["file"] for d in lines) == [
            "a.png",
            "broken.png",
            "sub/1.2.840.99",
            "sub/b.jpg",
        ]
        by_file = {d["file"]: d for d in lines}
        assert "error" in by_file["broken.png"] and "labels" not in by_file["broken.png"]
        for name in ("a.png", "sub/1.2.840.99", "sub/b.jpg"):
            assert "error" not in by_file[name]
            assert {row["label"] for row in by_file[name]["labels"]} == set(LABELS)
            assert np.isfinite(by_file[name]["iou"]) and by_file[name]["mask"]["area_px"] >= 0
        assert by_file["sub/1.2.840.99"]["mask"]["width"] == 128
        # no PHI: no patient name, no absolute paths
        for text in (captured.out, captured.err):
            assert patient not in text and str(tmp_path) not in text

    # only good files: exit 0
    good = tmp_path / "good"
    good.mkdir()
    (good / "a.png").write_bytes(_png(sample_image()))
    assert cli.main([str(good), "--url", server.grpc_url, "--labels", "a", "--no-progress"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
    # nobody listening: the batch stops with 4 instead of failing every file
    closed = f"127.0.0.1:{_closed_port()}"
    assert cli.main([str(folder), "--url", closed, "--retries", "0", "--labels", "a"]) == 4
    assert "batch stopped" in capsys.readouterr().err


# --- TLS and the API key (the gateway of python -m medpclip_tools.serve) -----------------

API_KEY = "s3cret-api-key"


@pytest.fixture(scope="module")
def tls_server(build_dir, tmp_path_factory):
    """A second server with gRPC over TLS (a self-signed certificate for 127.0.0.1) that needs
    an API key: shows the client's TLS options and key reach the server."""
    d = tmp_path_factory.mktemp("tls")
    cert, key = self_signed_certificate(d)
    api_key = d / "api-key"
    api_key.write_text(API_KEY + "\n")
    args = ["--tls-cert", str(cert), "--tls-key", str(key), "--api-key-file", str(api_key)]
    with ServeProcess(build_dir / "model_repository", args=args, log_file=d / "log") as s:
        yield s, cert, api_key


def test_tls_and_api_key(tls_server, tmp_path, capsys, monkeypatch):
    server, cert, api_key = tls_server
    tls = {"root_certificates": cert, "retries": 0}
    with MedPClipClient(server.grpc_url, api_key=API_KEY, **tls) as c:
        assert c.ssl and c.text_embeddings(["a cyst", "a nodule"]).shape[0] == 2
    # the key from the environment
    monkeypatch.setenv("MEDPCLIP_API_KEY", API_KEY)
    with MedPClipClient(server.grpc_url, **tls) as c:
        assert c.text_embeddings(["a cyst"]).shape[0] == 1
    monkeypatch.delenv("MEDPCLIP_API_KEY")
    # TLS without the key, or a wrong one: refused, and the message never shows a key
    for kwargs in ({}, {"api_key": "wrong"}):
        with MedPClipClient(server.grpc_url, ssl=True, **tls, **kwargs) as c:
            with pytest.raises(MedPClipError, match="needs an API key") as info:
                c.text_embeddings(["a cyst"])
            assert info.value.status == "StatusCode.UNAUTHENTICATED"
            assert "wrong" not in str(info.value) and API_KEY not in str(info.value)
    # plaintext against the TLS port: no connection at all
    with MedPClipClient(server.grpc_url, retries=0, timeout_s=10) as c:
        with pytest.raises(MedPClipError, match="Socket closed|failed to connect") as info:
            c.text_embeddings(["a cyst"])
        assert info.value.status == UNAVAILABLE

    async def run_async() -> np.ndarray:
        async with AsyncMedPClipClient(server.grpc_url, api_key=API_KEY, **tls) as c:
            return await c.text_embeddings(["a cyst"])

    assert asyncio.run(run_async()).shape[0] == 1

    # the CLI's --tls/--root-cert/--api-key-file reach the server
    path = tmp_path / "a.png"
    path.write_bytes(_png(sample_image()))
    argv = [str(path), "--url", server.grpc_url, "--tls", "--root-cert", str(cert)]
    argv += ["--retries", "0", "--labels", "a", "b"]
    assert cli.main(["--api-key-file", str(api_key), *argv]) == 0
    out, err = capsys.readouterr()
    assert API_KEY not in out + err
    assert cli.main(argv) == 5
    err = capsys.readouterr().err
    assert "needs an API key" in err and API_KEY not in err
