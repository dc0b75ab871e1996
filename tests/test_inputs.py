"""`medpclip_core.inputs.prepare` against the hand-made sequence it replaced, and the one
tokenizer loader: the context length comes from the model config, never from tokenizer.json."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from conftest import sample_image
from PIL import Image
from tokenizers import Tokenizer

from medpclip import reference
from medpclip.config import ModelConfig
from medpclip.export import DEFAULT_CHECKPOINT
from medpclip.model import build, save_checkpoint
from medpclip.real_inputs import sample_dicom, text_batch
from medpclip.tokenizer import DEFAULT_TOKENIZER, save_tokenizer
from medpclip_core import imaging
from medpclip_core import tensors as T
from medpclip_core.errors import InputError
from medpclip_core.inputs import prepare, stack
from medpclip_core.labels import context_length, load_tokenizer, tokenize

CFG = ModelConfig.load("tiny")
S, M, L = CFG.vision.image_size, CFG.dims.M, CFG.text.context_length
LABELS = ["a round hyperdense nodule", "a dark cyst"]
H, W = 120, 200
POINTS = np.array([[50.0, 40.0], [150.0, 80.0]], np.float32)
BOX = np.array([30.0, 20.0, 75.0, 62.0], np.float32)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _mask() -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    m[60:100, 130:170] = 1
    return m


def _by_hand(display: np.ndarray, **prompts) -> dict[str, np.ndarray]:
    """The sequence every caller used to write out: letterbox, map prompts."""
    pixels, t = imaging.letterbox(display, S)
    p = imaging.map_prompts(t, M, **prompts)
    return {
        "pixel_values": pixels[None],
        "point_coords": p.point_coords,
        "point_labels": p.point_labels,
        "mask_input": p.mask_input,
        "has_mask": p.has_mask,
        "transform": t.as_array(),
    }


def _assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert list(got) == list(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and np.array_equal(got[k], v), k


def _tokens_by_hand(labels: list[str], length: int) -> tuple[np.ndarray, np.ndarray]:
    tok = Tokenizer.from_file(str(DEFAULT_TOKENIZER))
    tok.enable_padding(length=length, pad_id=tok.token_to_id("[PAD]"))
    enc = tok.encode_batch(labels)
    return (
        np.array([e.ids for e in enc], np.int64),
        np.array([e.attention_mask for e in enc], np.int64),
    )


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(DEFAULT_TOKENIZER, L)


# --- prepare == decode -> letterbox -> map prompts -> tokenize ---------------------------------


def test_prepare_on_a_png_equals_the_hand_made_sequence(tok):
    img = sample_image(H, W)
    prompts = {"points": POINTS, "point_labels": np.array([1, 0]), "box": BOX, "mask": _mask()}
    x = prepare(_png(img), S, M, labels=LABELS, tokenizer=tok, **prompts)
    want = _by_hand(imaging.decode_image(_png(img)), **prompts)
    _assert_same({k: v for k, v in x.arrays().items() if k in want}, want)
    ids, attention = _tokens_by_hand(LABELS, L)  # padded to the context, then cut to a bucket
    n = T.TOKEN_BUCKET
    assert not attention[:, n:].any()
    assert np.array_equal(x.input_ids, ids[:, :n]) and np.array_equal(
        x.attention_mask, attention[:, :n]
    )
    assert x.input_ids.shape == (len(LABELS), n)


@pytest.mark.parametrize(
    "pixels, window",
    [
        (sample_image(H, W), None),  # display intensities, [H, W]
        (np.stack([sample_image(H, W, seed=s) for s in range(3)], -1), None),  # RGB
        ((sample_image(H, W).astype(np.float32) * 8 - 1000)[..., None], (40.0, 400.0)),  # HU
    ],
    ids=["grey", "rgb", "hu_window"],
)
def test_prepare_on_raw_pixels_equals_the_hand_made_sequence(pixels, window):
    x = prepare(pixels, S, M, window=window, box=BOX)
    assert x.input_ids is None and x.text_arrays() == {}
    want = _by_hand(imaging.pixels_to_image(pixels, window), box=BOX)
    _assert_same(x.arrays(), want)


def test_prepare_on_dicom_equals_the_hand_made_sequence():
    x = prepare(sample_dicom(), S, M, points=POINTS[:1] / 2)
    _assert_same(x.arrays(), _by_hand(imaging.decode_dicom(sample_dicom()), points=POINTS[:1] / 2))


def test_with_prompts_is_prepare_with_those_prompts():
    img = _png(sample_image(H, W))
    base = prepare(img, S, M)
    for prompts in ({"points": POINTS}, {"box": BOX}, {"mask": _mask()}, {}):
        _assert_same(base.with_prompts(**prompts).arrays(), prepare(img, S, M, **prompts).arrays())


def test_stack_pads_points_as_the_hand_made_batches_did():
    base = prepare(_png(sample_image(H, W)), S, M)
    a, b = base.with_prompts(points=POINTS, box=BOX), base.with_prompts(mask=_mask())
    got = stack([a, b])
    # what real_inputs and training built by hand: zeros and SAM's "no point" (-1) after
    n = a.prompts.point_coords.shape[1]
    coords = np.zeros((2, n, 2), np.float32)
    labels = -np.ones((2, n), np.int32)
    for i, p in enumerate((a.prompts, b.prompts)):
        k = p.point_coords.shape[1]
        coords[i, :k], labels[i, :k] = p.point_coords[0], p.point_labels[0]
    want = {
        "pixel_values": np.stack([a.pixel_values[0], b.pixel_values[0]]),
        "point_coords": coords,
        "point_labels": labels,
        "mask_input": np.concatenate([a.prompts.mask_input, b.prompts.mask_input]),
        "has_mask": np.concatenate([a.prompts.has_mask, b.prompts.has_mask]),
    }
    _assert_same(got, want)
    assert list(got) == list(a.image_arrays())
    with pytest.raises(InputError):
        stack([])


# --- one tokenizer loader, the context length from the model config ---------------------------


@pytest.mark.parametrize("which", ["bundled", "default_model"])
def test_saved_tokenizers_carry_no_fixed_context(which):
    path = DEFAULT_TOKENIZER if which == "bundled" else DEFAULT_CHECKPOINT / "tokenizer.json"
    if not path.is_file():
        pytest.skip("no embedded default model")
    saved = json.loads(path.read_text())
    assert saved["padding"] is None and saved["truncation"] is None
    plain = Tokenizer.from_file(str(path))
    assert plain.padding is None and plain.truncation is None
    # the same vocabulary as the bundled tokenizer the default model was trained with
    assert plain.get_vocab() == Tokenizer.from_file(str(DEFAULT_TOKENIZER)).get_vocab()


@pytest.mark.parametrize("size", ["tiny", "base"])
def test_load_tokenizer_takes_the_config_context_length(size):
    """The context (the longest label allowed) is the config's; a request's labels are cut to
    their longest, rounded up to a bucket."""
    length = ModelConfig.load(size).text.context_length
    t = load_tokenizer(DEFAULT_TOKENIZER, length)
    assert t.truncation is None and context_length(t) == length
    ids, attention = tokenize(t, LABELS)
    assert ids.shape == attention.shape == (len(LABELS), T.TOKEN_BUCKET)
    assert np.array_equal(ids, _tokens_by_hand(LABELS, length)[0][:, : T.TOKEN_BUCKET])
    assert text_batch(DEFAULT_TOKENIZER, length, LABELS)["input_ids"].shape == (2, T.TOKEN_BUCKET)
    longer = ["a spiculated mass with a dark cyst beside a round hyperdense nodule"]
    n = int(_tokens_by_hand(longer, length)[1].sum())
    assert n > T.TOKEN_BUCKET
    assert tokenize(t, longer)[0].shape[1] == min(length, -(-n // T.TOKEN_BUCKET) * T.TOKEN_BUCKET)


def test_load_tokenizer_needs_a_context_length():
    with pytest.raises(TypeError):
        load_tokenizer(DEFAULT_TOKENIZER)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="positive"):
        load_tokenizer(DEFAULT_TOKENIZER, 0)


def test_a_file_fixed_context_is_replaced_by_the_config(tmp_path):
    """A tokenizer.json from before (padding and truncation at 32) reads as the config says,
    and a checkpoint saved from it carries no fixed context any more."""
    old = Tokenizer.from_file(str(DEFAULT_TOKENIZER))
    old.enable_truncation(max_length=32)
    old.enable_padding(length=32, pad_id=0, pad_token="[PAD]")
    old.save(str(tmp_path / "old.json"))
    t = load_tokenizer(tmp_path / "old.json", 256)
    assert context_length(t) == 256 and tokenize(t, LABELS)[0].shape == (2, T.TOKEN_BUCKET)
    with pytest.raises(InputError, match="at most 8 tokens"):  # refused, not cut at 8
        tokenize(load_tokenizer(tmp_path / "old.json", 8), ["a round hyperdense nodule x y z"])
    ckpt = save_checkpoint(build(CFG), tmp_path / "ckpt", tmp_path / "old.json")
    saved = json.loads((ckpt / "tokenizer.json").read_text())
    assert saved["padding"] is None and saved["truncation"] is None
    assert (ckpt / "tokenizer.json").read_bytes() == DEFAULT_TOKENIZER.read_bytes()
    save_tokenizer(old, tmp_path / "again.json")
    assert old.padding is not None  # saving strips a copy, not the caller's tokenizer


def _label_of(tok, n: int) -> str:
    """A label of exactly `n` tokens, [CLS] and [SEP] included."""
    label = " ".join(["round"] * (n - 2))
    plain = Tokenizer.from_file(str(DEFAULT_TOKENIZER))
    assert len(plain.encode(label).ids) == n
    return label


def test_reference_and_text_batch_refuse_what_the_server_refuses(tmp_path, tok):
    model = build(CFG)
    over = _label_of(tok, L + 1)
    with pytest.raises(InputError) as server:  # what the preprocess and tokenizer models run
        tokenize(tok, ["a cyst", over])
    message = str(server.value)
    assert f"label 1 is {L + 1} tokens long" in message
    with pytest.raises(InputError) as ref:
        reference.run(model, _png(sample_image(H, W)), DEFAULT_TOKENIZER, labels=["a cyst", over])
    assert str(ref.value) == message
    with pytest.raises(InputError) as tb:
        text_batch(DEFAULT_TOKENIZER, L, ["a cyst", over])
    assert str(tb.value) == message
    # exactly the context length is read to its last token
    at = _label_of(tok, L)
    assert tokenize(tok, [at])[1].sum() == L
    out = reference.run(model, _png(sample_image(H, W)), DEFAULT_TOKENIZER, labels=[at, "a cyst"])
    assert out["REGION_PROBS"].shape == (2,) and out["REGION_PROBS"].dtype == np.float32
