"""WordPiece tokenization of the candidate labels (`tokenizer.json` beside this file).

Serves the text-only ensemble; `medp_clip` tokenizes inside `preprocess` (see tensors.py).
"""

import json
import os

import triton_python_backend_utils as pb_utils

from medpclip_client.imaging import InputError
from medpclip_client.labels import load_tokenizer, tokenize


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"])["parameters"]
        path = os.path.join(args["model_repository"], args["model_version"], "tokenizer.json")
        self.tok = load_tokenizer(path, int(params["context_length"]["string_value"]))
        self.max_labels = int(params["max_labels"]["string_value"])

    def execute(self, requests):
        responses = []
        for request in requests:
            labels = pb_utils.get_input_tensor_by_name(request, "LABELS").as_numpy().reshape(-1)
            try:
                ids, mask = tokenize(self.tok, labels, self.max_labels)
                responses.append(
                    pb_utils.InferenceResponse(
                        [pb_utils.Tensor("input_ids", ids), pb_utils.Tensor("attention_mask", mask)]
                    )
                )
            except InputError as exc:
                responses.append(
                    pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
                    )
                )
        return responses
