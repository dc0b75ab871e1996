"""The README demo: export the embedded default model, build the repository, start Triton, point
at each of two findings on a phantom CT slice through the client CLI, print the answers, save a
mask overlay, stop.

    python -m medpclip_tools.demo            (what `make demo` runs)
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from medpclip import export
from medpclip_client import cli
from medpclip_core import inputs

from .evaluate import centre_point
from .phantoms import CANONICAL, WINDOW, Phantom, phantoms, to_dicom
from .serve import ServeProcess

COLOURS = [(230, 60, 60), (60, 200, 90), (70, 130, 240)]


def overlay(p: Phantom, masks: list[np.ndarray], points: list[tuple[float, float]]) -> Image.Image:
    """The slice in its window (decoded as the server decodes it), each served mask tinted, each
    clicked point as a white cross."""
    grey = inputs.decode(p.hu.astype(np.float32), WINDOW)
    rgb = (grey * 255).astype(np.float32)
    for mask, colour in zip(masks, COLOURS, strict=False):
        m = mask.astype(bool)
        rgb[m] = 0.55 * rgb[m] + 0.45 * np.array(colour, np.float32)
    out = rgb.astype(np.uint8)
    for x, y in points:
        xi, yi = int(x), int(y)
        out[max(0, yi - 3) : yi + 4, xi] = 255
        out[yi, max(0, xi - 3) : xi + 4] = 255
    return Image.fromarray(out).resize((p.hu.shape[1] * 3, p.hu.shape[0] * 3), Image.NEAREST)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m medpclip_tools.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("build"), help="build folder")
    args = p.parse_args(argv)

    print("== 1. export (ONNX, parity, repository) ==")
    try:
        export.export(out=args.out)
    except export.ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    demo = args.out / "demo"
    demo.mkdir(parents=True, exist_ok=True)
    phantom = phantoms(seed=2024, count=1)[0]  # never seen in training (seed 0)
    image = demo / "phantom.dcm"
    image.write_bytes(to_dicom(phantom))
    findings = phantom.findings[:2]
    h, w = phantom.hu.shape
    print(
        f"\nphantom CT slice {w}x{h} (DICOM, HU via rescale tags) with "
        + " and ".join(
            f"{f.label} at x {f.box[0]:.0f}-{f.box[2]:.0f}, y {f.box[1]:.0f}-{f.box[3]:.0f}"
            for f in findings
        )
    )

    print(
        "\n== 2. start the server (python -m medpclip_tools.serve: gateway + Triton, 127.0.0.1) =="
    )
    masks, points = [], []
    with ServeProcess(args.out / "model_repository") as server:
        print(server.ready_line)
        for step, f in zip("ab", findings, strict=True):
            x, y = centre_point(f)
            mask_path = demo / f"mask_{step}.png"
            argv_cli = [
                str(image),
                "--point",
                f"{x:.1f},{y:.1f}",
                "--url",
                server.grpc_url,
                "--save-mask",
                str(mask_path),
                "--labels",
                *CANONICAL,
            ]
            print(f"\n== 3{step}. point at the {f.kind} (the truth: {f.label}) ==")
            print("$ medpclip-client " + shlex.join(argv_cli))
            if cli.main(argv_cli) != 0:
                return 1
            masks.append(np.asarray(Image.open(mask_path)) > 0)
            points.append((x, y))
    print("\n== 4. server stopped ==")
    overlay(phantom, masks, points).save(demo / "overlay.png")
    print(f"mask overlay saved to {demo / 'overlay.png'}")
    if not (export.DEFAULT_CHECKPOINT / "config.json").is_file():
        print(
            "note: no embedded trained model found, so the weights are a seeded random "
            "initialisation: the pipeline is real, the probabilities are not meaningful."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
