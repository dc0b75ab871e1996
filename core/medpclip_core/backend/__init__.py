"""The code of the Triton python-backend models.

Each `model_repository/<model>/1/model.py` imports its `TritonPythonModel` from here, so the
serving image gets the code by installing this package, and the code is importable (and
checked) outside Triton. `triton_python_backend_utils` exists only inside Triton's stub: the
model modules import it, `common` does not.
"""
