"""Property-based bad input against the real server: every malformed request to any of the three
ensembles gets exactly INVALID_ARGUMENT, its message does not echo request data, the server stays
ready, and a fixed good request still gets the same answers afterwards.

The strategies (one per validation path) live in perf/fuzz_strategies.py, shared with the big run
`perf/fuzz.py --cases 10000`. Seeds are fixed per (ensemble, path), so CI draws the same cases on
every run; a failure prints the shrunk case.
"""

from __future__ import annotations

import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import image_bytes, make_inputs, sample_image
from hypothesis import HealthCheck, Phase, given, seed, settings

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "perf"))

import fuzz_strategies as fs  # noqa: E402

EXAMPLES = 4  # per (ensemble, path): ~440 cases in all, ~20 s once the server is up
TIMEOUT_S = 30.0  # client deadline: far above any answer here, so only a hang reaches it

CI = settings(
    max_examples=EXAMPLES,
    database=None,  # reproducible from the seed alone, nothing carried between runs
    deadline=None,  # latency is the server's business here; hangs meet TIMEOUT_S instead
    phases=(Phase.explicit, Phase.generate, Phase.shrink),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    report_multiple_bugs=False,
)


def _param(model: str, path: str):
    # a known server bug stays in as a strict xfail: it documents the bug until it is fixed
    bug = fs.KNOWN_BUGS.get((model, path))
    marks = [pytest.mark.xfail(strict=True, reason=bug)] if bug else []
    return pytest.param(model, path, id=f"{model}-{path}", marks=marks)


@pytest.fixture(scope="module")
def limits(build_dir) -> fs.Limits:
    return fs.Limits.from_repository(build_dir / "model_repository")


@pytest.fixture(scope="module")
def good_requests() -> dict[str, list]:
    img = image_bytes(sample_image(120, 200))
    labels = fs.object_array([b"a nodule", b"a cyst"])
    points = np.array([[50.0, 40.0]], np.float32)
    return {
        "medp_clip": make_inputs("medp_clip", IMAGE=img, POINTS=points, LABELS=labels),
        "medp_clip_image": make_inputs("medp_clip_image", IMAGE=img, POINTS=points),
        "medp_clip_text": make_inputs("medp_clip_text", LABELS=labels),
    }


def _answers(grpc, good_requests) -> dict[str, dict]:
    out = {}
    for model, inputs in good_requests.items():
        result = grpc.infer(model, inputs, client_timeout=TIMEOUT_S)
        out[model] = {t.name: result.as_numpy(t.name) for t in fs.T.spec(model).outputs}
    return out


@pytest.fixture(scope="module")
def baseline(grpc, good_requests) -> dict[str, dict]:
    """The good answers before the first malformed request of this module."""
    return _answers(grpc, good_requests)


@pytest.mark.parametrize(("model", "path"), [_param(m, p) for m, p in fs.targets()])
def test_malformed_request_is_invalid_argument(grpc, limits, baseline, good_requests, model, path):
    @CI
    @seed(zlib.crc32(f"{model}/{path}".encode()))  # str hashes vary per process; crc32 does not
    @given(fs.cases(model, path, limits))
    def check(case: fs.Case) -> None:
        outcome = fs.send(grpc, case, TIMEOUT_S)
        assert grpc.is_server_ready(), f"server not ready after {case!r}"
        assert not fs.problems(case, outcome), fs.problems(case, outcome)

    check()
    after = _answers(grpc, good_requests)
    for name in baseline:
        assert not fs.differences(baseline[name], after[name]), name


def test_every_validation_path_is_fuzzed():
    """The CI run covers each ensemble's inputs and the paths the brief of issue 10 names."""
    paths = {p for _, p in fs.targets()}
    assert {m for m, _ in fs.targets()} == set(fs.ENSEMBLES)
    for must in (
        "image_empty",
        "image_and_pixels",
        "pixels_shape",
        "pixels_nonfinite",
        "window_bad",
        "points_too_many",
        "points_nonfinite",
        "points_outside",
        "point_labels_value",
        "box_nonfinite",
        "box_inverted",
        "mask_empty",
        "mask_wrong_size",
        "labels_non_utf8",
        "labels_over_context",
        "labels_empty_list",
        "labels_too_many",
        "wrong_dtype",
        "unknown_input",
        "image_random_bytes",
        "png_truncated",
        "dicom_truncated",
    ):
        assert must in paths, must
