"""The embedded default model, measured through the real server (issue 3's acceptance)."""

from __future__ import annotations

import pytest

from medpclip import export
from medpclip_client import MedPClipClient, Region
from medpclip_tools.evaluate import centre_point, evaluate
from medpclip_tools.phantoms import CANONICAL, phantoms, to_dicom
from medpclip_tools.serve import TritonServer

pytestmark = pytest.mark.skipif(
    not (export.DEFAULT_CHECKPOINT / "config.json").is_file(),
    reason="no embedded default model in export/medpclip/default_model",
)


@pytest.fixture(scope="module")
def default_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("default")
    export.export(checkpoint=export.DEFAULT_CHECKPOINT, out=out)
    return out


@pytest.fixture(scope="module")
def default_url(default_build):
    with TritonServer(default_build / "model_repository") as server:
        yield server.grpc_url


def test_default_checkpoint_is_small_and_documented():
    files = list(export.DEFAULT_CHECKPOINT.iterdir())
    assert sum(f.stat().st_size for f in files) <= 10 * 2**20
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= {
        f.name for f in files
    }


def test_held_out_phantoms_meet_the_targets(default_url):
    # a small fixed held-out set (seed 1000, never used in training)
    s = evaluate(default_url, images=16, seed=1000)
    for form in ("point", "box", "mask"):
        assert s[f"accuracy_{form}"] >= 0.9, s
    assert s["dice_point"] >= 0.8 and s["dice_box"] >= 0.8, s
    # without a prompt, "which finding" cannot be told apart: the prompt carries the answer
    assert s["accuracy_no_prompt"] <= 0.7, s


def test_pointing_at_each_finding_gives_its_own_label(default_url):
    p = phantoms(seed=2024, count=1)[0]  # the demo's slice
    data = to_dicom(p)
    with MedPClipClient(default_url) as client:
        answers = [
            client.infer(data, Region(points=[centre_point(f)]), labels=CANONICAL).top(1)[0][0]
            for f in p.findings
        ]
    assert answers == [f.label for f in p.findings]
    assert len(set(answers)) == len(answers)


def test_int8_flavour_agrees_with_fp32(default_build, tmp_path):
    """The CPU INT8 flavour: >= 98 % of zero-shot answers unchanged, embeddings cosine >= 0.99,
    and its repository serves the quantised encoders."""
    from medpclip.model import load_checkpoint
    from medpclip_tools.int8_agreement import agreement

    out = tmp_path / "int8"
    import shutil

    shutil.copytree(default_build / "onnx", out / "onnx")
    result = export.export(
        checkpoint=export.DEFAULT_CHECKPOINT, out=out, skip_parity=True, int8=True
    )
    assert result.int8_cosine is not None and result.int8_cosine >= export.INT8_MIN_COSINE
    model = load_checkpoint(export.DEFAULT_CHECKPOINT)
    a = agreement(model, out / "onnx", export.DEFAULT_CHECKPOINT / "tokenizer.json", images=12)
    assert a["agreement"] >= 0.98 and a["region_cosine_min"] >= 0.99, a
    served = out / "model_repository" / "image_encoder" / "1" / "model.onnx"
    assert served.read_bytes() == (out / "onnx" / "image_encoder.int8.onnx").read_bytes()
