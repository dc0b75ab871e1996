"""Zero-shot answers of the CPU INT8 flavour against fp32 on held-out phantoms (point, box and
mask prompts), with ONNX Runtime sessions on the fp32 and int8 files of an export."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medpclip.model import MedPClip
from medpclip.onnx_export import INT8_MODELS, cosine_rows, ort_session
from medpclip.real_inputs import text_batch
from medpclip_core.inputs import prepare
from medpclip_core.scoring import label_probs

from .evaluate import centre_point
from .phantoms import CANONICAL, WINDOW, phantoms


def _sessions(onnx_dir: Path, int8: bool) -> dict:
    return {
        n: ort_session(onnx_dir / (f"{n}.int8.onnx" if int8 and n in INT8_MODELS else f"{n}.onnx"))
        for n in ("prompt_encoder", "image_encoder", "mask_decoder", "text_encoder")
    }


def agreement(
    model: MedPClip, onnx_dir: Path, tokenizer_json: Path, images: int = 200, seed: int = 1000
) -> dict[str, float]:
    """Zero-shot answers of int8 vs fp32 on held-out phantoms (point, box and mask prompts)."""
    cfg = model.cfg
    runs = {False: _sessions(onnx_dir, False), True: _sessions(onnx_dir, True)}
    tb = text_batch(tokenizer_json, cfg.text.context_length, CANONICAL)
    text = {k: s["text_encoder"].run(None, tb)[0] for k, s in runs.items()}
    scale = float(model.logit_scale.detach().exp())
    same, total, worst = 0, 0, 1.0
    for p in phantoms(seed, images):
        x = prepare(p.hu.astype(np.float32), cfg.vision.image_size, cfg.dims.M, window=WINDOW)
        for f in p.findings:
            for prompt in (
                {"points": np.array([centre_point(f)], np.float32)},
                {"box": np.array(f.box, np.float32)},
                {"mask": f.mask.astype(np.uint8)},
            ):
                pr = x.with_prompts(**prompt)
                answers, embs = [], []
                for int8, s in runs.items():
                    _, dense, region = s["prompt_encoder"].run(None, pr.prompt_arrays())
                    _, r, _ = s["image_encoder"].run(
                        None,
                        {
                            "pixel_values": pr.pixel_values,
                            "dense_embeddings": dense,
                            "region_map": region,
                        },
                    )
                    answers.append(int(np.argmax(label_probs(r[0], text[int8], scale))))
                    embs.append(r)
                same += answers[0] == answers[1]
                total += 1
                worst = min(worst, cosine_rows(*embs))
    return {"agreement": same / total, "predictions": total, "region_cosine_min": worst}
