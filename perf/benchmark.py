"""Side-by-side benchmark on this machine, in one run: the `base` model on CPU as
(1) PyTorch eager, (2) ONNX Runtime in-process on the same ONNX, (3) our Triton ensembles over
gRPC and (4) the peer a user would otherwise pick, the same PyTorch model served with PyTriton.

    python perf/benchmark.py                 # base config, ~6 minutes on 2 cores
    python perf/benchmark.py --config tiny --seconds 3
    python perf/benchmark.py --suite reuse   # text length, label cache, encode once (reuse.py)

Both paths do a request's whole work: image = decode a DICOM slice, letterbox, map a point
prompt, prompt/image encoders and mask decoder, mask back to the original size; text =
tokenize and embed 4 labels (a new set each call; a repeated set separately, for the cache).
Prints throughput, p50/p99 latency and server RSS per system and concurrency, the ratios the
targets are stated in, and achieved GFLOP/s against the CPU's fp32 peak; writes JSON and a PNG
plot, and the table for perf/README.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil

from medpclip_core.cpu import isa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "perf"))

SYSTEMS = ("pytorch", "onnxruntime", "triton", "pytriton", "onnxruntime-int8", "triton-int8")
DEFAULT_SYSTEMS = SYSTEMS[:4]
LABELS = ["a round hyperdense nodule", "a dark cyst", "a spiculated mass", "a calcification"]


# --- measuring --------------------------------------------------------------------------------


def measure(
    make_call: Callable[[], Callable[[], None]],
    concurrency: int,
    seconds: float,
    rss: Callable[[], int] | None = None,
) -> dict:
    """`concurrency` workers (each with its own call, e.g. its own gRPC client) call in a loop."""
    calls = [make_call() for _ in range(concurrency)]
    for c in calls:  # warm up each worker (lazy session init, first batches, caches)
        for _ in range(3):
            c()
    latencies: list[float] = []
    lock = threading.Lock()
    peak = [rss() if rss else 0]
    deadline = time.perf_counter() + seconds

    def worker(call):
        local = []
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            call()
            local.append(time.perf_counter() - t)
        with lock:
            latencies.extend(local)

    threads = [threading.Thread(target=worker, args=(c,)) for c in calls]
    start = time.perf_counter()
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        time.sleep(0.2)
        if rss:
            peak[0] = max(peak[0], rss())
    elapsed = time.perf_counter() - start
    lat = np.array(latencies) * 1000
    return {
        "concurrency": concurrency,
        "throughput": len(lat) / elapsed,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "requests": len(lat),
        "rss_mb": peak[0] / 2**20,
    }


def tree_rss(pid: int) -> int:
    try:
        proc = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
    except psutil.Error:
        return 0


# --- the systems ------------------------------------------------------------------------------


class Workload:
    """Inputs and the numpy pre/postprocessing shared by the in-process systems."""

    def __init__(self, checkpoint: Path):
        from medpclip.model import load_checkpoint
        from medpclip_tools.evaluate import centre_point
        from medpclip_tools.phantoms import phantoms, to_dicom

        self.model = load_checkpoint(checkpoint)
        self.cfg = self.model.cfg
        self.tokenizer_json = checkpoint / "tokenizer.json"
        p = phantoms(seed=99, count=1)[0]
        self.dicom = to_dicom(p)
        self.points = np.array([centre_point(p.findings[0])], np.float32)
        self.counter = itertools.count()

    def preprocess(self):
        """A request's preprocessing, as the server's `preprocess` model runs it: decode the
        DICOM, letterbox, map the point (`medpclip_core.inputs.ModelInputs`)."""
        from medpclip_core.inputs import prepare

        return prepare(self.dicom, self.cfg.vision.image_size, self.cfg.dims.M, points=self.points)

    def new_labels(self) -> list[str]:
        n = next(self.counter)
        return [f"finding {n} {k}" for k in range(len(LABELS))]

    def tokens(self, labels):
        from medpclip.real_inputs import text_batch

        return text_batch(self.tokenizer_json, self.cfg.text.context_length, labels)


def pytorch_calls(w: Workload):
    from medpclip.reference import embed_text, forward
    from medpclip_core import imaging

    def image():
        x = w.preprocess()
        out = forward(w.model, x.image_arrays())
        imaging.mask_from_logits(out["mask_logits"][0], x.transform)

    def text():
        embed_text(w.model, w.tokens(w.new_labels()))

    return (lambda: image), (lambda: text)


def onnxruntime_calls(w: Workload, onnx_dir: Path, int8: bool = False):
    from medpclip.onnx_export import INT8_MODELS, ort_session, quantize_int8
    from medpclip_core import imaging

    names = ("prompt_encoder", "image_encoder", "mask_decoder", "text_encoder")
    files = {n: onnx_dir / f"{n}.onnx" for n in names}
    if int8:
        files.update({n: quantize_int8(files[n]) for n in INT8_MODELS})
    s = {n: ort_session(f) for n, f in files.items()}

    def image():
        x = w.preprocess()
        sparse, dense, region = s["prompt_encoder"].run(None, x.prompt_arrays())
        _, _, patches = s["image_encoder"].run(
            None, {"pixel_values": x.pixel_values, "dense_embeddings": dense, "region_map": region}
        )
        logits, _ = s["mask_decoder"].run(
            None,
            {"patch_features": patches, "sparse_embeddings": sparse, "dense_embeddings": dense},
        )
        imaging.mask_from_logits(logits[0], x.transform)

    def text():
        s["text_encoder"].run(None, w.tokens(w.new_labels()))

    return (lambda: image), (lambda: text)


def grpc_calls(
    url: str,
    image_model: str,
    text_model: str,
    w: Workload,
    outputs: tuple[str, ...],
    repeated: bool = False,
    batched: bool = False,
):
    import tritonclient.grpc as g

    def inputs_image():
        image, points = np.array([w.dicom], dtype=object), w.points
        if batched:  # the PyTriton peer's models batch: a leading batch axis
            image, points = image[None], points[None]
        a = g.InferInput("IMAGE", list(image.shape), "BYTES")
        a.set_data_from_numpy(image)
        b = g.InferInput("POINTS", list(points.shape), "FP32")
        b.set_data_from_numpy(points)
        return [a, b]

    def make_image():
        client = g.InferenceServerClient(url)
        inputs = inputs_image()
        wanted = [g.InferRequestedOutput(o) for o in outputs]
        return lambda: client.infer(image_model, inputs, outputs=wanted)

    def make_text():
        client = g.InferenceServerClient(url)

        def call():
            labels = LABELS if repeated else w.new_labels()
            i = g.InferInput("LABELS", [len(labels)], "BYTES")
            i.set_data_from_numpy(np.array([s.encode() for s in labels], dtype=object))
            client.infer(text_model, [i])

        return call

    return make_image, make_text


# --- FLOPs and peak -----------------------------------------------------------------------------


def image_gflops(w: Workload) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    from medpclip.reference import forward

    arrays = w.preprocess().image_arrays()
    with FlopCounterMode(display=False) as counter:
        forward(w.model, arrays)
    return counter.get_total_flops() / 1e9


def cpu_peak_gflops() -> tuple[float, str]:
    """cores x GHz x fp32 lanes x 2 (FMA) x 2 FMA units (assumed: server Xeons/EPYCs have 2)."""
    info = Path("/proc/cpuinfo").read_text()
    flags = set(re.search(r"^flags\s*:\s*(.*)$", info, re.M).group(1).split())
    mhz = float(re.search(r"^cpu MHz\s*:\s*([\d.]+)", info, re.M).group(1))
    max_khz = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    if max_khz.is_file():
        mhz = int(max_khz.read_text()) / 1000
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    fma = 2 if "fma" in flags else 1
    cores = os.cpu_count() or 1
    peak = cores * mhz / 1000 * lanes * fma * 2
    model = re.search(r"^model name\s*:\s*(.*)$", info, re.M).group(1)
    return peak, (
        f"{model}, {cores} cores at {mhz / 1000:.2f} GHz, {lanes * 32}-bit vectors, "
        f"{'FMA' if fma == 2 else 'no FMA'}, 2 FMA units assumed"
    )


# --- main ---------------------------------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    from medpclip_tools.serve import _free_ports

    return _free_ports("127.0.0.1", n)


def start_peer(checkpoint: Path) -> tuple[subprocess.Popen, str]:
    grpc, http, metrics = free_ports(3)
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "perf" / "pytriton_peer.py"),
            "--checkpoint",
            str(checkpoint),
            "--grpc-port",
            str(grpc),
            "--http-port",
            str(http),
            "--metrics-port",
            str(metrics),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    for line in proc.stdout:
        if "peer ready" in line:
            break
    else:
        raise RuntimeError("the PyTriton peer did not start")
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
    return proc, f"127.0.0.1:{grpc}"


def run(args: argparse.Namespace) -> dict:
    import torch

    from medpclip import export
    from medpclip_tools.serve import TritonServer

    torch.set_num_threads(os.cpu_count() or 1)
    out = args.out
    result = export.export(
        config=args.config, out=out, skip_parity=True, ort_threads=args.ort_threads
    )
    checkpoint = result.checkpoint
    w = Workload(checkpoint)
    levels = args.concurrency
    results: dict[str, dict[str, list[dict]]] = {}

    def record(system: str, path: str, make_call, rss=None):
        for c in levels:
            r = measure(make_call, c, args.seconds, rss)
            results.setdefault(system, {}).setdefault(path, []).append(r)
            print(
                f"  {system:12s} {path:6s} c={c}: {r['throughput']:7.2f}/s  "
                f"p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  "
                f"rss {r['rss_mb']:6.0f} MB",
                flush=True,
            )

    me = os.getpid()
    systems = set(args.systems)
    print("== in-process ==")
    if "pytorch" in systems:
        image, text = pytorch_calls(w)
        record("pytorch", "image", image, lambda: tree_rss(me))
        record("pytorch", "text", text, lambda: tree_rss(me))
    for name, int8 in (("onnxruntime", False), ("onnxruntime-int8", True)):
        if name in systems:
            image, text = onnxruntime_calls(w, out / "onnx", int8)
            record(name, "image", image, lambda: tree_rss(me))
            record(name, "text", text, lambda: tree_rss(me))

    for name, int8 in (("triton", False), ("triton-int8", True)):
        if name not in systems:
            continue
        print(f"== Triton ensemble (gRPC){' int8 flavour' if int8 else ''} ==")
        repo = out / "model_repository"
        if int8:
            export.export(config=args.config, out=out, skip_parity=True, int8=True)
        with TritonServer(repo) as server:
            rss = lambda: tree_rss(server.pid)  # noqa: E731
            image, text = grpc_calls(
                server.grpc_url,
                "medp_clip_image",
                "medp_clip_text",
                w,
                ("REGION_EMBEDDING", "GLOBAL_EMBEDDING", "REGION_MASK"),
            )
            record(name, "image", image, rss)
            record(name, "text", text, rss)
            if not int8:
                _, repeated = grpc_calls(
                    server.grpc_url, "medp_clip_image", "medp_clip_text", w, (), repeated=True
                )
                record(name, "text-repeated", repeated, rss)

    if "pytriton" in systems:
        print("== PyTriton peer (gRPC) ==")
        peer, url = start_peer(checkpoint)
        try:
            rss = lambda: tree_rss(peer.pid)  # noqa: E731
            image, text = grpc_calls(
                url,
                "peer_image",
                "peer_text",
                w,
                ("REGION_EMBEDDING", "GLOBAL_EMBEDDING", "MASK_HEAD"),
                batched=True,
            )
            record("pytriton", "image", image, rss)
            record("pytriton", "text", text, rss)
        finally:
            os.killpg(peer.pid, signal.SIGTERM)
            peer.wait(timeout=60)

    gflop = image_gflops(w)
    peak, cpu = cpu_peak_gflops()
    return {
        "config": args.config,
        "seconds": args.seconds,
        "levels": levels,
        # int8 figures depend on the CPU's instruction sets (VNNI or not: medpclip_core.cpu)
        "machine": {
            "cpu": cpu,
            "isa": isa(),
            "platform": platform.platform(),
            "peak_gflops": peak,
        },
        "image_gflop_per_request": gflop,
        "results": results,
    }


def best(rows: list[dict]) -> dict:
    return max(rows, key=lambda r: r["throughput"])


def at(rows: list[dict], c: int) -> dict:
    return next(r for r in rows if r["concurrency"] == c)


def ratios(doc: dict) -> list[tuple[str, float, str, bool]]:
    r = doc["results"]
    img = {name: paths["image"] for name, paths in r.items()}
    rows = []

    def add(name, value, target, ok):
        rows.append((name, value, target, ok))

    if {"triton", "onnxruntime"} <= set(img):
        v = best(img["triton"])["throughput"] / best(img["onnxruntime"])["throughput"]
        add("ensemble / direct ORT, image throughput at saturation", v, ">= 0.9", v >= 0.9)
        v = at(img["triton"], 1)["p50_ms"] / at(img["onnxruntime"], 1)["p50_ms"] - 1
        add("serving overhead at concurrency 1 (p50 vs direct ORT)", v, "<= 0.10", v <= 0.10)
    if {"triton", "pytriton"} <= set(img):
        v = best(img["triton"])["throughput"] / best(img["pytriton"])["throughput"]
        add("ensemble / PyTriton peer, image throughput at saturation", v, ">= 1.5", v >= 1.5)
    if "triton" in r and "text-repeated" in r["triton"]:
        v = at(r["triton"]["text"], 1)["p50_ms"] / at(r["triton"]["text-repeated"], 1)["p50_ms"]
        add("new / repeated label set, text latency", v, ">= 10", v >= 10)
    if {"onnxruntime", "pytorch"} <= set(img):
        v = best(img["onnxruntime"])["throughput"] / best(img["pytorch"])["throughput"]
        add("direct ORT / PyTorch eager, image throughput", v, "(info)", True)
    for name in ("onnxruntime-int8", "triton-int8"):
        if {name, "pytorch"} <= set(img):
            v = best(img[name])["throughput"] / best(img["pytorch"])["throughput"]
            cpu_isa = doc["machine"].get("isa", "ISA not recorded")
            add(f"{name} / PyTorch eager fp32, image throughput [{cpu_isa}]", v, ">= 2", v >= 2)
    return rows


def report(doc: dict) -> str:
    lines = [
        f"machine: {doc['machine']['cpu']} ({doc['machine'].get('isa', 'ISA not recorded')})",
        f"model: {doc['config']}, {doc['image_gflop_per_request']:.1f} GFLOP per image "
        "request (prompt + image encoders + mask decoder)",
        "",
        "| system | path | concurrency | throughput /s | p50 ms | p99 ms | RSS MB |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for system, paths in doc["results"].items():
        for path, rows in paths.items():
            for x in rows:
                lines.append(
                    f"| {system} | {path} | {x['concurrency']} | "
                    f"{x['throughput']:.2f} | {x['p50_ms']:.1f} | {x['p99_ms']:.1f} | "
                    f"{x['rss_mb']:.0f} |"
                )
    lines += ["", "| ratio | measured | target | met |", "| --- | --- | --- | --- |"]
    for name, v, target, ok in ratios(doc):
        lines.append(f"| {name} | {v:.2f} | {target} | {'yes' if ok else 'NO'} |")
    peak = doc["machine"]["peak_gflops"]
    lines += [
        "",
        "| system | achieved GFLOP/s (image, saturation) | of fp32 peak |",
        "| --- | --- | --- |",
    ]
    for system, paths in doc["results"].items():
        g = best(paths["image"])["throughput"] * doc["image_gflop_per_request"]
        lines.append(f"| {system} | {g:.1f} | {g / peak:.1%} of {peak:.0f} |")
    return "\n".join(lines)


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for system, paths in doc["results"].items():
        rows = paths["image"]
        c = [x["concurrency"] for x in rows]
        a.plot(c, [x["throughput"] for x in rows], marker="o", label=system)
        b.plot(c, [x["p99_ms"] for x in rows], marker="o", label=system)
    a.set(xlabel="concurrency", ylabel="image requests / s", title="throughput")
    b.set(xlabel="concurrency", ylabel="p99 latency (ms)", title="p99 latency")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"MedP-CLIP {doc['config']} on CPU: {doc['machine']['cpu'][:60]}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python perf/benchmark.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default="base", help="model size (base: ViT-B/16, BERT-base)")
    p.add_argument("--seconds", type=float, default=8.0, help="measurement window per point")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--ort-threads", type=int, default=0, help="intra-op threads per encoder")
    p.add_argument(
        "--systems",
        nargs="+",
        default=list(DEFAULT_SYSTEMS),
        choices=SYSTEMS,
        help="what to measure (int8: the CPU INT8 flavour)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "build" / "bench")
    p.add_argument("--results", type=Path, default=ROOT / "perf" / "results")
    p.add_argument(
        "--suite",
        choices=("systems", "reuse"),
        default="systems",
        help="systems: the systems side by side (above); reuse: text at its length, cached "
        "label sets, encode once and prompt many (perf/reuse.py)",
    )
    p.add_argument(
        "--text-calls", type=int, default=20, help="reuse suite: text encoder calls timed per side"
    )
    p.add_argument(
        "--queue-delay-us",
        type=int,
        default=None,
        help="reuse suite: the export's dynamic batching delay (default: the export's)",
    )
    args = p.parse_args(argv)
    if args.suite == "reuse":
        import reuse

        return reuse.main(args)
    doc = run(args)
    text = report(doc)
    print("\n" + text)
    args.results.mkdir(parents=True, exist_ok=True)
    tag = args.config + ("-int8" if set(args.systems) & {"onnxruntime-int8", "triton-int8"} else "")
    (args.results / f"benchmark-{tag}.json").write_text(json.dumps(doc, indent=2))
    plot(doc, args.results / f"benchmark-{tag}.png")
    (args.results / f"benchmark-{tag}.md").write_text(text + "\n")
    print(f"\nsaved {args.results}/benchmark-{tag}.{{json,png,md}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
