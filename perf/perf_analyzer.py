"""perf_analyzer recipes for every model and ensemble of the repository.

    python perf/perf_analyzer.py sweep                    # local server, all models, CSV + table
    python perf/perf_analyzer.py sweep --url HOST:8001 --models medp_clip image_encoder
    python perf/perf_analyzer.py inputs --out build/perf  # only write the input-data JSON files

perf_analyzer comes from the `tritonclient` 2.51.0 wheel (same release as the server); it needs
`libb64.so.0d` and `libcudart.so.12`, which the `nvidia-pytriton` wheel carries: `binary()` links
them into build/perf/lib. Inputs are real: a phantom CT slice (DICOM) with a point prompt and
the four finding labels for the ensembles; for each composing model, the tensors the pipeline
really feeds it (computed by the PyTorch model on the same slice).

On a GPU deployment run the same sweep against its gRPC endpoint (`--url`), or NVIDIA's SDK
container: `perf_analyzer -m medp_clip -u HOST:8001 -i grpc --input-data medp_clip.json
--concurrency-range 1:16:2 -f medp_clip.csv`.
"""

from __future__ import annotations

import argparse
import base64
import csv
import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np

from medpclip_core import tensors as T

ROOT = Path(__file__).resolve().parents[1]
# every model of the repository, from the one declaration
ALL_MODELS = tuple(spec.name for spec in T.ALL_MODELS)


def binary(out: Path) -> tuple[Path, dict[str, str]]:
    """The perf_analyzer executable and the environment it runs in."""
    exe = shutil.which("perf_analyzer") or str(Path(sys.executable).parent / "perf_analyzer")
    if not Path(exe).is_file():
        raise SystemExit(
            "perf_analyzer not found: pip install tritonclient[grpc]==2.51.0 "
            "(its manylinux wheel carries the binary)"
        )
    libs = Path(sysconfig.get_paths()["purelib"]) / "nvidia_pytriton.libs"
    lib = out / "lib"
    lib.mkdir(parents=True, exist_ok=True)
    for pattern, name in (
        ("libb64-*.so.0d", "libb64.so.0d"),
        ("libcudart-*.so.12*", "libcudart.so.12"),
    ):
        found = sorted(glob.glob(str(libs / pattern)))
        if not found:
            raise SystemExit(f"{pattern} not found in {libs}: pip install nvidia-pytriton==0.7.0")
        link = lib / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(found[0])
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = f"{lib}:{env.get('LD_LIBRARY_PATH', '')}"
    return Path(exe), env


def _entry(value: np.ndarray) -> dict:
    if value.dtype == object:
        items = [v if isinstance(v, bytes) else str(v).encode() for v in value.reshape(-1)]
        if len(items) == 1:  # binary (a DICOM file): b64 of Triton's serialized BYTES tensor
            raw = b"".join(len(v).to_bytes(4, "little") + v for v in items)
            return {"b64": base64.b64encode(raw).decode(), "shape": list(value.shape)}
        return {"content": [v.decode() for v in items], "shape": list(value.shape)}
    return {"content": value.reshape(-1).tolist(), "shape": list(value.shape)}


def real_tensors(checkpoint: Path | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Per model: the inputs a real request feeds it (batch axis dropped for batched models)."""
    from medpclip.export import DEFAULT_CHECKPOINT
    from medpclip.model import load_checkpoint
    from medpclip.reference import embed_text, forward, trunk
    from medpclip_core.inputs import prepare
    from medpclip_core.labels import load_tokenizer
    from medpclip_tools.evaluate import centre_point
    from medpclip_tools.phantoms import CANONICAL, phantoms, to_dicom

    checkpoint = checkpoint or DEFAULT_CHECKPOINT
    model = load_checkpoint(checkpoint)
    cfg = model.cfg
    p = phantoms(seed=777, count=1)[0]
    dicom = to_dicom(p)
    point = np.array([centre_point(p.findings[0])], np.float32)
    labels = np.array([s.encode() for s in CANONICAL], dtype=object)
    tok = load_tokenizer(checkpoint / "tokenizer.json", cfg.text.context_length)
    x = prepare(
        dicom, cfg.vision.image_size, cfg.dims.M, points=point, labels=labels, tokenizer=tok
    )
    o = forward(model, x.image_arrays())
    text = embed_text(model, x.text_arrays())
    tokens = trunk(model, x.pixel_values)[0]  # what medp_clip_encode returns
    image = {"IMAGE": np.array([dicom], dtype=object), "POINTS": point}
    per_item = {  # batched models: one item, no batch axis
        "prompt_encoder": {k: v[0] for k, v in x.prompt_arrays().items()},
        "image_encoder": {
            "pixel_values": x.pixel_values[0],
            "dense_embeddings": o["dense_embeddings"][0],
            "region_map": o["region_map"][0],
        },
        "mask_decoder": {
            "patch_features": o["patch_features"][0],
            "sparse_embeddings": o["sparse_embeddings"][0],
            "dense_embeddings": o["dense_embeddings"][0],
        },
        "text_encoder": {k: v[0] for k, v in x.text_arrays().items()},
        "image_trunk": {"pixel_values": x.pixel_values[0]},
        "image_prompted": {
            "image_tokens": tokens,
            "dense_embeddings": o["dense_embeddings"][0],
            "region_map": o["region_map"][0],
        },
    }
    encoded = {"IMAGE_TOKENS": tokens, "TRANSFORM": x.transform.as_array(), "POINTS": point}
    tensors = {
        "medp_clip": {**image, "LABELS": labels},
        "medp_clip_image": image,
        "medp_clip_text": {"LABELS": labels},
        "medp_clip_encode": {"IMAGE": image["IMAGE"]},
        "medp_clip_prompt": {**encoded, "LABELS": labels},
        "medp_clip_prompt_image": encoded,
        "prompt_preprocess": {**encoded, "LABELS": labels},
        "preprocess": {**image, "LABELS": labels},
        "tokenizer": {"LABELS": labels},
        "postprocess": {
            "global_embedding": o["global_embedding"],
            "region_embedding": o["region_embedding"],
            "patch_features": o["patch_features"],
            "text_embedding": text,
            "mask_logits": o["mask_logits"],
            "iou": o["iou"],
            "transform": x.transform.as_array(),
        },
        **per_item,
    }
    for name, feed in tensors.items():  # every name must be a declared input
        declared = {t.name for t in T.spec(name).inputs}
        assert set(feed) <= declared, (name, set(feed) - declared)
    return tensors


def write_inputs(out: Path, checkpoint: Path | None = None) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, feed in real_tensors(checkpoint).items():
        path = out / f"{name}.json"
        path.write_text(json.dumps({"data": [{k: _entry(np.asarray(v)) for k, v in feed.items()}]}))
        files[name] = path
    return files


def sweep(
    url: str,
    models: list[str],
    inputs: dict[str, Path],
    out: Path,
    concurrency: str = "1:4",
    interval_ms: int = 2000,
) -> list[dict]:
    exe, env = binary(out)
    rows = []
    for name in models:
        csv_path = out / f"{name}.csv"
        cmd = [
            str(exe),
            "-m",
            name,
            "-u",
            url,
            "-i",
            "grpc",
            "--input-data",
            str(inputs[name]),
            "--concurrency-range",
            concurrency,
            "--measurement-interval",
            str(interval_ms),
            "--percentile",
            "99",
            "-f",
            str(csv_path),
            # shared 2-core machines are noisy: accept a 30 % spread, try longer
            "--stability-percentage",
            "30",
            "--max-trials",
            "20",
        ]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            tail = "\n".join((r.stdout + r.stderr).splitlines()[-15:])
            raise SystemExit(f"perf_analyzer failed on {name}:\n{tail}")
        with open(csv_path) as f:
            for row in csv.DictReader(f):
                rows.append(
                    {
                        "model": name,
                        "concurrency": int(row["Concurrency"]),
                        "throughput": float(row["Inferences/Second"]),
                        "p50_ms": float(row["p50 latency"]) / 1000,
                        "p99_ms": float(row["p99 latency"]) / 1000,
                    }
                )
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'model':18s} {'conc':>4s} {'infer/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s}"]
    lines += [
        f"{r['model']:18s} {r['concurrency']:4d} {r['throughput']:9.1f} "
        f"{r['p50_ms']:8.1f} {r['p99_ms']:8.1f}"
        for r in rows
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python perf/perf_analyzer.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("command", choices=("sweep", "inputs"))
    p.add_argument("--url", help="gRPC host:port of a running server (default: start one)")
    p.add_argument("--models", nargs="+", default=list(ALL_MODELS), choices=ALL_MODELS)
    p.add_argument("--concurrency-range", default="1:4", help="perf_analyzer start:end[:step]")
    p.add_argument("--measurement-interval", type=int, default=2000, help="ms per measurement")
    p.add_argument("--out", type=Path, default=ROOT / "build" / "perf")
    p.add_argument("--checkpoint", type=Path, default=None)
    args = p.parse_args(argv)
    inputs = write_inputs(args.out / "inputs", args.checkpoint)
    if args.command == "inputs":
        print("\n".join(str(v) for v in inputs.values()))
        return 0
    if args.url:
        rows = sweep(
            args.url,
            args.models,
            inputs,
            args.out,
            args.concurrency_range,
            args.measurement_interval,
        )
    else:
        from medpclip import export
        from medpclip_tools.serve import TritonServer

        build = ROOT / "build"
        try:
            export.export(out=build, skip_parity=True)
        except export.ExportError:
            return 1
        with TritonServer(build / "model_repository") as server:
            rows = sweep(
                server.grpc_url,
                args.models,
                inputs,
                args.out,
                args.concurrency_range,
                args.measurement_interval,
            )
    print(table(rows))
    (args.out / "sweep.json").write_text(json.dumps(rows, indent=2))
    print(f"CSV per model and sweep.json in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
