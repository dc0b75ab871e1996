"""MedP-CLIP: model definition, checkpoints, ONNX export and Triton repository generation."""
