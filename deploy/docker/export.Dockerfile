# The `export` service: runs our export on the target GPU (ONNX -> TensorRT engines -> parity
# against ONNX Runtime -> Triton repository). NGC PyTorch 25.06 ships TensorRT 10.11.0.33, the
# version Triton 25.06 loads plans of (to the build number): both images are named in one place,
# export/medpclip/ngc_images.py, and the tests check this FROM line against it.
FROM nvcr.io/nvidia/pytorch:25.06-py3
WORKDIR /src
COPY deploy/docker/requirements-export.txt /tmp/requirements-export.txt
# Since 25.03 the image pins its own packages through PIP_CONSTRAINT (/etc/pip/constraint.txt).
# Our pins are the tested export set (onnx, onnxruntime, polygraphy...) and torch imports none of
# them (the exporter runs with dynamo=False), so they take precedence here; torch, TensorRT and
# numpy stay the image's, as nothing below pins them.
RUN PIP_CONSTRAINT= pip install --no-cache-dir -r /tmp/requirements-export.txt
COPY core core
COPY export export
# torch and TensorRT come with the image: install our packages without their pinned deps
RUN pip install --no-cache-dir --no-deps ./core ./export
ENTRYPOINT ["python", "-m", "medpclip.export"]
