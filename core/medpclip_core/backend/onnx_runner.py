"""Runs one exported encoder (`model.onnx` beside this file) with ONNX Runtime on CPU.

The bundled Triton has no onnxruntime backend, so each encoder is a python-backend model. Names
and dtypes come from this model's config.pbtxt (generated from the tensor declarations).
Requests that arrive together (dynamic batching) and share input shapes run as one batch,
except for int8 models (below).

An int8 encoder (the CPU INT8 flavour) ships `int8_canary.npz`: real inputs and its fp32
original's outputs. It runs them when it loads and refuses to load when it disagrees with fp32
on this CPU (`medpclip_core.agreement`), because ONNX Runtime's int8 kernels differ by CPU (no
VNNI: saturating 16-bit sums) and a repository that agreed where it was exported can drift on
another node. Refusing, rather than falling back to fp32, keeps the mismatch visible: the model,
hence the server, is not ready and the log says why and what to do, instead of a node silently
answering at a different speed (capacity) or accuracy than the rest of its pool.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

from medpclip_core import cpu
from medpclip_core.agreement import CANARY_FILE, canary_checks
from medpclip_core.backend.common import parameters, version_file


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.inputs = [t["name"] for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]
        params = parameters(args)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(params.get("intra_op_threads", "0"))
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Each encoder runs in its own stub process, one after another in an ensemble: a pool
        # that spins after its run would take the cores from the next model's (measured on 2
        # cores, base: image_prompted 79 ms spinning, against 32 ms in a process alone).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            version_file(args, "model.onnx"), opts, providers=["CPUExecutionProvider"]
        )
        self.name = args["model_name"]
        canary = version_file(args, CANARY_FILE)
        # The export writes a canary beside every int8 model and only there. Dynamic
        # quantisation scales activations per call, over the whole batch, so an int8 answer
        # would depend on which other requests it was batched with (2e-3 in the default
        # model's embeddings): int8 requests run one per call, every answer reproducible.
        self.int8 = os.path.isfile(canary)
        if self.int8:
            self._check_canary(canary)

    def _check_canary(self, path: str) -> None:
        checks = canary_checks(path, self.session.run, self.outputs)
        failed = [c for c in checks if not c.ok]
        if failed:
            raise pb_utils.TritonModelException(
                f"{self.name}: the int8 model disagrees with its fp32 original on this CPU "
                f"({cpu.isa()}): {'; '.join(map(str, failed))}. Serve the fp32 repository here "
                "(export without --int8), or run the int8 one only on CPUs where its canary "
                "passes (see README, CPU INT8 flavour)"
            )
        pb_utils.Logger.log_info(
            f"{self.name}: int8 canary passed on this CPU ({cpu.isa()}): "
            + ", ".join(map(str, checks))
        )

    def execute(self, requests):
        arrays = [
            [pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in self.inputs]
            for r in requests
        ]
        groups = {}  # input shapes (without batch), or the request (int8) -> request indices
        for i, a in enumerate(arrays):
            groups.setdefault(i if self.int8 else tuple(x.shape[1:] for x in a), []).append(i)
        responses = [None] * len(requests)
        for indices in groups.values():
            feed = {
                n: np.concatenate([arrays[i][k] for i in indices])
                for k, n in enumerate(self.inputs)
            }
            try:
                results = self.session.run(self.outputs, feed)
            except Exception as exc:  # no request data in the message (no PHI)
                err = pb_utils.TritonError(
                    f"{self.name}: ONNX Runtime failed: {type(exc).__name__}"
                )
                for i in indices:
                    responses[i] = pb_utils.InferenceResponse(error=err)
                continue
            start = 0
            for i in indices:
                n = arrays[i][0].shape[0]
                responses[i] = pb_utils.InferenceResponse(
                    [
                        pb_utils.Tensor(name, r[start : start + n])
                        for name, r in zip(self.outputs, results, strict=True)
                    ]
                )
                start += n
        return responses
