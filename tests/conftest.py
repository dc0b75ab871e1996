"""Shared fixtures: one export of the tiny model and one real tritonserver per test session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from medpclip import export
from medpclip.model import load_checkpoint
from medpclip_core import tensors as T
from medpclip_tools.serve import ServeProcess


@pytest.fixture(scope="session")
def build_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("build")
    # a fresh seeded tiny model: the tests must not depend on which default model is embedded
    export.export(config="tiny", seed=0, out=out, checkpoint=_fresh_checkpoint(out))
    return out


def _fresh_checkpoint(out: Path) -> Path:
    from medpclip.config import ModelConfig
    from medpclip.model import build, save_checkpoint
    from medpclip.tokenizer import DEFAULT_TOKENIZER

    return save_checkpoint(build(ModelConfig.load("tiny"), seed=0), out / "ckpt", DEFAULT_TOKENIZER)


@pytest.fixture(scope="session")
def checkpoint(build_dir) -> Path:
    return build_dir / "ckpt"


@pytest.fixture(scope="session")
def model(checkpoint):
    return load_checkpoint(checkpoint)


@pytest.fixture(scope="session")
def server(build_dir):
    """The server as users run it: `python -m medpclip_tools.serve` (gateway in front of Triton)."""
    with ServeProcess(build_dir / "model_repository", log_file=build_dir / "serve.log") as s:
        yield s


@pytest.fixture(scope="session")
def grpc(server):
    return grpcclient.InferenceServerClient(server.grpc_url)


def make_inputs(model_name: str, **arrays: np.ndarray) -> list[grpcclient.InferInput]:
    """InferInputs named and typed by the tensor declaration of `model_name`."""
    spec = T.spec(model_name)
    inputs = []
    for name, value in arrays.items():
        t = spec.input(name)
        arr = np.asarray(value)
        inp = grpcclient.InferInput(name, list(arr.shape), t.wire_type)
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    return inputs


def image_bytes(array: np.ndarray) -> np.ndarray:
    """PNG-encode an HxW or HxWx3 uint8 array as the IMAGE input."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return np.array([buf.getvalue()], dtype=object)


def sample_image(height: int = 120, width: int = 200, seed: int = 0) -> np.ndarray:
    """A non-square grey image with two bright discs (rows x cols)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    img = 40 + rng.normal(0, 8, (height, width))
    img[(yy - 40) ** 2 + (xx - 50) ** 2 < 15**2] = 200
    img[(yy - 80) ** 2 + (xx - 150) ** 2 < 20**2] = 90
    return np.clip(img, 0, 255).astype(np.uint8)


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A throw-away certificate and key for 127.0.0.1/localhost (the openssl CLI); skips the
    test where there is no openssl."""
    import shutil
    import subprocess

    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl binary to make a self-signed certificate")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


# --- the region prompts the parity tests send (tests/test_serving.py, tests/test_prompt_many.py)

PROMPT_H, PROMPT_W = 120, 200  # the size of sample_image() they go with
PARITY_LABELS = ["a round hyperdense nodule", "a dark cyst", "a spiculated mass", "normal tissue"]


def region_mask() -> np.ndarray:
    """A disc at (150, 80), the image's size: the MASK prompt form."""
    yy, xx = np.mgrid[:PROMPT_H, :PROMPT_W]
    return (((yy - 80) ** 2 + (xx - 150) ** 2) < 20**2).astype(np.uint8)


PROMPT_FORMS = {
    "point": {"POINTS": np.array([[50.0, 40.0]], np.float32)},
    "points_with_background": {
        "POINTS": np.array([[50.0, 40.0], [55.0, 45.0], [150.0, 80.0]], np.float32),
        "POINT_LABELS": np.array([1, 1, 0], np.int32),
    },
    "box": {"BOX": np.array([30.0, 20.0, 75.0, 62.0], np.float32)},
    "mask": {"MASK": region_mask()},
    "box_and_point": {
        "BOX": np.array([120.0, 50.0, 185.0, 110.0], np.float32),
        "POINTS": np.array([[150.0, 80.0]], np.float32),
    },
    "none": {},
}


def infer_outputs(grpc, model_name: str, **arrays: np.ndarray) -> dict[str, np.ndarray]:
    """Every declared output of one call of `model_name`, by name."""
    spec = T.spec(model_name)
    result = grpc.infer(model_name, make_inputs(model_name, **arrays))
    return {t.name: result.as_numpy(t.name) for t in spec.outputs}
