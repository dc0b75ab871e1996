"""Bad input: INVALID_ARGUMENT with a message a person can act on, and the server keeps serving."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import image_bytes, make_inputs, sample_image
from tritonclient.utils import InferenceServerException

from medpclip_core import tensors as T

H, W = 120, 200
IMG = image_bytes(sample_image(H, W))
LABELS = np.array([b"a nodule", b"a cyst"], dtype=object)


def _pydicom_file(name: str) -> np.ndarray:
    from pydicom.data import get_testdata_file

    with open(get_testdata_file(name), "rb") as f:
        return np.array([f.read()], dtype=object)


def _huge_png() -> np.ndarray:
    # 20000 x 20000 (1-bit, so the file is small): must be refused before decoding
    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, format="PNG")
    return np.array([buf.getvalue()], dtype=object)


CASES = {
    "corrupt_image_bytes": (
        dict(IMAGE=np.array([IMG[0][:60]], dtype=object), LABELS=LABELS),
        "could not be decoded",
    ),
    "not_an_image": (
        dict(IMAGE=np.array([b"hello, not an image"], dtype=object), LABELS=LABELS),
        "could not be decoded as PNG, JPEG or DICOM",
    ),
    "dicom_without_pixels": (
        dict(IMAGE=_pydicom_file("test-SR.dcm"), LABELS=LABELS),
        "no pixel data",
    ),
    "point_outside_image": (
        dict(IMAGE=IMG, POINTS=np.array([[250.0, 10.0]], np.float32), LABELS=LABELS),
        "point 0 at (x=250, y=10) is outside the 200x120",
    ),
    "nan_coordinates": (
        dict(IMAGE=IMG, POINTS=np.array([[np.nan, 10.0]], np.float32), LABELS=LABELS),
        "NaN",
    ),
    "box_x1_before_x0": (
        dict(IMAGE=IMG, BOX=np.array([80.0, 10.0, 40.0, 50.0], np.float32), LABELS=LABELS),
        "x0 < x1",
    ),
    "mask_wrong_size": (
        dict(IMAGE=IMG, MASK=np.ones((10, 10), np.uint8), LABELS=LABELS),
        "MASK is 10x10 but the image is 200x120",
    ),
    "empty_label": (
        dict(IMAGE=IMG, LABELS=np.array([b"a nodule", b" "], dtype=object)),
        "label 1 is empty",
    ),
    "empty_label_list": (dict(IMAGE=IMG, LABELS=np.array([], dtype=object)), "LABELS is empty"),
    "too_many_labels": (
        dict(IMAGE=IMG, LABELS=np.array([b"x%d" % i for i in range(1000)], dtype=object)),
        f"1000 labels given; at most {T.MAX_LABELS}",
    ),
    "image_too_large": (
        dict(IMAGE=_huge_png(), LABELS=LABELS),
        f"largest side this server accepts is {T.MAX_IMAGE_SIDE}",
    ),
    "labels_without_points": (
        dict(IMAGE=IMG, POINT_LABELS=np.array([1], np.int32), LABELS=LABELS),
        "POINT_LABELS given without POINTS",
    ),
    "pixels_out_of_range": (
        dict(PIXELS=np.full((20, 30, 1), 900.0, np.float32), LABELS=LABELS),
        "pass WINDOW",
    ),
    "no_image": (dict(LABELS=LABELS), "exactly one of IMAGE"),
}


def _assert_still_serving(grpc):
    assert grpc.is_server_ready()
    r = grpc.infer("medp_clip", make_inputs("medp_clip", IMAGE=IMG, LABELS=LABELS))
    assert r.as_numpy("REGION_PROBS").shape == (2,)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_invalid_argument(grpc, case):
    arrays, message = CASES[case]
    with pytest.raises(InferenceServerException) as err:
        grpc.infer("medp_clip", make_inputs("medp_clip", **arrays))
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT", err.value.message()
    assert message in err.value.message()
    _assert_still_serving(grpc)


def test_wrong_dtype_is_invalid_argument(grpc):
    points = grpcclient.InferInput("POINTS", [1, 2], "FP64")
    points.set_data_from_numpy(np.array([[10.0, 10.0]], np.float64))
    inputs = make_inputs("medp_clip", IMAGE=IMG, LABELS=LABELS) + [points]
    with pytest.raises(InferenceServerException) as err:
        grpc.infer("medp_clip", inputs)
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "'POINTS' data-type is 'FP64'" in err.value.message()
    assert "expects 'FP32'" in err.value.message()
    _assert_still_serving(grpc)


def test_many_bad_requests_in_flight_never_wedge_the_server(grpc):
    """Errors racing good requests (a Triton ensemble can hang when one branch fails while
    another runs: every check is therefore in the first step). Bounded: 5 rounds."""
    from concurrent.futures import ThreadPoolExecutor

    def call(arrays):
        try:
            grpc.infer("medp_clip", make_inputs("medp_clip", **arrays), client_timeout=20)
            return "ok"
        except InferenceServerException as exc:
            return exc.status()

    good = dict(IMAGE=IMG, LABELS=LABELS)
    jobs = [arrays for _ in range(5) for arrays, _ in CASES.values()] + [good] * 20
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, jobs))
    assert results.count("ok") == 20
    assert set(results) == {"ok", "StatusCode.INVALID_ARGUMENT"}, set(results)
    _assert_still_serving(grpc)
