"""Encode once, prompt many: `medp_clip_encode` then `medp_clip_prompt` / `medp_clip_prompt_image`
answer what `medp_clip` / `medp_clip_image` answer (within 1e-4), through the real tritonserver
over gRPC; bad tokens and transforms are INVALID_ARGUMENT and the server keeps serving."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

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
from tritonclient.utils import InferenceServerException

from medpclip import reference
from medpclip_core import tensors as T
from medpclip_core.errors import InputError
from medpclip_core.imaging import Transform
from medpclip_core.inputs import prepare_prompt

LABELS = PARITY_LABELS
H, W = PROMPT_H, PROMPT_W
ATOL = 1e-4
PROMPTS = PROMPT_FORMS
_infer = infer_outputs
WIRE_LABELS = np.array([s.encode() for s in LABELS], dtype=object)


def _compare(got: dict, want: dict, names=None) -> None:
    for name in names or want:
        g, w = got[name], want[name]
        assert g is not None and g.shape == w.shape and g.dtype == w.dtype, name
        if name == "REGION_MASK":
            # binary: equal except where a logit sits within float noise of the threshold
            assert np.mean(g != w) < 1e-3, name
        else:
            assert np.abs(g - w).max() <= ATOL, (name, float(np.abs(g - w).max()))


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return sample_image(H, W)


@pytest.fixture(scope="module")
def encoded(grpc, image) -> dict[str, np.ndarray]:
    return _infer(grpc, "medp_clip_encode", IMAGE=image_bytes(image))


def test_encode_returns_the_declared_tokens_and_transform(encoded, model):
    dims = model.cfg.dims
    tokens, transform = encoded["IMAGE_TOKENS"], encoded["TRANSFORM"]
    assert tokens.shape == (dims.K, dims.W) == (1 + dims.P, model.cfg.vision.width)
    assert tokens.dtype == np.dtype(T.TOKENS_DTYPE) == np.float32
    assert transform.dtype == np.float32 and transform.shape == (5,)
    t = Transform(dims.S / max(H, W), H, W, dims.S)
    np.testing.assert_array_equal(transform, t.as_array())
    # the documented wire size per prompt: tokens + transform
    assert tokens.nbytes + transform.nbytes == dims.K * dims.W * 4 + 20


def test_encode_matches_pytorch(encoded, model, image):
    want = reference.encode(model, image_bytes(image)[0])
    np.testing.assert_array_equal(encoded["TRANSFORM"], want["TRANSFORM"])
    assert np.abs(encoded["IMAGE_TOKENS"] - want["IMAGE_TOKENS"]).max() <= ATOL


@pytest.mark.parametrize("labels", [True, False], ids=["labels", "no_labels"])
@pytest.mark.parametrize("form", list(PROMPTS))
def test_prompt_on_encoded_tokens_equals_the_full_call(grpc, encoded, image, form, labels):
    prompt = PROMPTS[form]
    full, prompted = ("medp_clip", "medp_clip_prompt")
    if not labels:
        full, prompted = ("medp_clip_image", "medp_clip_prompt_image")
    text = {"LABELS": WIRE_LABELS} if labels else {}
    want = _infer(grpc, full, IMAGE=image_bytes(image), **text, **prompt)
    got = _infer(grpc, prompted, **encoded, **text, **prompt)
    assert set(got) == set(want) == {t.name for t in T.spec(full).outputs}
    _compare(got, want)
    if labels:
        assert got["REGION_PROBS"].sum() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("form", ["points_with_background", "mask", "none"])
def test_prompt_matches_the_pytorch_reference(grpc, encoded, model, checkpoint, image, form):
    prompt = PROMPTS[form]
    got = _infer(grpc, "medp_clip_prompt", **encoded, LABELS=WIRE_LABELS, **prompt)
    kwargs = {
        "points": prompt.get("POINTS"),
        "point_labels": prompt.get("POINT_LABELS"),
        "box": prompt.get("BOX"),
        "mask": prompt.get("MASK"),
        "labels": LABELS,
    }
    tok = checkpoint / "tokenizer.json"
    enc = reference.encode(model, image)
    split = reference.run_prompt(model, enc["IMAGE_TOKENS"], enc["TRANSFORM"], tok, **kwargs)
    whole = reference.run(model, image, tok, **kwargs)
    _compare(split, whole)  # the split model is the model, in PyTorch too
    _compare(got, split)


def test_many_prompts_on_one_encode_concurrently(grpc, encoded, image):
    """Prompts of one encoded image that meet in the dynamic batcher (different point counts,
    masks, none) each get their own answer."""
    forms = list(PROMPTS) * 2
    with ThreadPoolExecutor(6) as pool:
        got = list(
            pool.map(
                lambda f: _infer(grpc, "medp_clip_prompt_image", **encoded, **PROMPTS[f]), forms
            )
        )
    want = {
        f: _infer(grpc, "medp_clip_image", IMAGE=image_bytes(image), **PROMPTS[f]) for f in PROMPTS
    }
    for form, answer in zip(forms, got, strict=True):
        _compare(answer, want[form])
    region = {f: want[f]["REGION_EMBEDDING"] for f in PROMPTS}
    assert np.abs(region["point"] - region["mask"]).max() > 1e-3  # prompts do differ


def test_pixels_with_window_encode_as_the_full_call(grpc):
    hu = (sample_image(H, W).astype(np.float32) * 8 - 1000)[..., None]
    window = np.array([40.0, 400.0], np.float32)
    enc = _infer(grpc, "medp_clip_encode", PIXELS=hu, WINDOW=window)
    want = _infer(grpc, "medp_clip_image", PIXELS=hu, WINDOW=window, **PROMPTS["box"])
    _compare(_infer(grpc, "medp_clip_prompt_image", **enc, **PROMPTS["box"]), want)


# --- bad tokens and transforms --------------------------------------------------------------


def _base_transform() -> np.ndarray:
    """The transform a base-size model (S = 224) gives the same image."""
    return Transform(224 / max(H, W), H, W, 224).as_array()


def _transform(**changes) -> np.ndarray:
    a = Transform(96 / max(H, W), H, W, 96).as_array()
    for i, k in enumerate(("scale", "pad_x", "pad_y", "height", "width")):
        if k in changes:
            a[i] = changes[k]
    return a


# case -> (IMAGE_TOKENS change, TRANSFORM change, a part of the message)
BAD = {
    "tokens_wrong_shape": (lambda t: t[:-1], None, "unexpected shape for input 'IMAGE_TOKENS'"),
    "tokens_of_another_width": (lambda t: t[:, :-1], None, "unexpected shape"),
    "tokens_nan": (lambda t: np.where(np.arange(t.shape[1]) == 3, np.nan, t).astype(t.dtype),
                   None, "IMAGE_TOKENS contains NaN or infinite values"),
    "tokens_inf": (lambda t: np.full_like(t, np.inf), None, "IMAGE_TOKENS contains NaN"),
    "transform_nan": (None, lambda a: _transform(scale=np.nan), "TRANSFORM contains NaN"),
    "transform_of_another_model_size": (None, lambda a: _base_transform(),
                                        "TRANSFORM does not belong to this model"),
    "transform_altered_scale": (None, lambda a: _transform(scale=0.5),
                                "TRANSFORM does not belong to this model"),
    "transform_negative_scale": (None, lambda a: _transform(scale=-0.48),
                                 "TRANSFORM scale must be positive"),
    "transform_padding": (None, lambda a: _transform(pad_x=3.0), "TRANSFORM padding must be 0"),
    "transform_fractional_height": (None, lambda a: _transform(height=120.5),
                                    "whole numbers >= 1"),
    "transform_zero_width": (None, lambda a: _transform(width=0.0), "whole numbers >= 1"),
    "transform_huge_image": (None, lambda a: _transform(height=9000.0, scale=96 / 9000),
                             "larger than this server accepts (8192"),
    "transform_wrong_length": (None, lambda a: a[:4], "unexpected shape for input 'TRANSFORM'"),
}  # fmt: skip


@pytest.mark.parametrize("labels", [True, False], ids=["prompt", "prompt_image"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_tokens_or_transform_are_invalid_argument(grpc, encoded, image, case, labels):
    change_tokens, change_transform, message = BAD[case]
    tokens, transform = encoded["IMAGE_TOKENS"].copy(), encoded["TRANSFORM"].copy()
    if change_tokens:
        tokens = change_tokens(tokens)
    if change_transform:
        transform = change_transform(transform)
    name = "medp_clip_prompt" if labels else "medp_clip_prompt_image"
    text = {"LABELS": WIRE_LABELS} if labels else {}
    with pytest.raises(InferenceServerException) as err:
        _infer(grpc, name, IMAGE_TOKENS=tokens, TRANSFORM=transform, **text, **PROMPTS["point"])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT", err.value.message()
    msg = err.value.message()
    assert message in msg, msg
    for value in ("0.48", "1.12", "120.5", "9000"):  # never echoes a scale or size sent
        assert value not in msg, (value, msg)
    # and the server still answers a good request
    good = _infer(grpc, name, **encoded, **text, **PROMPTS["point"])
    assert np.isfinite(good["REGION_EMBEDDING"]).all()


def test_wrong_token_dtype_and_missing_inputs_are_invalid_argument(grpc, encoded):
    import tritonclient.grpc as grpcclient

    def infer(tokens: np.ndarray | None, wire: str = "FP32", transform: bool = True):
        inputs = []
        if tokens is not None:
            inp = grpcclient.InferInput("IMAGE_TOKENS", list(tokens.shape), wire)
            inp.set_data_from_numpy(tokens)
            inputs.append(inp)
        if transform:
            inputs += make_inputs("medp_clip_prompt_image", TRANSFORM=encoded["TRANSFORM"])
        return grpc.infer("medp_clip_prompt_image", inputs)

    for args, message in (
        ((encoded["IMAGE_TOKENS"].astype(np.float16), "FP16"), "expects 'FP32'"),
        ((None,), "IMAGE_TOKENS"),
        ((encoded["IMAGE_TOKENS"], "FP32", False), "TRANSFORM"),
    ):
        with pytest.raises(InferenceServerException) as err:
            infer(*args)
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT", err.value.message()
        assert message in err.value.message()
    assert infer(encoded["IMAGE_TOKENS"]).as_numpy("IOU").shape == (1,)


def test_prompts_are_checked_against_the_encoded_image(grpc, encoded):
    """A point outside the encoded image, a mask of another size: as medp_clip refuses them."""
    for prompt, message in (
        ({"POINTS": np.array([[W + 5.0, 10.0]], np.float32)}, "outside the 200x120 image"),
        ({"MASK": np.ones((H, W + 1), np.uint8)}, "send a mask of the image's size"),
        ({"POINT_LABELS": np.array([1], np.int32)}, "POINT_LABELS given without POINTS"),
    ):
        with pytest.raises(InferenceServerException) as err:
            _infer(grpc, "medp_clip_prompt", **encoded, LABELS=WIRE_LABELS, **prompt)
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert message in err.value.message()


def test_prepare_prompt_checks_before_mapping(model):
    """The one check sequence (server's prompt_preprocess, reference.run_prompt), without a
    server: the canonical transform comes back, bad ones raise InputError."""
    dims = model.cfg.dims
    tokens = np.zeros((dims.K, dims.W), np.float32)
    good = _transform()
    x = prepare_prompt(tokens, good, dims.S, dims.M, (dims.K, dims.W), points=[[50.0, 40.0]])
    assert x.transform == Transform(dims.S / max(H, W), H, W, dims.S)
    assert x.arrays()["image_tokens"].shape == (1, dims.K, dims.W)
    assert "input_ids" not in x.arrays()
    for bad_tokens, bad_transform in (
        (tokens.astype(np.float16), good),
        (tokens[None], good),
        (tokens, good.astype(np.float64)),
        (tokens, _base_transform()),
        (tokens, good[:4]),
    ):
        with pytest.raises(InputError):
            prepare_prompt(bad_tokens, bad_transform, dims.S, dims.M, (dims.K, dims.W))


def test_bad_and_good_calls_in_flight_together(grpc, encoded, image):
    """Bad encodes and prompts among good ones, concurrently: each bad one INVALID_ARGUMENT,
    each good one its answer, and nothing wedges."""
    want = _infer(grpc, "medp_clip_prompt_image", **encoded, **PROMPTS["box"])
    nan_tokens = np.full_like(encoded["IMAGE_TOKENS"], np.nan)
    calls = [
        ("medp_clip_prompt_image", {**encoded, **PROMPTS["box"]}, None),
        ("medp_clip_prompt_image", {"IMAGE_TOKENS": nan_tokens, "TRANSFORM": encoded["TRANSFORM"]},
         "IMAGE_TOKENS contains NaN"),
        ("medp_clip_prompt", {"IMAGE_TOKENS": encoded["IMAGE_TOKENS"],
                              "TRANSFORM": _base_transform(), "LABELS": WIRE_LABELS},
         "TRANSFORM does not belong to this model"),
        ("medp_clip_encode", {"IMAGE": np.array([b""], dtype=object)}, "IMAGE is empty"),
        ("medp_clip_encode", {"IMAGE": image_bytes(image)}, None),
    ] * 6  # fmt: skip

    def one(call):
        name, arrays, message = call
        try:
            return name, _infer(grpc, name, **arrays), message
        except InferenceServerException as exc:
            return name, exc, message

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, calls))
    for name, got, message in results:
        if message is None:
            assert isinstance(got, dict), (name, got)
            if name == "medp_clip_encode":
                np.testing.assert_array_equal(got["TRANSFORM"], encoded["TRANSFORM"])
                assert np.abs(got["IMAGE_TOKENS"] - encoded["IMAGE_TOKENS"]).max() <= ATOL
            else:
                _compare(got, want)
        else:
            assert isinstance(got, InferenceServerException), (name, message)
            assert got.status() == "StatusCode.INVALID_ARGUMENT" and message in got.message()
