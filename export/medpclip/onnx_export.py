"""ONNX export of the served encoders, with caching and ONNX Runtime parity checks.

Each `Exportable` fixes one model's export interface (SAM's utils/onnx.py, TensorRT demo's model
classes): the module to trace, its inputs and outputs taken from the tensor declaration in
`medpclip_core.tensors`, and sample inputs. Names, dtypes and dynamic axes are never restated.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from medpclip_core import tensors as T

from .config import ModelConfig
from .model import MedPClip

OPSET = 17
PARITY_ATOL = 1e-4
_MODELING_SOURCES = sorted((Path(__file__).parent / "modeling").glob("*.py")) + [
    Path(__file__).parent / "model.py"
]


@dataclass(frozen=True)
class Exportable:
    spec: T.ModelSpec
    module: Callable[[MedPClip], nn.Module]

    def sample_inputs(
        self, cfg: ModelConfig, batch: int = 2, seed: int = 0
    ) -> dict[str, np.ndarray]:
        """Random inputs of the declared shapes with valid value ranges: dynamic N = 3, and
        labels of the full context length Q = L (every position embedding in use)."""
        rng = np.random.default_rng(seed)
        dims = cfg.dims
        out: dict[str, np.ndarray] = {}
        for t in self.spec.inputs:
            shape = [batch] + [
                d if d > 0 else (dims.L if s == "Q" else 3)
                for d, s in zip(t.dims(dims), t.shape, strict=True)
            ]
            if t.name == "point_labels":
                out[t.name] = rng.integers(-1, 4, size=shape).astype(np.int32)
            elif t.name == "point_coords":
                out[t.name] = (rng.random(shape) * dims.S).astype(np.float32)
            elif t.name == "input_ids":
                ids = rng.integers(5, cfg.text.vocab_size, size=shape)
                ids[:, 0] = 2
                out[t.name] = ids.astype(np.int64)
            elif t.name == "attention_mask":
                m = np.ones(shape, dtype=np.int64)
                m[:, shape[1] // 2 :] = 0
                out[t.name] = m
            elif t.name in ("mask_input", "region_map"):
                out[t.name] = rng.random(shape).astype(np.float32)
            elif t.name == "has_mask":
                out[t.name] = (np.arange(batch) % 2).reshape(shape).astype(np.float32)
            else:
                out[t.name] = rng.standard_normal(shape).astype(t.dtype)
        return out

    def run_torch(self, model: MedPClip, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            args = [torch.from_numpy(inputs[t.name]) for t in self.spec.inputs]
            outs = self.module(model)(*args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        return {t.name: o.numpy() for t, o in zip(self.spec.outputs, outs, strict=True)}


class _TextEncoder(nn.Module):
    def __init__(self, m: MedPClip) -> None:
        super().__init__()
        self.m = m

    def forward(self, input_ids, attention_mask):
        return self.m.text_encoder(input_ids, attention_mask)


_TOKENS_DTYPE = getattr(torch, T.TOKENS_DTYPE)


class _ImageTrunk(nn.Module):
    """The prompt-free blocks: pixel values -> trunk tokens in the declared wire dtype."""

    def __init__(self, m: MedPClip) -> None:
        super().__init__()
        self.m = m

    def forward(self, pixel_values):
        return self.m.image_encoder.forward_trunk(pixel_values).to(_TOKENS_DTYPE)


class _ImagePrompted(nn.Module):
    """The prompted blocks on trunk tokens (computed in fp32 whatever their wire dtype)."""

    def __init__(self, m: MedPClip) -> None:
        super().__init__()
        self.m = m

    def forward(self, image_tokens, dense_embeddings, region_map):
        tokens = image_tokens.to(torch.float32)
        return self.m.image_encoder.forward_prompted(tokens, dense_embeddings, region_map)


EXPORTABLES: dict[str, Exportable] = {
    "prompt_encoder": Exportable(T.PROMPT_ENCODER, lambda m: m.prompt_encoder),
    "image_encoder": Exportable(T.IMAGE_ENCODER, lambda m: m.image_encoder),
    "text_encoder": Exportable(T.TEXT_ENCODER, _TextEncoder),
    "mask_decoder": Exportable(T.MASK_DECODER, lambda m: m.mask_decoder),
    "image_trunk": Exportable(T.IMAGE_TRUNK, _ImageTrunk),
    "image_prompted": Exportable(T.IMAGE_PROMPTED, _ImagePrompted),
}


def cache_key(checkpoint: Path, spec: T.ModelSpec) -> str:
    """Changes when the weights, config, tensor declaration, model code or exporter change."""
    h = hashlib.sha256()
    for f in (checkpoint / "model.safetensors", checkpoint / "config.json", *_MODELING_SOURCES):
        h.update(f.read_bytes())
    h.update(repr(spec).encode())
    h.update(f"{torch.__version__} {onnx.__version__} opset{OPSET}".encode())
    return h.hexdigest()


def export_onnx(model: MedPClip, name: str, path: Path, key: str, log=print) -> bool:
    """Export one model to `path` unless an export with the same key is there. True if exported."""
    meta = path.with_suffix(".json")
    if path.is_file() and meta.is_file() and json.loads(meta.read_text()).get("key") == key:
        log(f"  {name}: up to date ({path.name}), reusing")
        return False
    ex = EXPORTABLES[name]
    spec = ex.spec
    sample = ex.sample_inputs(model.cfg)
    dynamic_axes = {
        t.name: t.dynamic_axes(batched=spec.max_batch_size > 0) for t in spec.inputs + spec.outputs
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".onnx.partial")
    start = time.perf_counter()
    log(f"  {name}: exporting to ONNX (opset {OPSET}) ...")
    # The TorchScript exporter is deprecated but gives the plain, stable graphs TensorRT and
    # ONNX Runtime handle best for these models; its deprecation notices are noise here.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            ex.module(model),
            tuple(torch.from_numpy(sample[t.name]) for t in spec.inputs),
            str(tmp),
            input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs],
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            dynamo=False,
        )
    onnx.checker.check_model(str(tmp), full_check=True)
    tmp.replace(path)  # atomic: an interrupted export never looks finished
    meta.write_text(json.dumps({"key": key, "model": name, "opset": OPSET}, indent=2) + "\n")
    log(
        f"  {name}: done in {time.perf_counter() - start:.1f} s, checker clean, "
        f"{path.stat().st_size / 1e6:.1f} MB"
    )
    return True


def ort_session(path: Path, threads: int = 0):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def parity(
    model: MedPClip, name: str, path: Path, inputs: dict[str, np.ndarray]
) -> dict[str, float]:
    """max |ONNX Runtime - PyTorch| per output on the given inputs."""
    ex = EXPORTABLES[name]
    expected = ex.run_torch(model, inputs)
    got = ort_session(path).run([t.name for t in ex.spec.outputs], inputs)
    return {
        t.name: float(np.abs(g - expected[t.name]).max())
        for t, g in zip(ex.spec.outputs, got, strict=True)
    }


# The CPU INT8 flavour: ONNX Runtime dynamic quantisation (int8 weights, activations quantised
# per call) of the encoders whose cost is in MatMul/Gemm. The prompt encoder is too small to
# gain and stays fp32.
INT8_MODELS = ("image_encoder", "text_encoder", "mask_decoder", "image_trunk", "image_prompted")


# ONNX Runtime dynamic quantisation, chosen to hold on every x86 CPU (measured on the base
# model, perf/README.md "INT8"): without VNNI (SSE, AVX2, AVX-512 without VNNI) MLAS sums u8 x s8
# products in pairs in saturating 16 bits, which clipped the base model to cosine 0.894 (mask
# decoder) on AVX2. 7-bit weights (`reduce_range`) keep every pair below 2^15: cosine >= 0.9998
# on AVX2 and on AVX-512 VNNI alike, at the same speed (the same kernels run). Per-channel scales
# alone did not help on AVX2 (0.975) and cost speed.
INT8_SETTINGS = {"weight_type": "QInt8", "reduce_range": True, "per_channel": False}


def quantize_int8(fp32: Path, log=print) -> Path:
    """`<name>.onnx` -> `<name>.int8.onnx` (cached on the fp32 file's hash and the settings)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = fp32.with_suffix(".int8.onnx")
    meta = out.with_suffix(".json")
    key = hashlib.sha256(fp32.read_bytes()).hexdigest()
    if out.is_file() and meta.is_file():
        old = json.loads(meta.read_text())
        if old.get("key") == key and old.get("settings") == INT8_SETTINGS:
            log(f"  {fp32.stem}: int8 up to date, reusing")
            return out
    start = time.perf_counter()
    settings = dict(INT8_SETTINGS, weight_type=QuantType[INT8_SETTINGS["weight_type"]])
    quantize_dynamic(str(fp32), str(out), op_types_to_quantize=["MatMul", "Gemm"], **settings)
    meta.write_text(json.dumps({"key": key, "from": fp32.name, "settings": INT8_SETTINGS}) + "\n")
    log(
        f"  {fp32.stem}: int8 in {time.perf_counter() - start:.1f} s, "
        f"{out.stat().st_size / 1e6:.1f} MB"
    )
    return out


def cosine_rows(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest cosine similarity between matching rows (batch items) of a and b."""
    a = a.reshape(a.shape[0], -1).astype(np.float64)
    b = b.reshape(b.shape[0], -1).astype(np.float64)
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.min(np.where(den > 0, num / np.maximum(den, 1e-30), 1.0)))
