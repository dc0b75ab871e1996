"""Unit tests of the PyTorch model: shapes, prompt semantics, checkpoints, tokenizer."""

from __future__ import annotations

import pytest
import torch

from medpclip.config import ModelConfig
from medpclip.model import CheckpointMismatch, build, load_checkpoint, save_checkpoint
from medpclip.tokenizer import DEFAULT_TOKENIZER
from medpclip_core import tensors as T
from medpclip_core.labels import load_tokenizer

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
