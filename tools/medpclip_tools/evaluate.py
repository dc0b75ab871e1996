"""Evaluate the served model on held-out phantoms, through real Triton over gRPC.

    python -m medpclip_tools.evaluate --images 200 --seed 1000

Sends each phantom as a DICOM file (server-side decoding, window from the tags) with a point,
a box and a mask prompt on each finding, and with no prompt; prints region-level zero-shot
accuracy per prompt form (chance = 1 / number of labels), the no-prompt baseline, where
"which finding" can only be guessed, and the Dice of the served mask from a point and a box.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medpclip_client import MedPClipClient, Region

from .phantoms import CANONICAL, Finding, Phantom, phantoms, to_dicom

FORMS = ("point", "box", "mask")


def centre_point(f: Finding) -> tuple[float, float]:
    """The point a finding is prompted with (`Finding.centre`)."""
    return f.centre


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


@dataclass
class Scores:
    correct: dict[str, list[bool]] = field(default_factory=lambda: {k: [] for k in FORMS})
    no_prompt: list[bool] = field(default_factory=list)
    dice: dict[str, list[float]] = field(default_factory=lambda: {"point": [], "box": []})

    def summary(self) -> dict[str, float]:
        out = {f"accuracy_{k}": float(np.mean(v)) for k, v in self.correct.items()}
        out["accuracy_no_prompt"] = float(np.mean(self.no_prompt))
        out.update({f"dice_{k}": float(np.mean(v)) for k, v in self.dice.items()})
        out["findings"] = len(self.no_prompt)
        out["chance"] = 1 / len(CANONICAL)
        return out


def evaluate_one(client: MedPClipClient, p: Phantom, index: int, scores: Scores) -> None:
    data = to_dicom(p, index)
    plain = client.infer(data, None, labels=CANONICAL)
    for f in p.findings:
        scores.no_prompt.append(int(np.argmax(plain.region_probs)) == f.kind_index)
        regions = {
            "point": Region(points=[centre_point(f)]),
            "box": Region(box=f.box),
            "mask": Region(mask=f.mask.astype(np.uint8)),
        }
        for form, region in regions.items():
            r = client.infer(data, region, labels=CANONICAL)
            scores.correct[form].append(int(np.argmax(r.region_probs)) == f.kind_index)
            if form in scores.dice:
                scores.dice[form].append(dice(r.mask, f.mask))


def evaluate(url: str, images: int, seed: int, workers: int = 4) -> dict[str, float]:
    held_out = phantoms(seed, images)
    scores = Scores()
    with MedPClipClient(url) as client, ThreadPoolExecutor(workers) as pool:
        per_image = [Scores() for _ in held_out]
        list(
            pool.map(
                lambda i: evaluate_one(client, held_out[i], i, per_image[i]), range(len(held_out))
            )
        )
    for s in per_image:  # merge in image order: the result does not depend on scheduling
        for k in FORMS:
            scores.correct[k] += s.correct[k]
        scores.no_prompt += s.no_prompt
        for k in scores.dice:
            scores.dice[k] += s.dice[k]
    return scores.summary()


def report(s: dict[str, float]) -> str:
    lines = [
        f"held-out findings: {s['findings']}  (labels: {len(CANONICAL)}, chance {s['chance']:.0%})",
        "region-level zero-shot accuracy:",
    ]
    for k in FORMS:
        lines.append(f"  {k:9s} prompt  {s[f'accuracy_{k}']:.1%}")
    lines.append(
        f"  no prompt        {s['accuracy_no_prompt']:.1%}  (which finding? "
        "the whole-image answer is the same for every finding of a slice)"
    )
    lines.append("interactive segmentation Dice:")
    for k in ("point", "box"):
        lines.append(f"  {k:9s} prompt  {s[f'dice_{k}']:.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m medpclip_tools.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--images", type=int, default=200, help="held-out phantoms")
    p.add_argument("--seed", type=int, default=1000, help="held-out seed (training used 0)")
    p.add_argument(
        "--url",
        help="a running server's gRPC host:port; default: export the default model and start one",
    )
    p.add_argument("--out", type=Path, default=Path("build"))
    p.add_argument("--json", action="store_true", help="print the scores as JSON")
    args = p.parse_args(argv)
    if args.url:
        scores = evaluate(args.url, args.images, args.seed)
    else:
        from medpclip import export

        from .serve import ServeProcess

        try:
            export.export(out=args.out, skip_parity=True)
        except export.ExportError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        with ServeProcess(args.out / "model_repository") as server:
            scores = evaluate(server.grpc_url, args.images, args.seed)
    print(json.dumps(scores, indent=2) if args.json else report(scores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
