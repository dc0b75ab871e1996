"""The NVIDIA (NGC) images the GPU flavour is built and served with, and their TensorRT: one place.

A TensorRT plan loads only in the TensorRT version that built it (major.minor.patch.build; see
`tensorrt_engine.check_engine`), so the image that builds the engines (`export`, NGC PyTorch) and
the image that serves them (`triton`, NGC Triton) must carry the same TensorRT. Both are taken
from one NGC release, as Triton's own QA builds its plans in the TensorRT container of the
release it tests.

Everything else names these values and is checked against them: `deploy/docker/*.Dockerfile`
(`FROM` lines, tests/test_tensorrt_static.py), our image tags in `docker-compose.yml` and
`deploy/k8s` (tests/test_compose.py, tests/test_k8s.py through `tensorrt_engine.TRITON_RELEASE`).
To move release: add the new images' TensorRT versions below from their release notes, change
NGC_RELEASE, then the Dockerfiles and tags the tests name.
"""

from __future__ import annotations

NGC_RELEASE = "25.06"
EXPORT_IMAGE = f"nvcr.io/nvidia/pytorch:{NGC_RELEASE}-py3"  # deploy/docker/export.Dockerfile
TRITON_IMAGE = f"nvcr.io/nvidia/tritonserver:{NGC_RELEASE}-py3"  # deploy/docker/triton.Dockerfile

# The full TensorRT version in each image. Sources (read 2026): the NGC release notes of each
# container ("Contents of the ... container": docs.nvidia.com/deeplearning/frameworks/
# pytorch-release-notes/rel-25-06.html, docs.nvidia.com/deeplearning/triton-inference-server/
# release-notes/rel-25-06.html, which point to the Frameworks Support Matrix for the list),
# cross-checked with NVIDIA/TensorRT release/10.11 (include/NvInferVersion.h: 10.11.0.33, commit
# 9255eb39) and Triton's compatibility matrix, whose 25.08-25.10 TensorRT-LLM images pair
# 10.11.0.33 with the 25.06 PyTorch build (2.8.0a0+5228986c39.nv25.6). The stored copies of the
# release notes read here did not show their contents lists, so the first export in the image
# checks this value: `build_engine` refuses to build when `tensorrt.__version__` differs.
TENSORRT_IN_IMAGE: dict[str, str] = {
    "nvcr.io/nvidia/pytorch:25.06-py3": "10.11.0.33",
    "nvcr.io/nvidia/tritonserver:25.06-py3": "10.11.0.33",
}

EXPORT_TENSORRT = TENSORRT_IN_IMAGE[EXPORT_IMAGE]
TRITON_TENSORRT = TENSORRT_IN_IMAGE[TRITON_IMAGE]
