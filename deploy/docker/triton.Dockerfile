# The `triton` service: NGC Triton 25.06 (2.59, TensorRT 10.11.0.33, Python 3.12; the image is
# named in export/medpclip/ngc_images.py with the export's, checked by the tests) plus what our
# python-backend models import (medpclip_core: preprocessing, tokenizer, ONNX Runtime for the CPU
# flavour)
# and the launcher (`python3 -m medpclip_tools.serve`): the gateway on the public ports, Triton on
# loopback behind it. 25.06 is the first release with all of Triton's gRPC cancellation fixes
# (README, "docker compose"); the gateway keeps cancellations away from Triton regardless.
FROM nvcr.io/nvidia/tritonserver:25.06-py3
COPY deploy/docker/requirements-triton.txt /tmp/requirements-triton.txt
RUN pip install --no-cache-dir -r /tmp/requirements-triton.txt
COPY core /opt/medpclip/core
COPY tools /opt/medpclip/tools
# --no-deps: medpclip_core's python-backend code needs only the requirements above; the launcher
# (medpclip_tools: serve, supervisor, gateway, triton_process, deployment) imports no torch and
# no client, only grpcio, tritonclient's protobufs and numpy. The image brings Triton.
RUN pip install --no-cache-dir --no-deps /opt/medpclip/core /opt/medpclip/tools
# NGC's entrypoint stays (it sets up CUDA forward compatibility); compose and Kubernetes pass
# `python3 -m medpclip_tools.serve ... --tritonserver /opt/tritonserver/bin/tritonserver` as the command.
