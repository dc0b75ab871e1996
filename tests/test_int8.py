"""The CPU INT8 flavour on CPUs without VNNI, and its start-up canary where it is served.

ONNX Runtime's u8 x s8 kernels sum pairs of products in saturating 16 bits on x86 CPUs without
VNNI (SSE, AVX2, AVX-512 without VNNI). These tests run the same ONNX Runtime under
`qemu-x86_64 -cpu Haswell` (AVX2, no VNNI; Debian's qemu-user, installed by scripts/setup.sh),
so that an export made on a VNNI machine is checked where it would drift.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import sample_image
from onnx import TensorProto, helper

from medpclip import export
from medpclip.onnx_export import INT8_MODELS, INT8_SETTINGS, quantize_int8
from medpclip_client import MedPClipClient, Region
from medpclip_core.agreement import CANARY_FILE, MIN_COSINE
from medpclip_tools.serve import ServeProcess

HERE = Path(__file__).parent
LABELS = ["a round hyperdense nodule", "a dark cyst"]
QEMU = shutil.which("qemu-x86_64")
needs_qemu = pytest.mark.skipif(
    QEMU is None, reason="qemu-x86_64 (Debian qemu-user, scripts/setup.sh) is not installed"
)


def emulated(*args: str, timeout: float = 240) -> dict:
    """tests/int8_emulated.py on an emulated AVX2 CPU without VNNI."""
    run = subprocess.run(
        [QEMU, "-cpu", "Haswell", sys.executable, str(HERE / "int8_emulated.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=HERE.parent,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@needs_qemu
def test_emulated_cpu_has_avx2_without_vnni():
    got = emulated("isa")
    assert got == {"isa": "AVX2, no VNNI", "vnni": False}


def _saturating_matmul(folder: Path) -> None:
    """y = x @ W with positive activations and weights equal in adjacent rows (the pairs the
    AVX2 kernel sums in 16 bits): where a column's weights are large, a pair's sum exceeds 2^15
    (255 * 127 * 2) unless the weights have 7 bits. Columns saturate by different amounts, so
    the direction of y changes, not only its scale."""
    rng = np.random.default_rng(0)
    k, n = 64, 32
    w = np.repeat(rng.uniform(-1, 1, (k // 2, n)), 2, axis=0)
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph(
        [node],
        "saturation",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", n])],
        [helper.make_tensor("w", TensorProto.FLOAT, (k, n), w.astype(np.float32).ravel())],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, folder / "fp32.onnx")
    np.save(folder / "x.npy", rng.uniform(0.5, 1.0, (8, k)).astype(np.float32))


@needs_qemu
def test_int8_settings_hold_where_vnni_is_missing(tmp_path):
    """Our settings agree on AVX2 without VNNI; the plain setting (8-bit weights), the control
    that shows the check can fail, does not."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _saturating_matmul(tmp_path)
    shutil.copy(quantize_int8(tmp_path / "fp32.onnx", log=lambda _: None), tmp_path / "ours.onnx")
    quantize_dynamic(
        str(tmp_path / "fp32.onnx"), str(tmp_path / "plain.onnx"), weight_type=QuantType.QInt8
    )
    assert INT8_SETTINGS["reduce_range"] is True
    got = emulated("saturation", str(tmp_path))
    assert got["plain"] < MIN_COSINE, got  # saturation is real on this CPU
    assert got["ours"] >= 0.999, got


@pytest.fixture(scope="module")
def int8_export(checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("int8")
    export.export(checkpoint=checkpoint, out=out, skip_parity=True, int8=True)
    return out / "model_repository"


def test_every_int8_model_ships_a_canary(int8_export):
    for name in INT8_MODELS:
        data = np.load(int8_export / name / "1" / CANARY_FILE)
        assert any(k.startswith("in/") for k in data.files), name
        assert any(k.startswith("out/") for k in data.files), name


@needs_qemu
def test_canaries_pass_on_an_avx2_cpu_without_vnni(int8_export):
    got = emulated("canaries", str(int8_export))
    assert set(got) == set(INT8_MODELS)
    for name, outputs in got.items():
        for output, (kind, value, ok) in outputs.items():
            assert ok, (name, output, kind, value)


def test_int8_answers_do_not_depend_on_their_batch_neighbours(int8_export, tmp_path):
    """Dynamic quantisation scales activations over the whole batch, so batched int8 requests
    would answer differently with different neighbours; each must get its answer alone."""
    images = [sample_image(seed=s) for s in range(4)]
    region = Region(points=[(60.0, 50.0)])
    with ServeProcess(int8_export, log_file=tmp_path / "serve.log") as server:
        client = MedPClipClient(server.grpc_url)
        alone = [client.infer(im, region, labels=LABELS) for im in images]
        with ThreadPoolExecutor(8) as pool:  # 8 at a time: the encoders batch them
            together = list(
                pool.map(lambda i: (i, client.infer(images[i % 4], region, labels=LABELS)),
                         range(48))
            )  # fmt: skip
    for i, r in together:
        a = alone[i % 4]
        assert np.array_equal(r.region_embedding, a.region_embedding), i
        assert np.array_equal(r.region_probs, a.region_probs), i


def test_server_refuses_an_int8_model_that_drifts_on_its_cpu(int8_export, tmp_path):
    """A canary whose fp32 answers the int8 model cannot reproduce (as on a CPU whose kernels
    saturate) keeps the server from starting, with a message naming the model, the CPU's
    instruction sets and what to do; the untouched repository serves."""
    with ServeProcess(int8_export, log_file=tmp_path / "good.log") as server:
        assert server.ready()
    bad = tmp_path / "repository"
    shutil.copytree(int8_export, bad)
    canary = bad / "mask_decoder" / "1" / CANARY_FILE
    arrays = dict(np.load(canary))
    arrays["out/mask_logits"] = -arrays["out/mask_logits"]
    np.savez(canary, **arrays)
    with pytest.raises(RuntimeError, match="exited with code 1"):
        ServeProcess(bad, log_file=tmp_path / "bad.log").start()
    log = (tmp_path / "bad.log").read_text()
    assert "mask_decoder: the int8 model disagrees with its fp32 original on this CPU" in log
    assert "VNNI" in log or "AVX" in log
    assert "export without --int8" in log
