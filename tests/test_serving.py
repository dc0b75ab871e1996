"""End to end through the real tritonserver over gRPC, compared with the PyTorch model."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import (
    PARITY_LABELS,
    PROMPT_FORMS,
    PROMPT_H,
    PROMPT_W,
    image_bytes,
    infer_outputs,
    make_inputs,
    sample_image,
)

from medpclip import reference

LABELS = PARITY_LABELS
H, W = PROMPT_H, PROMPT_W
ATOL = 1e-4
PROMPTS = PROMPT_FORMS
_infer = infer_outputs


def _reference(model, checkpoint, image, prompt, labels):
    return reference.run(
        model,
        image,
        checkpoint / "tokenizer.json",
        points=prompt.get("POINTS"),
        point_labels=prompt.get("POINT_LABELS"),
        box=prompt.get("BOX"),
        mask=prompt.get("MASK"),
        labels=labels,
    )


def _compare(served, expected, height, width):
    for name, want in expected.items():
        got = served[name]
        assert got is not None, name
        if name == "REGION_MASK":
            assert got.shape == (height, width) and got.dtype == np.uint8
            # binary: equal except where a logit sits within float noise of the threshold
            assert np.mean(got != want) < 1e-3, name
        else:
            assert got.shape == want.shape, name
            assert np.abs(got - want).max() <= ATOL, (name, np.abs(got - want).max())


@pytest.mark.parametrize("form", list(PROMPTS))
def test_each_prompt_form_matches_pytorch(grpc, model, checkpoint, form):
    img = sample_image(H, W)
    prompt = PROMPTS[form]
    served = _infer(
        grpc,
        "medp_clip",
        IMAGE=image_bytes(img),
        LABELS=np.array([s.encode() for s in LABELS], dtype=object),
        **prompt,
    )
    expected = _reference(model, checkpoint, img, prompt, LABELS)
    _compare(served, expected, H, W)
    assert served["REGION_PROBS"].sum() == pytest.approx(1.0, abs=1e-5)


def test_region_prompt_changes_the_region_embedding_only(grpc):
    img = image_bytes(sample_image(H, W))
    a = _infer(grpc, "medp_clip_image", IMAGE=img, **PROMPTS["point"])
    b = _infer(grpc, "medp_clip_image", IMAGE=img, **PROMPTS["box_and_point"])
    assert np.abs(a["REGION_EMBEDDING"] - b["REGION_EMBEDDING"]).max() > 1e-3
    np.testing.assert_allclose(a["GLOBAL_EMBEDDING"], b["GLOBAL_EMBEDDING"], atol=1e-6)
    for e in (a["GLOBAL_EMBEDDING"], a["REGION_EMBEDDING"]):
        assert np.linalg.norm(e) == pytest.approx(1.0, abs=1e-5)


def test_dicom_from_pydicom_test_files(grpc, model, checkpoint):
    from medpclip.real_inputs import sample_dicom

    data = sample_dicom()  # CT_small.dcm: 128x128, rescale slope/intercept, window tags
    prompt = {
        "POINTS": np.array([[64.0, 70.0]], np.float32),
        "BOX": np.array([30.0, 40.0, 90.0, 100.0], np.float32),
    }
    served = _infer(
        grpc,
        "medp_clip",
        IMAGE=np.array([data], dtype=object),
        LABELS=np.array([s.encode() for s in LABELS], dtype=object),
        **prompt,
    )
    expected = _reference(model, checkpoint, data, prompt, LABELS)
    _compare(served, expected, 128, 128)


def test_raw_pixels_with_window(grpc, model, checkpoint):
    hu = (sample_image(H, W).astype(np.float32) * 8 - 1000)[..., None]  # HU-like values
    window = np.array([40.0, 400.0], np.float32)
    served = _infer(grpc, "medp_clip_image", PIXELS=hu, WINDOW=window, **PROMPTS["box"])
    expected = reference.run(
        model, hu, checkpoint / "tokenizer.json", box=PROMPTS["box"]["BOX"], window=(40.0, 400.0)
    )
    _compare(served, expected, H, W)


def test_text_ensemble_matches_pytorch(grpc, model, checkpoint):
    import torch

    from medpclip.real_inputs import text_batch

    served = _infer(grpc, "medp_clip_text", LABELS=np.array([s.encode() for s in LABELS], object))
    tb = text_batch(checkpoint / "tokenizer.json", model.cfg.text.context_length, LABELS)
    with torch.no_grad():
        want = model.encode_text(*(torch.from_numpy(tb[k]) for k in tb)).numpy()
    assert np.abs(served["TEXT_EMBEDDINGS"] - want).max() <= ATOL


def test_reference_refuses_the_over_long_label_the_server_refuses(grpc, model, checkpoint):
    """One loader, one check: the PyTorch reference and the served ensembles refuse a label one
    token longer than the config's context with the same message."""
    from tritonclient.utils import InferenceServerException

    from medpclip_core.errors import InputError

    over = " ".join(["round"] * (model.cfg.text.context_length - 1))  # + [CLS], [SEP]
    labels = ["a cyst", over]
    img = sample_image(H, W)
    with pytest.raises(InputError) as ref:
        _reference(model, checkpoint, img, PROMPTS["point"], labels)
    assert f"label 1 is {model.cfg.text.context_length + 1} tokens long" in str(ref.value)
    wire = np.array([s.encode() for s in labels], dtype=object)
    for name, extra in (
        ("medp_clip", {"IMAGE": image_bytes(img), **PROMPTS["point"]}),
        ("medp_clip_text", {}),
    ):
        with pytest.raises(InferenceServerException) as served:
            grpc.infer(name, make_inputs(name, LABELS=wire, **extra))
        assert str(ref.value) in served.value.message(), (name, served.value.message())


def test_concurrent_requests_are_batched_correctly(grpc, model, checkpoint):
    """Requests that meet in the dynamic batcher still get their own answers."""
    from concurrent.futures import ThreadPoolExecutor

    imgs = [sample_image(H, W, seed=s) for s in range(6)]

    def one(i):
        return _infer(grpc, "medp_clip_image", IMAGE=image_bytes(imgs[i]), **PROMPTS["point"])

    with ThreadPoolExecutor(6) as pool:
        served = list(pool.map(one, range(6)))
    for img, got in zip(imgs, served, strict=True):
        want = _reference(model, checkpoint, img, PROMPTS["point"], None)
        assert np.abs(got["REGION_EMBEDDING"] - want["REGION_EMBEDDING"]).max() <= ATOL


def _text_encoder_cache_hits(server) -> int:
    import re
    import urllib.request

    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    m = re.search(r'nv_cache_num_hits_per_model\{model="text_encoder",version="1"\} (\d+)', text)
    return int(m.group(1)) if m else 0


def test_repeated_label_set_is_answered_from_the_response_cache(grpc, server):
    labels = np.array([b"a cached label", b"another cached label"], dtype=object)
    first = _infer(grpc, "medp_clip_text", LABELS=labels)["TEXT_EMBEDDINGS"]
    before = _text_encoder_cache_hits(server)
    again = _infer(grpc, "medp_clip_text", LABELS=labels)["TEXT_EMBEDDINGS"]
    assert _text_encoder_cache_hits(server) == before + 1
    assert np.array_equal(first, again)


def test_medp_clip_encodes_a_repeated_label_set_once(grpc, server, model, checkpoint):
    """The main call's text branch is served from the same cache: the second call with the same
    labels (another image, another prompt) is a cache hit and answers as the reference does."""
    labels = ["a label set for medp_clip", "and a second label"]
    wire = np.array([s.encode() for s in labels], dtype=object)
    _infer(grpc, "medp_clip", IMAGE=image_bytes(sample_image(H, W)), LABELS=wire)
    before = _text_encoder_cache_hits(server)
    img = sample_image(H, W, seed=1)
    served = _infer(grpc, "medp_clip", IMAGE=image_bytes(img), LABELS=wire, **PROMPTS["box"])
    assert _text_encoder_cache_hits(server) == before + 1
    _compare(served, _reference(model, checkpoint, img, PROMPTS["box"], labels), H, W)
