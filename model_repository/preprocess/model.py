"""Decodes the image (PNG/JPEG, DICOM Part 10, or raw PIXELS), letterboxes it to the model's
input size and maps the region prompts with the same transform.

Bad input becomes INVALID_ARGUMENT with a message the caller can act on (truncated pixel data,
a transfer syntax no installed decoder supports, a label longer than the text context); nothing
about the patient (DICOM tags, pixel values) is logged.
"""

import triton_python_backend_utils as pb_utils

from medpclip_client import imaging
from medpclip_client.labels import tokenize
from medpclip_client.serving import optional_input, parameters, respond_each, tokenizer_for


def _get(request, name):
    return optional_input(pb_utils, request, name)


class TritonPythonModel:
    def initialize(self, args):
        params = parameters(args)
        self.size = int(params["image_size"])
        self.mask_side = int(params["mask_side"])
        self.max_side = int(params["max_image_side"])
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
            raise imaging.InputError("send exactly one of IMAGE (encoded file bytes) or PIXELS")
        win = None if window is None else tuple(float(v) for v in window.reshape(-1)[:2])
        if window is not None and window.size != 2:
            raise imaging.InputError(
                f"WINDOW must hold 2 values (centre, width), got {window.size}"
            )
        if image is not None:
            if image.size != 1:
                raise imaging.InputError(f"IMAGE must hold one file, got {image.size}")
            raw = image.reshape(-1)[0]
            display = imaging.decode_image(bytes(raw), win, self.max_side)
        else:
            display = imaging.pixels_to_image(pixels, win, self.max_side)
        pixel_values, t = imaging.letterbox(display, self.size)
        prompts = imaging.map_prompts(
            t,
            self.mask_side,
            points=_get(request, "POINTS"),
            point_labels=_get(request, "POINT_LABELS"),
            box=_get(request, "BOX"),
            mask=_get(request, "MASK"),
        )
        outputs = [
            pb_utils.Tensor("pixel_values", pixel_values[None]),
            pb_utils.Tensor("point_coords", prompts.point_coords),
            pb_utils.Tensor("point_labels", prompts.point_labels),
            pb_utils.Tensor("mask_input", prompts.mask_input),
            pb_utils.Tensor("has_mask", prompts.has_mask),
            pb_utils.Tensor("transform", t.as_array()),
        ]
        labels = _get(request, "LABELS")
        if labels is not None:
            ids, mask = tokenize(self.tok, labels.reshape(-1), self.max_labels)
            outputs += [pb_utils.Tensor("input_ids", ids), pb_utils.Tensor("attention_mask", mask)]
        return outputs
