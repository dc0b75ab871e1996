"""What the server, the client, the export and the tests share (numpy, Pillow, pydicom only).

- `tensors`: the one declaration of every model's tensors (names, dtypes, shapes, batch limits).
- `inputs.prepare`: (image or pixels, prompts, labels) -> the model's input arrays + transform.
- `imaging`, `dicom`: decoding, DICOM display, letterbox, prompt mapping; `labels`: label checks
  and tokenization (`tokenizers`, imported only when used); `scoring`: label probabilities.
- `errors.InputError`: input the caller must fix (INVALID_ARGUMENT).
- `backend`: the code of the Triton python-backend models (`model_repository/*/1/model.py`).
"""

__version__ = "0.1.0"
