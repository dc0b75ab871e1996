"""Encode once, prompt many, from the client's side: `MedPClipClient.session` and
`AsyncMedPClipClient.session` answer what `infer` answers (within 1e-4) with one encode call and
one prompt call per region, through the real server; the `medpclip-client` command line answers
several regions of one image with one encode. (The PACS bridge's several regions: test_pacs.py;
parsing --region: test_arguments.py.)"""

from __future__ import annotations

import asyncio
import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import sample_image
from PIL import Image
from pydicom.data import get_testdata_file

from medpclip_client import cli
from medpclip_client.aio import AsyncMedPClipClient
from medpclip_client.client import MedPClipClient, MedPClipError, Region, Result
from medpclip_core import tensors as T
from medpclip_core.dicom import read_dicom, to_request

LABELS = ["a round hyperdense nodule", "a dark cyst", "normal tissue"]
H, W = 120, 200
ATOL = 1e-4


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _mask() -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return (((yy - 80) ** 2 + (xx - 150) ** 2) < 20**2).astype(np.uint8)


REGIONS = [
    Region(points=[(50, 40)]),
    Region(box=(120, 50, 185, 110)),
    Region(points=[(50, 40), (55, 45), (150, 80)], point_labels=[1, 1, 0]),
    Region(mask=_mask()),
    Region(box=(30, 20, 75, 62), points=[(50, 40)]),
    None,
]


@pytest.fixture(scope="module")
def image() -> bytes:
    return _png(sample_image(H, W))


def _same(got: Result, want: Result) -> None:
    """`got` (a session's answer) is `want` (the plain call's) within ATOL."""
    assert got.labels == want.labels
    for name in (
        "region_probs",
        "image_probs",
        "global_embedding",
        "region_embedding",
        "patch_features",
        "mask_logits",
    ):
        g, w = getattr(got, name), getattr(want, name)
        if w is None:
            assert g is None, name
            continue
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert np.abs(g - w).max() <= ATOL, (name, float(np.abs(g - w).max()))
    assert abs(got.iou - want.iou) <= ATOL
    assert got.mask.shape == want.mask.shape
    # binary: equal except where a logit sits within float noise of the threshold
    assert np.mean(got.mask != want.mask) < 1e-3


def _record_calls(client) -> list[tuple[str, dict]]:
    """The (model, call options) of every `infer` RPC the client sends (sync or asyncio)."""
    real = client.triton.infer
    calls: list[tuple[str, dict]] = []

    if asyncio.iscoroutinefunction(real):

        async def wrapper(model_name, *args, **kwargs):
            calls.append((model_name, kwargs))
            return await real(model_name, *args, **kwargs)
    else:

        def wrapper(model_name, *args, **kwargs):
            calls.append((model_name, kwargs))
            return real(model_name, *args, **kwargs)

    client.triton.infer = wrapper
    return calls


def test_session_answers_as_infer_with_one_encode(server, image):
    with MedPClipClient(server.grpc_url, headers={"x-request-id": "s1"}, timeout_s=30) as client:
        plain = [client.infer(image, r, LABELS) for r in REGIONS]
        plain_image = client.infer(image, REGIONS[0])
        calls = _record_calls(client)
        with client.session(image) as s:
            assert s.encoded and [m for m, _ in calls] == ["medp_clip_encode"]  # on enter
            answers = [s.infer(r, LABELS) for r in REGIONS]
            no_labels = s.infer(REGIONS[0])  # without labels: medp_clip_prompt_image
            tokens = s.tokens
            declared = T.MEDP_CLIP_ENCODE.output("IMAGE_TOKENS").dtype
            assert s.tokens_dtype == np.dtype(declared)
            assert s.tokens_nbytes == tokens[0].nbytes + tokens[1].nbytes > 0
        assert s.tokens is None  # leaving drops them; the server held nothing
    for got, want in zip(answers, plain, strict=True):
        _same(got, want)
    _same(no_labels, plain_image)
    assert no_labels.region_probs is None
    models = [m for m, _ in calls]
    assert models == ["medp_clip_encode"] + ["medp_clip_prompt"] * len(REGIONS) + [
        "medp_clip_prompt_image"
    ]
    # every call went through the client: its headers and deadline
    for _, kwargs in calls:
        assert kwargs["headers"]["x-request-id"] == "s1"
        assert 0 < kwargs["client_timeout"] <= 30


def test_session_without_with_encodes_lazily_and_takes_pixels_and_dicom(server):
    ct = Path(get_testdata_file("CT_small.dcm", download=False)).read_bytes()
    decoded = read_dicom(ct, window="lung")
    pixels, pixel_window = to_request(decoded)
    region = Region(box=(20, 30, 90, 100))
    with MedPClipClient(server.grpc_url) as client:
        for image, window in ((ct, None), (ct, decoded.window), (pixels, pixel_window)):
            want = client.infer(image, region, LABELS, window)
            s = client.session(image, window)
            assert not s.encoded and s.tokens_nbytes == 0
            _same(s.infer(region, LABELS), want)
            s.infer(region, LABELS)
            assert s.encodes == 1
        # threads may share a session: concurrent first calls share one encode
        shared = client.session(ct)
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda r: shared.infer(r, LABELS), [region] * 4))
        assert shared.encodes == 1
        for got in answers:
            _same(got, client.infer(ct, region, LABELS))


def test_session_errors(server, image):
    with MedPClipClient(server.grpc_url, retries=0) as client:
        # a bad image fails where it is given: entering the session
        with pytest.raises(MedPClipError) as bad, client.session(b"not an image"):
            pytest.fail("entered a session of a bad image")
        assert bad.value.invalid_input
        with client.session(image) as s:
            # a bad region is that call's INVALID_ARGUMENT; the session keeps working
            with pytest.raises(MedPClipError) as outside:
                s.infer(Region(box=(10, 10, 500, 50)), LABELS)
            assert outside.value.invalid_input
            _same(s.infer(REGIONS[1], LABELS), client.infer(image, REGIONS[1], LABELS))
        with pytest.raises(TypeError):
            client.session("ct.dcm")  # a path is not an image


def test_async_session_answers_as_infer_with_one_encode(server, image):
    with MedPClipClient(server.grpc_url) as client:
        plain = [client.infer(image, r, LABELS) for r in REGIONS]

    async def run():
        async with AsyncMedPClipClient(server.grpc_url) as aclient:
            calls = _record_calls(aclient)
            async with aclient.session(image) as s:
                answers = await asyncio.gather(*(s.infer(r, LABELS) for r in REGIONS))
            # without `async with`: concurrent first calls share one encode
            lazy = aclient.session(image)
            again = await asyncio.gather(*(lazy.infer(r, LABELS) for r in REGIONS[:3]))
            return answers, again, [m for m, _ in calls], lazy.encodes

    answers, again, models, encodes = asyncio.run(run())
    for got, want in zip(answers, plain, strict=True):
        _same(got, want)
    for got, want in zip(again, plain[:3], strict=True):
        _same(got, want)
    assert models.count("medp_clip_encode") == 2 and encodes == 1
    assert models.count("medp_clip_prompt") == len(REGIONS) + 3


# --- the command line -------------------------------------------------------------------------


def _counting_client(monkeypatch) -> list[str]:
    """Record the models the CLI's client calls."""
    models: list[str] = []

    class Counting(MedPClipClient):
        def _call(self, method, *args, **kwargs):
            if method == "infer":
                models.append(args[0])
            return super()._call(method, *args, **kwargs)

    monkeypatch.setattr(cli, "MedPClipClient", Counting)
    return models


def test_cli_several_regions_one_encode(server, image, tmp_path, capsys, monkeypatch):
    path = tmp_path / "image.png"
    path.write_bytes(image)
    with MedPClipClient(server.grpc_url) as client:
        want = [
            client.infer(image, r, LABELS)
            for r in (
                Region(box=(120, 50, 185, 110)),
                Region(box=(30, 20, 75, 62)),
                Region(points=[(50, 40), (150, 80)], point_labels=[1, 0]),
            )
        ]
    models = _counting_client(monkeypatch)
    base = [str(path), "--url", server.grpc_url, "--box", "120,50,185,110", "--box", "30 20 75 62"]
    base += ["--region", "point=50,40 point=150,80,0", "--labels", *LABELS]

    # --json: one object per region, in order, in one list
    mask = tmp_path / "mask.png"
    assert cli.main([*base, "--json", "--save-mask", str(mask)]) == 0
    docs = json.loads(capsys.readouterr().out)
    assert models == ["medp_clip_encode"] + ["medp_clip_prompt"] * 3
    assert [d["region"] for d in docs] == [
        {"points": [], "box": [120.0, 50.0, 185.0, 110.0]},
        {"points": [], "box": [30.0, 20.0, 75.0, 62.0]},
        {"points": [[50.0, 40.0, 1], [150.0, 80.0, 0]], "box": None},
    ]
    for i, (doc, result) in enumerate(zip(docs, want, strict=True), 1):
        probs = {row["label"]: row["region_prob"] for row in doc["labels"]}
        for label, p, _ in result.top():
            assert abs(probs[label] - p) <= ATOL
        assert abs(doc["iou"] - result.iou) <= ATOL
        saved = tmp_path / f"mask.{i}.png"
        assert doc["mask"]["saved"] == str(saved)
        got = np.asarray(Image.open(saved)) > 0
        assert np.mean(got != result.mask.astype(bool)) < 1e-3

    # text: one table per region, headed by the region, in order
    models.clear()
    assert cli.main(base) == 0
    out = capsys.readouterr().out
    heads = [line for line in out.splitlines() if line.startswith("region ")]
    assert heads == [
        "region 1: box=120,50,185,110",
        "region 2: box=30,20,75,62",
        "region 3: point=50,40 point=150,80,0",
    ]
    assert out.count("label ") == 3 and "image encoded once for 3 regions" in out
    assert models == ["medp_clip_encode"] + ["medp_clip_prompt"] * 3

    # one region, however given: the plain call and the output of old
    for argv in (["--box", "120,50,185,110"], ["--region", "box=120,50,185,110"]):
        models.clear()
        assert (
            cli.main([str(path), "--url", server.grpc_url, *argv, "--json", "--labels", *LABELS])
            == 0
        )
        doc = json.loads(capsys.readouterr().out)
        assert isinstance(doc, dict) and "region" not in doc
        assert models == ["medp_clip"]


def test_cli_a_rejected_region_is_named(server, image, tmp_path, capsys):
    path = tmp_path / "image.png"
    path.write_bytes(image)
    argv = [str(path), "--url", server.grpc_url, "--box", "10,10,50,50", "--box", "10,10,500,50"]
    assert cli.main([*argv, "--labels", *LABELS]) == 3
    out, err = capsys.readouterr()
    assert out == ""
    assert "input rejected by the server: region 2 (box=10,10,500,50):" in err
