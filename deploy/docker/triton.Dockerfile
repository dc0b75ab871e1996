# The `triton` service: NGC Triton 24.10 (2.51, TensorRT 10.5) plus what our python-backend
# models import (preprocessing, tokenizer, and ONNX Runtime for the CPU flavour).
FROM nvcr.io/nvidia/tritonserver:24.10-py3
COPY deploy/docker/requirements-triton.txt /tmp/requirements-triton.txt
RUN pip install --no-cache-dir -r /tmp/requirements-triton.txt
COPY clients /opt/medpclip/clients
RUN pip install --no-cache-dir --no-deps /opt/medpclip/clients
