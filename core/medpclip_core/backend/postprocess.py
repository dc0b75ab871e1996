"""Scores the candidate labels for the region and the whole image, and brings the mask back to
the original image size (undoing the letterbox)."""

import numpy as np
import triton_python_backend_utils as pb_utils

from medpclip_core import imaging
from medpclip_core.backend.common import optional_input, parameters, respond_each
from medpclip_core.scoring import label_probs


def _get(request, name):
    return optional_input(pb_utils, request, name)


class TritonPythonModel:
    def initialize(self, args):
        params = parameters(args)
        self.size = int(params["image_size"])
        self.logit_scale = float(params["logit_scale"])

    def execute(self, requests):
        return respond_each(pb_utils, requests, self._one, "postprocess")

    def _one(self, request):
        g = _get(request, "global_embedding")[0]
        r = _get(request, "region_embedding")[0]
        text = _get(request, "text_embedding")
        if text is None:
            text = np.zeros((0, g.shape[0]), dtype=np.float32)
        t = imaging.Transform.from_array(_get(request, "transform"), self.size)
        logits = _get(request, "mask_logits")[0]
        return [
            pb_utils.Tensor("REGION_PROBS", label_probs(r, text, self.logit_scale)),
            pb_utils.Tensor("IMAGE_PROBS", label_probs(g, text, self.logit_scale)),
            pb_utils.Tensor("GLOBAL_EMBEDDING", g),
            pb_utils.Tensor("REGION_EMBEDDING", r),
            pb_utils.Tensor("PATCH_FEATURES", _get(request, "patch_features")[0]),
            pb_utils.Tensor("REGION_MASK", imaging.mask_from_logits(logits, t)),
            pb_utils.Tensor("MASK_LOGITS", logits),
            pb_utils.Tensor("IOU", _get(request, "iou").reshape(1).astype(np.float32)),
        ]
