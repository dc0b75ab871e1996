"""Decodes the image (PNG/JPEG, DICOM Part 10, or raw PIXELS), letterboxes it to the model's
input size and maps the region prompts with the same transform.

Bad input becomes INVALID_ARGUMENT with a message the caller can act on (truncated pixel data,
a transfer syntax no installed decoder supports, a label longer than the text context); nothing
about the patient (DICOM tags, pixel values) is logged.
"""

import triton_python_backend_utils as pb_utils

from medpclip_core.backend.common import (
    image_parameters,
    optional_input,
    respond_each,
    tokenizer_for,
)
from medpclip_core.errors import InputError
from medpclip_core.inputs import prepare


def _get(request, name):
    return optional_input(pb_utils, request, name)


class TritonPythonModel:
    def initialize(self, args):
        self.size, self.mask_side, self.max_side = image_parameters(args)
        # medp_clip tokenizes here so that every check happens before the ensemble branches
        self.tok, self.max_labels = tokenizer_for(args)

    def execute(self, requests):
        return respond_each(pb_utils, requests, self._one, "preprocess")

    def _one(self, request):
        image, pixels, window = (
            _get(request, "IMAGE"),
            _get(request, "PIXELS"),
            _get(request, "WINDOW"),
        )
        if (image is None) == (pixels is None):
            raise InputError("send exactly one of IMAGE (encoded file bytes) or PIXELS")
        win = None if window is None else tuple(float(v) for v in window.reshape(-1)[:2])
        if window is not None and window.size != 2:
            raise InputError(f"WINDOW must hold 2 values (centre, width), got {window.size}")
        if image is not None:
            if image.size != 1:
                raise InputError(f"IMAGE must hold one file, got {image.size}")
            image = bytes(image.reshape(-1)[0])
        labels = _get(request, "LABELS")
        inputs = prepare(
            pixels if image is None else image,
            self.size,
            self.mask_side,
            window=win,
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
