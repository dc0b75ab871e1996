"""`python perf/benchmark.py --suite reuse`: what computing each thing once buys (issue 12).

One run, one server, side by side:
- text path: the text encoder (ONNX Runtime, in process) on 4 new short labels padded to the
  context (before) and to the request's longest label (now);
- the main call over gRPC at concurrency 1: `medp_clip_image` (no labels, the floor),
  `medp_clip` with a new label set each call, and with a repeated set (the text encoder's
  response cache), plus saturation throughput of the repeated-set call against
  `medp_clip_image`'s;
- a second prompt on an encoded image: a full `medp_clip_image` call against
  `medp_clip_prompt_image` on the tokens of one `medp_clip_encode` call (when the repository
  has them), with the wire size of a prompt call.
Targets (issue 12, base on CPU) are printed with each ratio.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

LABELS = ["a nodule", "a cyst", "a spiculated mass", "a calcification"]


def _p50_ms(call, n: int) -> float:
    call()  # warm-up
    times = []
    for _ in range(n):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1000)


def text_path(onnx_dir: Path, checkpoint: Path, context: int, calls: int) -> dict:
    """ONNX Runtime text encoder: 4 new short labels, padded to the context vs bucketed."""
    from medpclip.onnx_export import ort_session
    from medpclip_core.labels import load_tokenizer, tokenize

    session = ort_session(onnx_dir / "text_encoder.onnx")
    tok = load_tokenizer(checkpoint / "tokenizer.json", context)
    counter = iter(range(10**9))

    def labels() -> list[str]:
        n = next(counter)
        return [f"{label} {n}" for label in LABELS]

    def full():
        enc = tok.encode_batch(labels())  # what every call did before: the whole context
        session.run(
            None,
            {
                "input_ids": np.array([e.ids for e in enc], np.int64),
                "attention_mask": np.array([e.attention_mask for e in enc], np.int64),
            },
        )

    def bucketed():
        ids, mask = tokenize(tok, labels())
        session.run(None, {"input_ids": ids, "attention_mask": mask})

    length = tokenize(tok, labels())[0].shape[1]
    before, now = _p50_ms(full, calls), _p50_ms(bucketed, calls)
    return {"context": context, "bucket": length, "before_ms": before, "now_ms": now}


def grpc_suite(url: str, w, seconds: float, saturation: int) -> dict:
    """The main call and the second prompt over gRPC (bare Triton on loopback)."""
    import tritonclient.grpc as g
    from benchmark import measure

    from medpclip_core import tensors as T

    def inputs(model: str, **arrays) -> list:
        spec = T.spec(model)
        out = []
        for name, a in arrays.items():
            i = g.InferInput(name, list(a.shape), spec.input(name).wire_type)
            i.set_data_from_numpy(a)
            out.append(i)
        return out

    image = np.array([w.dicom], dtype=object)
    counter = iter(range(10**9))

    def labels(repeated: bool) -> np.ndarray:
        n = 0 if repeated else next(counter)
        words = LABELS if repeated else [f"{label} {n}" for label in LABELS]
        return np.array([s.encode() for s in words], dtype=object)

    def maker(model: str, repeated: bool | None):
        def make():
            client = g.InferenceServerClient(url)

            def call():
                extra = {} if repeated is None else {"LABELS": labels(repeated)}
                client.infer(model, inputs(model, IMAGE=image, POINTS=w.points, **extra))

            return call

        return make

    rows: dict[str, dict] = {}
    for name, model, repeated in (
        ("image", "medp_clip_image", None),
        ("main_new_labels", "medp_clip", False),
        ("main_repeated_labels", "medp_clip", True),
    ):
        rows[name] = measure(maker(model, repeated), 1, seconds)
        print(f"  {name:22s} c=1  p50 {rows[name]['p50_ms']:8.1f} ms", flush=True)
    for name, model, repeated in (
        ("image_saturated", "medp_clip_image", None),
        ("main_repeated_saturated", "medp_clip", True),
    ):
        rows[name] = measure(maker(model, repeated), saturation, seconds)
        print(f"  {name:22s} c={saturation}  {rows[name]['throughput']:6.2f}/s", flush=True)

    client = g.InferenceServerClient(url)
    if client.is_model_ready("medp_clip_encode"):
        encoded = client.infer("medp_clip_encode", inputs("medp_clip_encode", IMAGE=image))
        tokens, transform = encoded.as_numpy("IMAGE_TOKENS"), encoded.as_numpy("TRANSFORM")
        rows["wire_bytes_per_prompt"] = {"bytes": int(tokens.nbytes + transform.nbytes)}

        def make_prompt():
            c = g.InferenceServerClient(url)
            feed = inputs(
                "medp_clip_prompt_image",
                IMAGE_TOKENS=tokens,
                TRANSFORM=transform,
                POINTS=w.points,
            )
            return lambda: c.infer("medp_clip_prompt_image", feed)

        def make_encode():
            c = g.InferenceServerClient(url)
            feed = inputs("medp_clip_encode", IMAGE=image)
            return lambda: c.infer("medp_clip_encode", feed)

        rows["encode"] = measure(make_encode, 1, seconds)
        rows["second_prompt"] = measure(make_prompt, 1, seconds)
        for name in ("encode", "second_prompt"):
            print(f"  {name:22s} c=1  p50 {rows[name]['p50_ms']:8.1f} ms", flush=True)
    return rows


def ratios(doc: dict) -> list[tuple[str, float, str, bool]]:
    """(what, value, target, met)."""
    g, t = doc["grpc"], doc["text"]
    out = [
        (
            "main call, repeated labels p50 / medp_clip_image p50 (c=1)",
            g["main_repeated_labels"]["p50_ms"] / g["image"]["p50_ms"],
            "<= 1.15",
            g["main_repeated_labels"]["p50_ms"] / g["image"]["p50_ms"] <= 1.15,
        ),
        (
            "main call, repeated labels throughput / medp_clip_image's (saturated)",
            g["main_repeated_saturated"]["throughput"] / g["image_saturated"]["throughput"],
            ">= 0.85",
            g["main_repeated_saturated"]["throughput"] / g["image_saturated"]["throughput"] >= 0.85,
        ),
        (
            f"text path, 4 new short labels: context {t['context']} / bucket {t['bucket']}",
            t["before_ms"] / t["now_ms"],
            ">= 10",
            t["before_ms"] / t["now_ms"] >= 10,
        ),
    ]
    if "second_prompt" in g:
        r = g["image"]["p50_ms"] / g["second_prompt"]["p50_ms"]
        out.append(("medp_clip_image p50 / second prompt p50 (c=1)", r, ">= 2.5", r >= 2.5))
    return out


def report(doc: dict) -> str:
    g, t = doc["grpc"], doc["text"]
    m = doc["machine"]
    lines = [
        f"## Reuse suite: {doc['config']} on {m['cpu']} ({m['cores']} cores), {doc['date']}",
        "",
        f"Dynamic batching delay: {doc.get('queue_delay_us') or 'the export default (2000)'} us.",
        "",
        "| call | p50 ms (c=1) | throughput /s |",
        "| --- | --- | --- |",
    ]
    for name in ("image", "main_new_labels", "main_repeated_labels", "encode", "second_prompt"):
        if name in g:
            lines.append(f"| {name} | {g[name]['p50_ms']:.1f} | {g[name]['throughput']:.2f} |")
    c = doc["saturation"]
    for name in ("image_saturated", "main_repeated_saturated"):
        lines.append(f"| {name} (c={c}) | {g[name]['p50_ms']:.1f} | {g[name]['throughput']:.2f} |")
    lines += [
        "",
        f"Text encoder (ONNX Runtime, in process), 4 new labels: padded to the context "
        f"({t['context']} tokens) {t['before_ms']:.1f} ms, to the request's longest label "
        f"({t['bucket']} tokens) {t['now_ms']:.1f} ms.",
    ]
    if "wire_bytes_per_prompt" in g:
        kib = g["wire_bytes_per_prompt"]["bytes"] / 1024
        lines.append(f"Wire size of a prompt call's IMAGE_TOKENS + TRANSFORM: {kib:.0f} KiB.")
    lines += ["", "| ratio | value | target | met |", "| --- | --- | --- | --- |"]
    for what, value, target, met in ratios(doc):
        lines.append(f"| {what} | {value:.2f} | {target} | {'yes' if met else 'NO'} |")
    return "\n".join(lines)


def run(args) -> dict:
    import torch
    from benchmark import Workload, cpu_peak_gflops

    from medpclip import export
    from medpclip_tools.serve import TritonServer

    torch.set_num_threads(os.cpu_count() or 1)
    delay = {} if args.queue_delay_us is None else {"queue_delay_us": args.queue_delay_us}
    result = export.export(config=args.config, out=args.out, skip_parity=True, **delay)
    w = Workload(result.checkpoint)
    _, cpu = cpu_peak_gflops()
    doc = {
        "config": args.config,
        "date": datetime.date.today().isoformat(),
        "machine": {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform()},
        "saturation": max(args.concurrency),
        "queue_delay_us": args.queue_delay_us,
    }
    print("== text path (ONNX Runtime, in process) ==", flush=True)
    doc["text"] = text_path(
        result.onnx_dir, result.checkpoint, w.cfg.text.context_length, calls=args.text_calls
    )
    print(f"  {doc['text']}", flush=True)
    print("== Triton over gRPC ==", flush=True)
    with TritonServer(result.repository) as server:
        doc["grpc"] = grpc_suite(server.grpc_url, w, args.seconds, doc["saturation"])
    return doc


def main(args) -> int:
    doc = run(args)
    text = report(doc)
    print("\n" + text)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"reuse-{args.config}.json").write_text(json.dumps(doc, indent=2))
    (args.results / f"reuse-{args.config}.md").write_text(text + "\n")
    print(f"\nsaved {args.results}/reuse-{args.config}.{{json,md}}")
    return 0
