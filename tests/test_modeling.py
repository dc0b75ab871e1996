"""Unit tests of the PyTorch model: shapes, prompt semantics, checkpoints, tokenizer."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from medpclip.config import DEFAULT_CHECKPOINT, ModelConfig
from medpclip.model import CheckpointMismatch, build, load_checkpoint, save_checkpoint
from medpclip.modeling.common import MASKED, Attention
from medpclip.tokenizer import DEFAULT_TOKENIZER
from medpclip_core import tensors as T
from medpclip_core.labels import load_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "perf"))
from prompted_blocks import old_attention, old_block, old_forward_prompted  # noqa: E402

CFG = ModelConfig.load("tiny")
S, G, M, B = CFG.vision.image_size, CFG.vision.grid, 4 * CFG.vision.grid, 2


def no_prompt(b: int = B):
    return (
        torch.zeros(b, 1, 2),
        -torch.ones(b, 1, dtype=torch.int32),
        torch.zeros(b, 1, M, M),
        torch.zeros(b, 1),
    )


@pytest.fixture(scope="module")
def fresh():
    return build(CFG, seed=0)


def test_every_module_has_the_declared_shapes(fresh):
    dims = CFG.dims
    x = torch.randn(B, 3, S, S)
    coords, labels = torch.rand(B, 3, 2) * S, torch.tensor([[1, 0, -1], [2, 3, 1]]).int()
    mask, has = torch.rand(B, 1, M, M), torch.tensor([[0.0], [1.0]])
    out = fresh(x, coords, labels, mask, has)
    for spec in (T.PROMPT_ENCODER, T.IMAGE_ENCODER, T.MASK_DECODER):
        for t in spec.outputs:
            want = [B] + [3 if d < 0 else d for d in t.dims(dims)]
            assert list(out[t.name].shape) == want, t.name
    ids = torch.randint(0, 100, (5, dims.L))
    assert fresh.encode_text(ids, torch.ones_like(ids)).shape == (5, dims.D)
    # trunk/prompted seam: the trunk is prompt-independent by construction
    assert fresh.image_encoder.forward_trunk(x).shape == (B, 1 + dims.P, dims.W)


def test_embeddings_are_unit_length(fresh):
    out = fresh(torch.randn(B, 3, S, S), *no_prompt())
    for k in ("global_embedding", "region_embedding"):
        assert torch.allclose(out[k].norm(dim=-1), torch.ones(B), atol=1e-5)


def test_no_prompt_is_the_whole_image(fresh):
    x = torch.randn(1, 3, S, S)
    none = fresh(x, *no_prompt(1))
    assert torch.equal(none["region_map"], torch.ones(1, G * G))
    # a box over the whole input is the same region
    box = fresh(
        x,
        torch.tensor([[[0.0, 0.0], [S, S]]]),
        torch.tensor([[2, 3]]).int(),
        torch.zeros(1, 1, M, M),
        torch.zeros(1, 1),
    )
    assert box["region_map"].min() > 0.9
    # with no prompt the region token sees exactly what CLS sees; a fresh model's region
    # token starts as a copy of CLS, so both embeddings agree
    torch.testing.assert_close(
        none["region_embedding"], none["global_embedding"], atol=1e-5, rtol=0
    )


def test_zero_gates_keep_the_global_embedding_prompt_independent(fresh):
    assert torch.count_nonzero(fresh.image_encoder.gates) == 0
    x = torch.randn(1, 3, S, S)
    base = fresh(x, *no_prompt(1))
    pointed = fresh(
        x,
        torch.tensor([[[10.0, 20.0]]]),
        torch.tensor([[1]]).int(),
        torch.zeros(1, 1, M, M),
        torch.zeros(1, 1),
    )
    assert torch.equal(base["global_embedding"], pointed["global_embedding"])
    # ...while the region embedding does depend on the prompt
    assert (base["region_embedding"] - pointed["region_embedding"]).abs().max() > 1e-4
    # and once a gate opens, the prompt reaches the patch features
    with torch.no_grad():
        fresh.image_encoder.gates.fill_(1.0)
    try:
        opened = fresh(
            x,
            torch.tensor([[[10.0, 20.0]]]),
            torch.tensor([[1]]).int(),
            torch.zeros(1, 1, M, M),
            torch.zeros(1, 1),
        )
        assert (opened["global_embedding"] - base["global_embedding"]).abs().max() > 1e-5
    finally:
        with torch.no_grad():
            fresh.image_encoder.gates.zero_()


def test_region_map_follows_points_box_and_mask(fresh):
    pe = fresh.prompt_encoder
    p = CFG.vision.patch_size
    centre = torch.tensor([[[p * 2.5, p * 3.5]]])  # patch (row 3, col 2)
    _, _, region = pe(centre, torch.tensor([[1]]).int(), torch.zeros(1, 1, M, M), torch.zeros(1, 1))
    assert int(region[0].argmax()) == 3 * G + 2
    # a background point suppresses its neighbourhood
    _, _, bg = pe(centre, torch.tensor([[0]]).int(), torch.zeros(1, 1, M, M), torch.zeros(1, 1))
    assert bg[0, 3 * G + 2] < 0.05 and bg.max() == 1.0
    # a mask covering the top-left quarter
    m = torch.zeros(1, 1, M, M)
    m[..., : M // 2, : M // 2] = 1
    _, _, mr = pe(torch.zeros(1, 1, 2), -torch.ones(1, 1).int(), m, torch.ones(1, 1))
    grid = mr.reshape(G, G)
    assert grid[: G // 2, : G // 2].min() == 1 and grid[G // 2 :, :].max() == 0


def test_checkpoint_round_trip_and_mismatch(tmp_path, fresh):
    d = save_checkpoint(fresh, tmp_path / "ok", DEFAULT_TOKENIZER)
    loaded = load_checkpoint(d)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    # a config that disagrees with the weights names the first mismatching tensors
    bad = tmp_path / "bad"
    save_checkpoint(fresh, bad, DEFAULT_TOKENIZER)
    text = (bad / "config.json").read_text().replace('"width": 96', '"width": 48')
    (bad / "config.json").write_text(text)
    with pytest.raises(CheckpointMismatch, match=r"shape of image_encoder\..*checkpoint \(96"):
        load_checkpoint(bad)


def test_config_sizes_are_data():
    base = ModelConfig.load("base")
    assert (base.vision.image_size, base.vision.patch_size, base.vision.width) == (224, 16, 768)
    assert (base.text.width, base.text.layers, base.embed_dim) == (768, 12, 512)
    with pytest.raises(FileNotFoundError, match="bundled sizes: base, tiny"):
        ModelConfig.load("huge")


@pytest.mark.parametrize(
    "text",
    [
        "a round hyperdense nodule",
        "Spiculated mass, 12 mm (grade 2/5)",
        "ACL tear",
        "x",
    ],
)
def test_tokenizer_round_trips(text):
    tok = load_tokenizer(DEFAULT_TOKENIZER, CFG.text.context_length)
    enc = tok.encode(text)
    assert len(enc.ids) == CFG.text.context_length
    assert enc.ids[0] == tok.token_to_id("[CLS]") and tok.token_to_id("[UNK]") not in enc.ids
    decoded = tok.decode(enc.ids)
    assert decoded.replace(" ", "") == text.lower().replace(" ", "")
    assert max(enc.ids) < CFG.text.vocab_size


# --- the prompted blocks (issue 12): only the region token's attention row carries a bias ---


def _dense_bias_image_encoder(enc, pixel_values, dense, region_map):
    """The image encoder as it was (`perf/prompted_blocks.py` keeps that formulation for its
    "before" side): written-out attention, and every prompted block adding the dense bias to
    all scores."""
    x = enc.patch_embed(pixel_values).flatten(2).transpose(1, 2)
    x = enc.ln_pre(torch.cat([enc.cls_token.expand(x.shape[0], 1, -1), x], dim=1) + enc.pos_embed)
    for block in enc.blocks[: enc.trunk_depth]:
        x = old_block(block, x)
    return old_forward_prompted(enc, x, dense, region_map)


def _prompt_forms(cfg: ModelConfig, b: int = 2) -> dict[str, tuple]:
    s, m = cfg.vision.image_size, cfg.dims.M
    g = torch.Generator().manual_seed(1)
    mask = torch.zeros(b, 1, m, m)
    mask[..., m // 4 : m // 2, m // 3 :] = 1
    no_mask = (torch.zeros(b, 1, m, m), torch.zeros(b, 1))
    return {
        "none": (torch.zeros(b, 1, 2), -torch.ones(b, 1, dtype=torch.int32), *no_mask),
        "point": (torch.rand(b, 2, 2, generator=g) * s, torch.tensor([[1, 0]] * b).int(), *no_mask),
        "box": (
            torch.tensor([[[s * 0.2, s * 0.3], [s * 0.7, s * 0.8]]] * b),
            torch.tensor([[2, 3]] * b).int(),
            *no_mask,
        ),
        "mask": (torch.zeros(b, 1, 2), -torch.ones(b, 1).int(), mask, torch.ones(b, 1)),
    }


def test_region_token_attention_is_the_dense_bias_attention():
    torch.manual_seed(0)
    attn = Attention(32, 4)
    x = torch.randn(3, 10, 32)  # 9 tokens + the reader
    reader_bias = -4 * torch.rand(3, 9)
    bias = torch.zeros(3, 1, 10, 10)
    bias[:, :, :, 9] = MASKED  # nobody sees the reader...
    bias[:, 0, 9, :9] = reader_bias  # ...which reads the others with its bias
    with torch.no_grad():
        got = attn.with_reader(x, reader_bias)
        want = old_attention(attn, x, x, x, bias)
    assert (got - want).abs().max() <= 1e-6


@pytest.fixture(scope="module")
def base():
    return build(ModelConfig.load("base"), seed=0)


@pytest.mark.parametrize("which", ["default", "base"])
def test_prompted_blocks_equal_the_dense_bias_formula(which, request):
    """The restructured prompted blocks (plain attention for CLS and the patches, a one-query
    attention with the bias for the region token) compute what the dense bias did."""
    if which == "default":
        if not (DEFAULT_CHECKPOINT / "config.json").is_file():
            pytest.skip("no embedded default model")
        model = load_checkpoint(DEFAULT_CHECKPOINT)
        assert torch.count_nonzero(model.image_encoder.gates) > 0  # the dense path is on
    else:
        model = request.getfixturevalue("base")
    enc, cfg = model.image_encoder, model.cfg
    s = cfg.vision.image_size
    x = torch.randn(2, 3, s, s, generator=torch.Generator().manual_seed(2))
    worst = {}
    with torch.no_grad():
        tokens = enc.forward_trunk(x)
        for form, prompt in _prompt_forms(cfg).items():
            _, dense, region = model.prompt_encoder(*prompt)
            got = enc.forward_prompted(tokens, dense, region)
            want = _dense_bias_image_encoder(enc, x, dense, region)
            for name, g, w in zip(("global", "region", "patches"), got, want, strict=True):
                worst[f"{form} {name}"] = float((g - w).abs().max())
    assert max(worst.values()) <= 1e-5, worst


def _cosine(a, b):
    a, b = a.double().flatten(1), b.double().flatten(1)
    return float(torch.nn.functional.cosine_similarity(a, b).min())


def test_half_model_runs_end_to_end(fresh):
    """`model.half()` runs the image path (every prompt form, and the trunk/prompted split) and
    the text path on fp16 alone: nothing inside makes a float32 tensor."""
    half = copy.deepcopy(fresh).half()
    x = torch.randn(B, 3, S, S, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for form, prompt in _prompt_forms(CFG).items():
            want = fresh(x, *prompt)
            coords, labels, mask, has = prompt
            got = half(x.half(), coords.half(), labels, mask.half(), has.half())
            for name, t in got.items():
                assert t.dtype == torch.float16, (form, name)
                assert torch.isfinite(t).all(), (form, name)
            for name in ("global_embedding", "region_embedding", "patch_features"):
                assert _cosine(got[name], want[name]) > 0.999, (form, name)
            # float32 inputs are taken in the model's dtype
            again = half(x, *prompt)
            assert torch.equal(again["region_embedding"], got["region_embedding"]), form
        _, dense, region = half.prompt_encoder(
            *(t.half() if t.is_floating_point() else t for t in _prompt_forms(CFG)["point"])
        )
        split = half.image_encoder.forward_prompted(
            half.image_encoder.forward_trunk(x.half()), dense, region
        )
        assert all(t.dtype == torch.float16 for t in split)
        ids = torch.randint(5, CFG.text.vocab_size, (3, CFG.text.context_length))
        attention_mask = torch.ones_like(ids)
        attention_mask[:, 5:] = 0
        text = half.encode_text(ids, attention_mask)
        assert text.dtype == torch.float16 and torch.isfinite(text).all()
        assert _cosine(text, fresh.encode_text(ids, attention_mask)) > 0.999
