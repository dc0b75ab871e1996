"""The prompted ViT blocks against as many trunk blocks, before and after issue 12 item 4, side by
side in one run on the same weights and inputs.

    python perf/prompted_blocks.py                        # base config, batch 1 and 8, CPU fp32
    python perf/prompted_blocks.py --batch 64 --device cuda --dtype autocast-fp16

"before" is the previous formulation, reproduced here: attention written out as matmul +
softmax, and the prompted blocks adding a dense [B,1,n+1,n+1] bias to every score although only
the region token's row needs one. "after" is the model as it is: plain (fused) attention for CLS
and the patches, a one-query attention with its bias for the region token.

"trunk" times the last `prompt_blocks` trunk blocks on the trunk's tokens; "prompted" times
`forward_prompted` (region token, bias, the gated dense map and the prompted blocks; the final
LayerNorm and projections are a few per cent of one block). Each figure is the median (--stat
min: the fastest) of --repeats calls, the four variants interleaved so that drift hits them
alike. The last column is max |after - before| over the prompted outputs (global and region
embeddings, patch features).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial

import torch
from torch import Tensor

from medpclip.config import ModelConfig
from medpclip.model import build
from medpclip.modeling.common import MASKED

DTYPES = ("fp32", "fp16", "autocast-fp16")


def old_attention(attn, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None) -> Tensor:
    """`Attention.forward` before: matmul + softmax with an optional dense bias."""

    def split(x: Tensor) -> Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, attn.heads, c // attn.heads).transpose(1, 2)

    qh, kh, vh = split(attn.q(q)), split(attn.k(k)), split(attn.v(v))
    scores = (qh @ kh.transpose(-2, -1)) * attn.scale
    if bias is not None:
        scores = scores + bias
    x = scores.softmax(dim=-1) @ vh
    b, _, n, _ = x.shape
    return attn.out(x.transpose(1, 2).reshape(b, n, -1))


def old_block(block, x: Tensor, bias: Tensor | None = None) -> Tensor:
    h = block.norm1(x)
    x = x + old_attention(block.attn, h, h, h, bias)
    return x + block.mlp(block.norm2(x))


def old_attention_bias(enc, region_map: Tensor, n: int) -> Tensor:
    """`ImageEncoder._attention_bias` before: [B,1,n+1,n+1]."""
    b = region_map.shape[0]
    zeros = torch.zeros(b, n, n, dtype=region_map.dtype, device=region_map.device)
    hide_reg = torch.full((b, n, 1), MASKED, dtype=region_map.dtype, device=region_map.device)
    top = torch.cat([zeros, hide_reg], dim=2)
    towards = enc.region_bias * (region_map - 1)
    zero = torch.zeros(b, 1, dtype=region_map.dtype, device=region_map.device)
    reg_row = torch.cat([zero, towards, zero + MASKED], dim=1).unsqueeze(1)
    return torch.cat([top, reg_row], dim=1).unsqueeze(1)


def old_forward_prompted(enc, tokens: Tensor, dense: Tensor, region_map: Tensor):
    """`ImageEncoder.forward_prompted` before."""
    n = tokens.shape[1]
    dense_tokens = dense.flatten(2).transpose(1, 2)
    reg = tokens[:, :1] + enc.region_token
    x = torch.cat([tokens, reg], dim=1)
    bias = old_attention_bias(enc, region_map, n)
    for i, block in enumerate(enc.blocks[enc.trunk_depth :]):
        gated = enc.gates[i] * enc.dense_proj[i](dense_tokens)
        x = torch.cat([x[:, :1], x[:, 1:n] + gated, x[:, n:]], dim=1)
        x = old_block(block, x, bias)
    x = enc.ln_post(x)
    global_emb = torch.nn.functional.normalize(enc.proj(x[:, 0]), dim=-1)
    region_emb = torch.nn.functional.normalize(enc.proj(x[:, n]), dim=-1)
    return global_emb, region_emb, x[:, 1:n]


def measure(variants: dict, repeats: int, warmup: int, sync, stat) -> dict[str, float]:
    """ms per call of each variant (`stat` over `repeats` calls), the variants interleaved."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(warmup + repeats):
        for name, fn in variants.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if r >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: stat(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", default="base", help="bundled model size (default: base)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes (1 8)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per variant (10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per variant (2)")
    p.add_argument(
        "--stat",
        choices=("median", "min"),
        default="median",
        help="per-variant figure; min is steadier on a shared, loaded machine (median)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (2; 0: leave)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="fp32",
        help="fp32; fp16 (model.half()); autocast-fp16 (fp32 weights under torch.autocast)",
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = ModelConfig.load(args.config)
    k = cfg.vision.prompt_blocks
    if cfg.vision.depth - k < k:
        p.error(f"config {cfg.name} has fewer trunk blocks than prompted blocks ({k})")
    model = build(cfg, seed=0).to(device)
    if args.dtype == "fp16":
        model = model.half()
    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    enc = model.image_encoder
    with torch.no_grad():  # open the gates so that the dense path does real work
        enc.gates.fill_(0.5)
    trunk_blocks = enc.blocks[enc.trunk_depth - k : enc.trunk_depth]
    autocast = torch.autocast(
        device.type, dtype=torch.float16, enabled=args.dtype == "autocast-fp16"
    )
    stat = statistics.median if args.stat == "median" else min

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def trunk_after(x: Tensor) -> Tensor:
        for blk in trunk_blocks:
            x = blk(x)
        return x

    def trunk_before(x: Tensor) -> Tensor:
        for blk in trunk_blocks:
            x = old_block(blk, x)
        return x

    print(
        f"{cfg.name}: {k} prompted vs {k} trunk blocks, width {cfg.vision.width}, "
        f"{1 + cfg.vision.grid**2} tokens (+1 region token), {args.device} {args.dtype}, "
        f"threads {torch.get_num_threads()}, {args.stat} of {args.repeats} calls (ms)"
    )
    header = (
        f"{'batch':>5} | {'trunk before':>12} {'prompted before':>15} {'ratio':>5} | "
        f"{'trunk after':>11} {'prompted after':>14} {'ratio':>5} | {'max |diff|':>10}"
    )
    print(header)
    print("-" * len(header))
    S, M = cfg.vision.image_size, cfg.dims.M
    for b in args.batch:
        g = torch.Generator().manual_seed(b)
        pixels = torch.randn(b, 3, S, S, generator=g).to(device, dtype)
        coords = (torch.rand(b, 2, 2, generator=g) * S).to(device, dtype)  # fg and bg point
        labels = torch.tensor([[1, 0]] * b, dtype=torch.int32, device=device)
        mask = torch.zeros(b, 1, M, M, device=device, dtype=dtype)
        has_mask = torch.zeros(b, 1, device=device, dtype=dtype)
        with torch.inference_mode(), autocast:
            _, dense, region = model.prompt_encoder(coords, labels, mask, has_mask)
            tokens = enc.forward_trunk(pixels)
            variants = {
                "trunk before": partial(trunk_before, tokens),
                "prompted before": partial(old_forward_prompted, enc, tokens, dense, region),
                "trunk after": partial(trunk_after, tokens),
                "prompted after": partial(enc.forward_prompted, tokens, dense, region),
            }
            t = measure(variants, args.repeats, args.warmup, sync, stat)
            pairs = zip(variants["prompted after"](), variants["prompted before"](), strict=True)
            diff = max(float((a.float() - c.float()).abs().max()) for a, c in pairs)
        print(
            f"{b:>5} | {t['trunk before']:>12.2f} {t['prompted before']:>15.2f} "
            f"{t['prompted before'] / t['trunk before']:>5.2f} | "
            f"{t['trunk after']:>11.2f} {t['prompted after']:>14.2f} "
            f"{t['prompted after'] / t['trunk after']:>5.2f} | {diff:>10.2e}"
        )
    print("ratio = prompted / trunk, as many blocks each (1.00: as cheap as the trunk)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
