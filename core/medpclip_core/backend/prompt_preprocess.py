"""Checks an encoded image (IMAGE_TOKENS and TRANSFORM from `medp_clip_encode`), maps the region
prompts with its letterbox transform and tokenizes LABELS: the first step of `medp_clip_prompt`
and `medp_clip_prompt_image`, doing every check before the ensemble branches, as `preprocess`
does for `medp_clip`.

The tokens' shape and dtype are this model's config (generated from the declaration); tokens of
another model, a transform made for another input size, NaN or a wrong shape come back as
INVALID_ARGUMENT naming the rule, never the values sent.
"""

import json

import triton_python_backend_utils as pb_utils

from medpclip_core.backend.common import (
    image_parameters,
    optional_input,
    respond_each,
    tokenizer_for,
)
from medpclip_core.errors import InputError
from medpclip_core.inputs import prepare_prompt


def _get(request, name):
    return optional_input(pb_utils, request, name)


class TritonPythonModel:
    def initialize(self, args):
        self.size, self.mask_side, self.max_side = image_parameters(args)
        config = json.loads(args["model_config"])
        tokens = next(t for t in config["input"] if t["name"] == "IMAGE_TOKENS")
        self.tokens_shape = tuple(int(d) for d in tokens["dims"])
        self.tokens_dtype = pb_utils.triton_string_to_numpy(tokens["data_type"])
        self.tok, self.max_labels = tokenizer_for(args)

    def execute(self, requests):
        return respond_each(pb_utils, requests, self._one, "prompt_preprocess")

    def _one(self, request):
        tokens, transform = _get(request, "IMAGE_TOKENS"), _get(request, "TRANSFORM")
        if tokens is None or transform is None:  # required in the config; never reached
            raise InputError("send IMAGE_TOKENS and TRANSFORM as medp_clip_encode returned them")
        labels = _get(request, "LABELS")
        inputs = prepare_prompt(
            tokens,
            transform,
            self.size,
            self.mask_side,
            self.tokens_shape,
            tokens_dtype=self.tokens_dtype,
            points=_get(request, "POINTS"),
            point_labels=_get(request, "POINT_LABELS"),
            box=_get(request, "BOX"),
            mask=_get(request, "MASK"),
            labels=None if labels is None else labels.reshape(-1),
            tokenizer=self.tok,
            max_side=self.max_side,
            max_labels=self.max_labels,
        )
        return [pb_utils.Tensor(name, a) for name, a in inputs.arrays().items()]
