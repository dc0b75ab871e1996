"""The peer a user would otherwise pick: the same PyTorch model served with PyTriton's own
Python API over gRPC, doing the same work per request as our ensembles (decode the DICOM,
letterbox, map the prompt, run the model, bring the mask back; tokenize and embed labels).

    python perf/pytriton_peer.py --checkpoint DIR --grpc-port 8101 --http-port 8100 \
        --metrics-port 8102

Runs until SIGTERM/SIGINT. Models: `peer_image` (IMAGE bytes, POINTS) and `peer_text` (LABELS).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

import numpy as np
import torch
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

from medpclip.model import load_checkpoint
from medpclip.real_inputs import text_batch
from medpclip.reference import embed_text, forward
from medpclip_core import imaging
from medpclip_core.inputs import prepare, stack


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--grpc-port", type=int, required=True)
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--metrics-port", type=int, required=True)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_checkpoint(args.checkpoint)
    cfg = model.cfg
    tokenizer_json = args.checkpoint / "tokenizer.json"

    @batch
    def infer_image(IMAGE, POINTS):  # noqa: N803 (tensor names)
        items = [
            prepare(bytes(data[0]), cfg.vision.image_size, cfg.dims.M, points=points)
            for data, points in zip(IMAGE, POINTS, strict=True)
        ]
        out = forward(model, stack(items))
        masks = [
            imaging.mask_from_logits(m, x.transform).reshape(-1)[:1]
            for m, x in zip(out["mask_logits"], items, strict=True)
        ]
        return {
            "REGION_EMBEDDING": out["region_embedding"],
            "GLOBAL_EMBEDDING": out["global_embedding"],
            "MASK_HEAD": np.stack(masks).astype(np.uint8),
        }

    def infer_text(requests):
        responses = []
        for req in requests:
            labels = [s.decode() for s in req["LABELS"].reshape(-1)]
            tb = text_batch(tokenizer_json, cfg.text.context_length, labels)
            responses.append({"TEXT_EMBEDDINGS": embed_text(model, tb)})
        return responses

    config = TritonConfig(
        grpc_port=args.grpc_port, http_port=args.http_port, metrics_port=args.metrics_port
    )
    with Triton(config=config) as triton:
        triton.bind(
            model_name="peer_image",
            infer_func=infer_image,
            inputs=[
                Tensor(name="IMAGE", dtype=bytes, shape=(1,)),
                Tensor(name="POINTS", dtype=np.float32, shape=(-1, 2)),
            ],
            outputs=[
                Tensor(name="REGION_EMBEDDING", dtype=np.float32, shape=(-1,)),
                Tensor(name="GLOBAL_EMBEDDING", dtype=np.float32, shape=(-1,)),
                Tensor(name="MASK_HEAD", dtype=np.uint8, shape=(-1,)),
            ],
            config=ModelConfig(
                max_batch_size=8, batcher=DynamicBatcher(max_queue_delay_microseconds=2000)
            ),
            strict=False,
        )
        triton.bind(
            model_name="peer_text",
            infer_func=infer_text,
            inputs=[Tensor(name="LABELS", dtype=bytes, shape=(-1,))],
            outputs=[Tensor(name="TEXT_EMBEDDINGS", dtype=np.float32, shape=(-1, -1))],
            config=ModelConfig(batching=False),
            strict=False,
        )
        signal.signal(signal.SIGTERM, lambda *_: triton.stop())
        print("peer ready", flush=True)
        triton.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
