"""The README demo: export the default model, build the repository, start Triton, ask it about a
region of a CT slice through the client CLI, print the answer, stop.

    python -m medpclip.demo            (what `make demo` runs)
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from medpclip_client import cli

from . import export
from .real_inputs import sample_dicom
from .serve import TritonServer

REPO = Path(__file__).resolve().parents[2]
LABELS = [
    "a round hyperdense nodule",
    "a dark cyst",
    "a spiculated mass",
    "a calcification",
    "normal tissue",
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m medpclip.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=REPO / "build", help="build folder")
    args = p.parse_args(argv)

    print("== 1. export (ONNX, parity, repository) ==")
    if export.main(["--out", str(args.out)]) != 0:
        return 1
    demo = args.out / "demo"
    demo.mkdir(parents=True, exist_ok=True)
    image = demo / "CT_small.dcm"  # pydicom's bundled CT slice: 128x128, HU via rescale tags
    image.write_bytes(sample_dicom())
    trained = (export.DEFAULT_CHECKPOINT / "config.json").is_file()

    print("\n== 2. start Triton (bundled tritonserver, python backend, 127.0.0.1) ==")
    with TritonServer(args.out / "model_repository") as server:
        print(f"ready: gRPC {server.grpc_url}")
        prompts = {"point": ["--point", "62,70"], "box": ["--box", "40,50,90,100"]}
        for step, (name, region) in zip("ab", prompts.items(), strict=True):
            argv_cli = [
                str(image),
                *region,
                "--url",
                server.grpc_url,
                "--save-mask",
                str(demo / f"mask_{name}.png"),
                "--labels",
                *LABELS,
            ]
            print(f"\n== 3{step}. query with a {name} prompt ==")
            print("$ medpclip-client " + shlex.join(argv_cli))
            if cli.main(argv_cli) != 0:
                return 1
    print("\n== 4. server stopped ==")
    if not trained:
        print(
            "note: no embedded trained model yet, so the weights are a seeded random "
            "initialisation: the pipeline is real, the probabilities are not meaningful."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
