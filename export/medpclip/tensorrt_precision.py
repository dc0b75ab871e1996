"""Which layers an FP16 engine keeps in FP32: one decision, made on the ONNX graph, used by both
the TensorRT Python builder and the `.trtexec.sh` (`--layerPrecisions`/`--layerOutputTypes`).

The decision is per op, from what FP16 (10-bit mantissa, largest value 65504, normal values
down to 6.1e-5) does to it, and is checked on the exported graphs here, where no TensorRT runs
(tests/test_tensorrt_static.py). Measured parity on a GPU may move ops in or out; the README's
GPU section says what to measure.

Kept in FP32 (FP32_OPS):
- ReduceMean, ReduceSum, ReduceL2: sums over hundreds of values; squares summed overflow 65504.
- Pow: squaring a deviation beyond 256 overflows.
- Sqrt: of a variance; FP16 flushes or coarsens anything below 6.1e-5.
- Exp: overflows beyond 11.09.
- Softmax: normalises attention logits; kept as before until a GPU measures the fused FP16
  attention against it (pinning it may keep TensorRT from fusing attention).
And, following them (FOLLOW_OPS), an elementwise op whose every computed input comes from a layer
kept in FP32: in FP16 it would round an FP32 result only to feed the next FP32 layer. This is what
keeps LayerNorm2d's `var + eps` (ReduceMean -> Add -> Sqrt) and the prompt encoder's
`-d^2 / 2 sigma^2` (ReduceSum -> Neg -> Div -> Exp) in FP32.

Not kept in FP32:
- LayerNormalization: the ONNX parser makes it an INormalizationLayer whose compute precision
  it sets from the node's `stash_type` (1, float, by default), and that precision defaults to
  FP32 in any case (NvInfer.h, release/10.11, `INormalizationLayer::setComputePrecision`).
  Pinning the layer only adds FP16<->FP32 reformats around it. A node whose stash_type asks for
  less than float is kept in FP32.
- LayerNorm2d's Sub (x - mean) and Div (/ std): their x arrives in FP16 from the convolution
  before them, so FP32 here would not recover what that rounding lost; the variance chain above
  is where FP16 would lose more.
- Erf (GELU): bounded, with slope <= 1.13, so its FP16 error is that of its FP16 input.
- Any node whose data input is not floating point, e.g. the prompt encoder's ReduceSum over the
  int64 that `.any()` exports: an integer layer has no FP32 to be kept in, and trtexec sets an
  exactly named layer's precision without looking at its type (sampleEngines.cpp,
  setLayerPrecisions), which under `--precisionConstraints=obey` fails the build.

Layer names: TensorRT's ONNX parser names a node's main layer after the node (`node_of_<first
output>` for a node without a name; helper layers get other names), so the ONNX node names are
the layer names both paths pin.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import TensorProto

FP32_OPS = frozenset({"Softmax", "ReduceMean", "ReduceSum", "ReduceL2", "Pow", "Sqrt", "Exp"})
FOLLOW_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Neg", "Reciprocal", "Clip", "Max", "Min"})
# inputs the parser reads as parameters of the layer (constants), not as data it computes on
PARAMETER_INPUTS = {
    "ReduceMean": {1},
    "ReduceSum": {1},
    "ReduceL2": {1},
    "Clip": {1, 2},
}
FLOATS = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16})
# characters trtexec's --layerPrecisions parser splits on (sampleOptions.cpp: ',' between
# entries, quotes around names); a node named with them cannot be pinned by trtexec
TRTEXEC_UNSAFE = (",", "'")


@dataclass(frozen=True)
class Node:
    name: str  # the TensorRT layer name
    op: str
    why: str


@dataclass
class Selection:
    """The layers to keep in FP32, and the FP32-worthy nodes left alone, each with the reason."""

    pinned: list[Node] = field(default_factory=list)
    skipped: list[Node] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [n.name for n in self.pinned]

    def summary(self) -> str:
        ops = Counter(n.op for n in self.pinned)
        text = f"{len(self.pinned)} layers kept in FP32" + (
            f" ({', '.join(f'{op} {k}' for op, k in sorted(ops.items()))})" if ops else ""
        )
        if self.skipped:
            why = Counter(n.why for n in self.skipped)
            text += "; left alone: " + "; ".join(f"{k} x {w}" for w, k in sorted(why.items()))
        return text


def layer_name(node: onnx.NodeProto) -> str:
    """The name TensorRT's ONNX parser gives the node's layer (importerUtils.cpp, getNodeName)."""
    if not node.name and node.output:
        return "node_of_" + node.output[0]
    return node.name


def element_types(model: onnx.ModelProto) -> dict[str, int]:
    """Tensor name -> ONNX element type, from shape inference, initializers and Constants."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    g = inferred.graph
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in list(g.input) + list(g.value_info) + list(g.output)
        if v.type.HasField("tensor_type")
    }
    types.update({t.name: t.data_type for t in g.initializer})
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    types[n.output[0]] = a.t.data_type
    return {k: v for k, v in types.items() if v != TensorProto.UNDEFINED}


def select(model: onnx.ModelProto) -> Selection:
    types = element_types(model)
    constant = {t.name for t in model.graph.initializer} | {
        o for n in model.graph.node if n.op_type == "Constant" for o in n.output
    }
    names = Counter(layer_name(n) for n in model.graph.node)
    fp32_outputs: set[str] = set()
    out = Selection()
    for node in model.graph.node:  # ONNX nodes are topologically sorted
        data = [
            i
            for k, i in enumerate(node.input)
            if i and k not in PARAMETER_INPUTS.get(node.op_type, ())
        ]
        if node.op_type in FP32_OPS:
            why = "precision-sensitive op"
        elif node.op_type == "LayerNormalization" and _stash_type(node) not in (
            TensorProto.FLOAT,
            TensorProto.DOUBLE,
        ):
            why = "LayerNormalization with a low-precision stash_type"
        elif node.op_type in FOLLOW_OPS and _follows(data, constant, fp32_outputs):
            why = "fed only by FP32 layers"
        else:
            continue
        name = layer_name(node)
        unknown = [i for i in data if i not in types]
        if unknown:
            out.skipped.append(Node(name, node.op_type, "data type unknown to shape inference"))
        elif any(types[i] not in FLOATS for i in data):
            out.skipped.append(Node(name, node.op_type, "non-float data (integer layer)"))
        elif names[name] > 1:
            out.skipped.append(Node(name, node.op_type, "name shared by several nodes"))
        elif any(c in name for c in TRTEXEC_UNSAFE):
            out.skipped.append(Node(name, node.op_type, "name trtexec cannot parse"))
        else:
            out.pinned.append(Node(name, node.op_type, why))
            fp32_outputs.update(node.output)
    return out


def select_file(onnx_path: Path) -> Selection:
    # the graph is enough: initializers' types are in the proto without their external data
    return select(onnx.load(str(onnx_path), load_external_data=False))


def _follows(data: list[str], constant: set[str], fp32_outputs: set[str]) -> bool:
    computed = [i for i in data if i not in constant]
    return bool(computed) and all(i in fp32_outputs for i in computed)


def _stash_type(node: onnx.NodeProto) -> int:
    for a in node.attribute:
        if a.name == "stash_type":
            return a.i
    return TensorProto.FLOAT  # the ONNX default
