# The `export` service: runs our export on the target GPU (ONNX -> TensorRT engines -> Triton
# repository). NGC PyTorch 24.10 ships TensorRT 10.5, the version Triton 24.10 loads plans of.
FROM nvcr.io/nvidia/pytorch:24.10-py3
WORKDIR /src
COPY deploy/docker/requirements-export.txt /tmp/requirements-export.txt
RUN pip install --no-cache-dir -r /tmp/requirements-export.txt
COPY clients clients
COPY export export
COPY model_repository model_repository
# torch and TensorRT come with the image: install our packages without their pinned deps
RUN pip install --no-cache-dir --no-deps -e clients -e export
ENTRYPOINT ["python", "-m", "medpclip.export"]
