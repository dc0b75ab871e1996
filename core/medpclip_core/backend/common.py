"""Small helpers shared by the server's python-backend models (run inside Triton's stub).

`pb_utils` (triton_python_backend_utils) exists only inside the stub, so it is passed in.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

from ..errors import InputError
from ..labels import load_tokenizer


def parameters(args: dict) -> dict[str, str]:
    """The `parameters` of the model's config.pbtxt as plain strings."""
    params = json.loads(args["model_config"]).get("parameters", {})
    return {k: v["string_value"] for k, v in params.items()}


def image_parameters(args: dict) -> tuple[int, int, int]:
    """(image_size, mask_side, max_image_side) from the model's parameters."""
    params = parameters(args)
    return int(params["image_size"]), int(params["mask_side"]), int(params["max_image_side"])


def version_file(args: dict, name: str) -> str:
    """Path of a file shipped in the model's version folder (model.onnx, tokenizer.json)."""
    return os.path.join(args["model_repository"], args["model_version"], name)


def tokenizer_for(args: dict):
    """(tokenizer, max_labels) from `tokenizer.json` beside the model and its parameters."""
    params = parameters(args)
    tok = load_tokenizer(version_file(args, "tokenizer.json"), int(params["context_length"]))
    return tok, int(params["max_labels"])


def optional_input(pb_utils, request, name: str):
    """The input as a numpy array, or None when the (optional) input was not sent."""
    t = pb_utils.get_input_tensor_by_name(request, name)
    return None if t is None else t.as_numpy()


def respond_each(pb_utils, requests, handle: Callable, step: str) -> list:
    """One response per request from `handle(request) -> [pb_utils.Tensor]`.

    InputError becomes INVALID_ARGUMENT with its message (written for the caller); anything else
    a generic error naming the step and the exception type, never request data (no PHI).
    """
    responses = []
    for request in requests:
        try:
            responses.append(pb_utils.InferenceResponse(handle(request)))
        except InputError as exc:
            err = pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
            responses.append(pb_utils.InferenceResponse(error=err))
        except Exception as exc:
            err = pb_utils.TritonError(f"{step} failed: {type(exc).__name__}")
            responses.append(pb_utils.InferenceResponse(error=err))
    return responses
