"""WordPiece tokenization of the candidate labels (`tokenizer.json` beside this file).

Serves the text-only ensemble; `medp_clip` tokenizes inside `preprocess` (see tensors.py). Both
call `labels.tokenize`, which refuses a label longer than the context instead of cutting it.
"""

import triton_python_backend_utils as pb_utils

from medpclip_core.backend.common import respond_each, tokenizer_for
from medpclip_core.labels import tokenize


class TritonPythonModel:
    def initialize(self, args):
        self.tok, self.max_labels = tokenizer_for(args)

    def execute(self, requests):
        return respond_each(pb_utils, requests, self._one, "tokenizer")

    def _one(self, request):
        labels = pb_utils.get_input_tensor_by_name(request, "LABELS").as_numpy().reshape(-1)
        ids, mask = tokenize(self.tok, labels, self.max_labels)
        return [pb_utils.Tensor("input_ids", ids), pb_utils.Tensor("attention_mask", mask)]
