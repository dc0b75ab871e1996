"""Importers (`medpclip.convert`) against the upstream libraries' own models.

Small BiomedCLIP-layout and SAM models are built with open_clip/timm/transformers and
segment-anything (`tests/upstream.py`, random seeded weights, no downloads), saved in the
upstream file layouts, converted with the command users run, and compared:
- image and text embeddings vs open_clip's encode_image / encode_text: max |diff| <= 1e-5 (fp32);
- whole-image zero-shot probabilities served by a real tritonserver (ONNX Runtime, gRPC) vs
  open_clip's softmax(logit_scale * cos): max |diff| <= 1e-4;
- prompt encoder and mask decoder vs segment-anything's: max |diff| <= 1e-5.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import upstream
from PIL import Image

from medpclip import export
from medpclip.convert.__main__ import main as convert_main
from medpclip.model import load_checkpoint
from medpclip.tokenizer import DEFAULT_TOKENIZER
from medpclip_client import MedPClipClient, Region
from medpclip_core.labels import load_tokenizer, tokenize
from medpclip_tools.serve import ServeProcess

EMBEDDING_TOL = 1e-5
PROBS_TOL = 1e-4
LABELS = ["a round hyperdense nodule", "a dark cyst", "Spiculated   mass!", "calcification"]
S, G = 224, 14  # ViT-Ti/16 at its default 224: a 14 x 14 patch grid


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return upstream.biomedclip_folder(tmp_path_factory.mktemp("biomedclip"), DEFAULT_TOKENIZER)


@pytest.fixture(scope="module")
def reference(src):
    return upstream.open_clip_reference(src)


@pytest.fixture(scope="module")
def sam(tmp_path_factory):
    model = upstream.sam_model(S, G, seed=3)
    path = tmp_path_factory.mktemp("sam") / "sam_vit_small.pth"
    torch.save(model.state_dict(), path)
    return model, path


@pytest.fixture(scope="module")
def converted(src, sam, tmp_path_factory) -> tuple[Path, str]:
    """BiomedCLIP + SAM, converted by the command (its printed report returned too)."""
    out = tmp_path_factory.mktemp("converted") / "ckpt"
    buf = io.StringIO()
    from contextlib import redirect_stdout

    with redirect_stdout(buf):
        assert convert_main(["biomedclip", str(src), "--sam", str(sam[1]), "--out", str(out)]) == 0
    return out, buf.getvalue()


@pytest.fixture(scope="module")
def ours(converted):
    return load_checkpoint(converted[0])


def no_prompt(b: int, mask_side: int) -> dict[str, torch.Tensor]:
    return {
        "point_coords": torch.zeros(b, 1, 2),
        "point_labels": -torch.ones(b, 1, dtype=torch.int32),
        "mask_input": torch.zeros(b, 1, mask_side, mask_side),
        "has_mask": torch.zeros(b, 1),
    }


def test_report_accounts_for_every_tensor(converted, src):
    out, printed = converted
    assert "BiomedCLIP -> MedP-CLIP:" in printed and "SAM -> MedP-CLIP:" in printed
    assert "initialised fresh" in printed and "region gates: zero" in printed
    assert "SAM's image encoder" in printed and "multimask outputs 1-3" in printed
    record = json.loads((out / "conversion.json").read_text())
    state = torch.load(src / "open_clip_pytorch_model.bin", weights_only=True)
    report = record["reports"]["biomedclip"]
    mapped_from = set()
    for origin in report["mapped"].values():
        mapped_from.add(origin)
    # every source tensor is named by a mapping or an ignore reason
    for key in state:
        assert key in report["ignored"] or any(key in o for o in mapped_from), key
    assert record["config"]["vision"]["pre_norm"] is False
    assert record["config"]["text"]["proj"] == "mlp"
    assert (
        list(record["sources"].values())[0]
        == __import__("hashlib")
        .sha256((src / "open_clip_pytorch_model.bin").read_bytes())
        .hexdigest()
    )


def test_image_embeddings_match_open_clip(ours, reference):
    ref, _ = reference
    torch.manual_seed(1)
    px = torch.randn(3, 3, S, S)
    with torch.no_grad():
        want = ref.encode_image(px, normalize=True)
        out = ours(px, **no_prompt(3, ours.cfg.dims.M))
    # with no prompt the region token reads what the class token reads: both are the CLIP's
    assert (out["global_embedding"] - want).abs().max().item() <= EMBEDDING_TOL
    assert (out["region_embedding"] - want).abs().max().item() <= EMBEDDING_TOL


def test_text_embeddings_and_tokens_match_open_clip(ours, reference, converted):
    ref, ref_tok = reference
    tok = load_tokenizer(converted[0] / "tokenizer.json", ours.cfg.text.context_length)
    ids, attention = tokenize(tok, LABELS)
    want_ids = ref_tok(LABELS)
    assert (want_ids[:, : ids.shape[1]].numpy() == ids).all()
    assert (want_ids[:, ids.shape[1] :] == 0).all()  # the rest is padding
    assert (ids[:, 1:] != tok.token_to_id("[UNK]")).all()  # real words, not unknowns
    with torch.no_grad():
        got = ours.encode_text(torch.from_numpy(ids), torch.from_numpy(attention))
        want = ref.encode_text(want_ids, normalize=True)
    assert (got - want).abs().max().item() <= EMBEDDING_TOL


def test_tokenizer_from_vocab_txt_alone(src, reference, tmp_path):
    """A folder with only BERT's vocab.txt (no tokenizer.json) tokenizes as open_clip does."""
    bare = tmp_path / "bare"
    shutil.copytree(src, bare)
    (bare / "tokenizer.json").unlink()
    assert _convert("biomedclip", str(bare), "--out", str(tmp_path / "ckpt")) == 0
    tok = load_tokenizer(tmp_path / "ckpt" / "tokenizer.json", upstream.CONTEXT)
    ids, _ = tokenize(tok, LABELS)
    assert (reference[1](LABELS)[:, : ids.shape[1]].numpy() == ids).all()


def test_prompt_encoder_and_mask_decoder_match_segment_anything(ours, sam):
    ref = sam[0]
    g = torch.Generator().manual_seed(0)
    m = ours.cfg.dims.M
    coords = torch.rand(2, 3, 2, generator=g) * S
    labels = torch.tensor([[1, 0, 1], [1, 1, 0]])
    box = torch.tensor([[20.0, 30.0, 120.0, 160.0], [0.0, 0.0, 223.0, 223.0]])
    mask = torch.randn(2, 1, m, m, generator=g)
    pad = (torch.zeros(2, 1, 2), -torch.ones(2, 1, dtype=torch.long))
    cases = {
        # SAM appends a padding point when there is no box; ours takes it as given
        "points": (
            dict(points=(coords, labels), boxes=None, masks=None),
            (torch.cat([coords, pad[0]], 1), torch.cat([labels, pad[1]], 1), None),
        ),
        "box + mask": (
            dict(points=None, boxes=box, masks=mask),
            (box.reshape(2, 2, 2), torch.tensor([[2, 3], [2, 3]]), mask),
        ),
    }
    image = torch.randn(1, ours.cfg.prompt.dim, G, G, generator=g)
    with torch.no_grad():
        for name, (theirs, (c, lab, msk)) in cases.items():
            want_sparse, want_dense = ref.prompt_encoder(**theirs)
            has = torch.ones(2, 1) if msk is not None else torch.zeros(2, 1)
            msk = msk if msk is not None else torch.zeros(2, 1, m, m)
            sparse, dense, _ = ours.prompt_encoder(c, lab, msk, has)
            assert (sparse - want_sparse).abs().max().item() <= EMBEDDING_TOL, name
            assert (dense - want_dense).abs().max().item() <= EMBEDDING_TOL, name
            want_masks, want_iou = ref.mask_decoder(
                image, ref.prompt_encoder.get_dense_pe(), want_sparse, want_dense, False
            )
            masks, iou = ours.mask_decoder.decode(
                image.flatten(2).transpose(1, 2).expand(2, -1, -1), sparse, dense
            )
            assert (masks - want_masks[:, 0]).abs().max().item() <= EMBEDDING_TOL, name
            assert (iou - want_iou).abs().max().item() <= EMBEDDING_TOL, name
            assert want_masks.abs().max() > 0.05  # not a comparison of zeros


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_converted_model_serves_zero_shot_like_open_clip(converted, reference, tmp_path_factory):
    """Export (with the export's own ONNX-vs-PyTorch parity), serve, and ask the real server."""
    ref, ref_tok = reference
    out = tmp_path_factory.mktemp("served")
    result = export.export(checkpoint=converted[0], out=out)
    rng = np.random.default_rng(5)
    # S x S RGB images: the letterbox is then the identity, as open_clip's resize + crop are
    images = [rng.integers(0, 256, (S, S, 3), dtype=np.uint8) for _ in range(2)]
    ramp = np.linspace(0, 255, S, dtype=np.float32)
    images.append(np.stack([np.add.outer(ramp, ramp) / 2] * 3, -1).astype(np.uint8))
    with ServeProcess(result.repository, log_file=out / "serve.log") as server:
        client = MedPClipClient(server.grpc_url)
        served = [client.infer(png(im), None, labels=LABELS) for im in images]
        pointed = client.infer(png(images[0]), Region(points=[(60.0, 80.0)]), labels=LABELS)
    pixels = torch.stack(
        [
            (
                torch.from_numpy(im).permute(2, 0, 1).float() / 255
                - torch.tensor(upstream.MEAN)[:, None, None]
            )
            / torch.tensor(upstream.STD)[:, None, None]
            for im in images
        ]
    )
    with torch.no_grad():
        img = ref.encode_image(pixels, normalize=True)
        txt = ref.encode_text(ref_tok(LABELS), normalize=True)
        want = (ref.logit_scale.exp() * img @ txt.T).softmax(-1).numpy()
    worst = max(
        np.abs(np.asarray(r.image_probs) - w).max() for r, w in zip(served, want, strict=True)
    )
    print(f"served zero-shot vs open_clip: max |diff| {worst:.2e} (limit {PROBS_TOL:g})")
    for got, w in zip(served, want, strict=True):
        assert np.abs(np.asarray(got.image_probs) - w).max() <= PROBS_TOL
        assert np.abs(np.asarray(got.region_probs) - w).max() <= PROBS_TOL  # no prompt
    assert want.max() - want.min() > 0.05  # the probabilities are not flat
    # the region path answers too (SAM's decoder through ONNX): a mask of the image's size
    assert pointed.mask is not None and pointed.mask.shape == (S, S)
    assert np.isfinite(pointed.region_probs).all()


def _convert(*args: str) -> int:
    return convert_main([*args])


def test_refuses_unknown_and_missing_tensors(src, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    state = torch.load(bad / "open_clip_pytorch_model.bin", weights_only=True)
    torch.save(
        {**state, "visual.trunk.fc_norm.weight": torch.ones(3)}, bad / "open_clip_pytorch_model.bin"
    )
    assert _convert("biomedclip", str(bad), "--out", str(tmp_path / "o1")) == 1
    assert "visual.trunk.fc_norm.weight" in capsys.readouterr().err
    del state["text.transformer.encoder.layer.1.output.dense.bias"]
    torch.save(state, bad / "open_clip_pytorch_model.bin")
    assert _convert("biomedclip", str(bad), "--out", str(tmp_path / "o2")) == 1
    assert "layer.1.output.dense.bias" in capsys.readouterr().err
    (bad / "open_clip_pytorch_model.bin").write_bytes(b"<html>404</html>")
    assert _convert("biomedclip", str(bad), "--out", str(tmp_path / "o3")) == 1
    assert "not a readable PyTorch checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o3").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c["preprocess_cfg"].update(mean=[0.5, 0.5, 0.5]), "preprocess_cfg mean"),
        (lambda c: c["model_cfg"]["vision_cfg"].update(timm_pool="avg"), "timm_pool"),
        (lambda c: c["model_cfg"]["text_cfg"].update(hf_pooler_type="mean_pooler"), "pooler"),
        (
            lambda c: c["model_cfg"]["vision_cfg"].update(timm_model_name="vit_odd_patch16_224"),
            "--vision-heads",
        ),
    ],
)
def test_refuses_configs_it_cannot_serve_faithfully(src, tmp_path, capsys, change, message):
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "open_clip_config.json").read_text())
    change(cfg)
    (bad / "open_clip_config.json").write_text(json.dumps(cfg))
    assert _convert("biomedclip", str(bad), "--out", str(tmp_path / "o")) == 1
    assert message in capsys.readouterr().err


def test_sam_into_existing_checkpoint_and_foreign_files(converted, sam, tmp_path, capsys):
    out = tmp_path / "again"
    assert _convert("sam", str(sam[1]), "--into", str(converted[0]), "--out", str(out)) == 0
    a, b = load_checkpoint(converted[0]).state_dict(), load_checkpoint(out).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a SAM file with a tensor the importer does not know (e.g. a SAM-HQ head) is refused
    state = torch.load(sam[1], weights_only=True)
    torch.save({**state, "mask_decoder.hf_token.weight": torch.ones(1, 32)}, tmp_path / "hq.pth")
    assert (
        _convert(
            "sam",
            str(tmp_path / "hq.pth"),
            "--into",
            str(converted[0]),
            "--out",
            str(tmp_path / "hq"),
        )
        == 1
    )
    assert "mask_decoder.hf_token.weight" in capsys.readouterr().err
    # the BiomedCLIP folder is not a SAM checkpoint
    assert (
        _convert(
            "sam",
            str(converted[0] / "model.safetensors"),
            "--into",
            str(converted[0]),
            "--out",
            str(tmp_path / "x"),
        )
        == 1
    )
    assert "not a SAM checkpoint" in capsys.readouterr().err
    # an occupied --out is left alone
    assert _convert("sam", str(sam[1]), "--into", str(converted[0]), "--out", str(out)) == 2


def test_without_sam_region_parts_take_the_base_config(src, tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert _convert("biomedclip", str(src), "--out", str(out)) == 0
    cfg = load_checkpoint(out).cfg
    assert cfg.prompt.dim == 256 and cfg.decoder.activation == "gelu"
    assert cfg.vision.prompt_blocks == 4 and cfg.text.context_length == upstream.CONTEXT
    printed = capsys.readouterr().out
    assert "mask decoder: not in a CLIP" in printed and "next: python -m medpclip.export" in printed
