# The `triton` service: NGC Triton 25.06 (2.59, TensorRT 10.11, Python 3.12) plus what our
# python-backend models import (preprocessing, tokenizer, and ONNX Runtime for the CPU flavour)
# and the launcher (`python3 -m medpclip.serve`): the gateway on the public ports, Triton on
# loopback behind it. 25.06 is the first release with all of Triton's gRPC cancellation fixes
# (README, "docker compose"); the gateway keeps cancellations away from Triton regardless.
FROM nvcr.io/nvidia/tritonserver:25.06-py3
COPY deploy/docker/requirements-triton.txt /tmp/requirements-triton.txt
RUN pip install --no-cache-dir -r /tmp/requirements-triton.txt
COPY clients /opt/medpclip/clients
COPY export /opt/medpclip/export
# --no-deps: the launcher (serve, supervisor, gateway, triton_process, deployment) imports no
# torch; its grpcio and numpy come with the requirements above, and the image brings Triton.
RUN pip install --no-cache-dir --no-deps /opt/medpclip/clients /opt/medpclip/export
# NGC's entrypoint stays (it sets up CUDA forward compatibility); compose and Kubernetes pass
# `python3 -m medpclip.serve ... --tritonserver /opt/tritonserver/bin/tritonserver` as the command.
