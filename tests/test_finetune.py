"""Fine-tuning on a manifest (`python -m medpclip_tools.finetune`), scored through the real server.

A fresh seeded `tiny` is the start checkpoint: it knows nothing (Dice ~0), so what fine-tuning
learns shows, and the tests do not depend on which default model is embedded.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medpclip import export
from medpclip.config import ModelConfig
from medpclip.model import build, load_checkpoint, save_checkpoint
from medpclip.tokenizer import DEFAULT_TOKENIZER
from medpclip_core import inputs
from medpclip_core.imaging import pixels_to_image
from medpclip_core.labels import load_tokenizer
from medpclip_tools import finetune
from medpclip_tools import manifest as M
from medpclip_tools import phantoms as P

COUNT, SEED = 16, 7  # phantoms of the manifest: DICOM and PNG in turn


@pytest.fixture(scope="module")
def start(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("start")
    return save_checkpoint(build(ModelConfig.load("tiny"), seed=0), out, DEFAULT_TOKENIZER)


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantoms")
    assert P.main(["--manifest", str(out), "--count", str(COUNT), "--seed", str(SEED),
                   "--format", "mixed"]) == 0  # fmt: skip
    return out


def lines_of(phantom_dir: Path) -> list[dict]:
    return [json.loads(s) for s in (phantom_dir / "manifest.jsonl").read_text().splitlines()]


def write_lines(path: Path, lines: list[dict | str]) -> Path:
    path.write_text("\n".join(s if isinstance(s, str) else json.dumps(s) for s in lines) + "\n")
    return path


# --- the phantom manifest writer --------------------------------------------------------------


def test_phantom_manifest_holds_the_phantoms_as_the_server_decodes_them(phantom_dir):
    ps = P.phantoms(SEED, COUNT)
    lines = lines_of(phantom_dir)
    assert len(lines) == sum(len(p.findings) for p in ps)
    man = M.read_manifest(phantom_dir / "manifest.jsonl")
    assert man.labels == sorted(P.CANONICAL)
    forms = {r.prompt_form for r in man.regions}
    assert forms == {"box", "points", "mask"}
    k = 0
    for i, p in enumerate(ps):
        data = (phantom_dir / lines[k]["image"]).read_bytes()
        served = inputs.decode(data)
        windowed = pixels_to_image(p.hu.astype(np.float32), P.WINDOW)
        if i % 2 == 0:  # DICOM: window from its tags, exactly
            assert lines[k]["image"].endswith(".dcm") and np.array_equal(served, windowed)
        else:  # 8-bit PNG in the same window
            assert lines[k]["image"].endswith(".png")
            assert np.abs(served - windowed).max() <= 0.5 / 255 + 1e-6
        for f in p.findings:
            line = lines[k]
            assert line["label"] == f.label
            assert np.array_equal(M.load_mask(phantom_dir / line["mask"]), f.mask)
            if "box" in line:
                assert tuple(line["box"]) == f.box
            if "points" in line:
                (x, y), = line["points"]  # fmt: skip
                assert f.mask[int(y), int(x)]
            k += 1


# --- bad manifests: exit 2, the line named, nothing trained -----------------------------------


def _png(shape: tuple[int, int], on: bool = True) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full(shape, 255 if on else 0, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


BAD = {
    "not JSON": ('{"image": "images/phantom-00000.dcm", "label": "x", "box": [1, 2, 3', "not JSON"),
    "missing image": ({"image": "images/nope.dcm", "label": "x", "box": [1, 1, 9, 9]},
                      "image 'images/nope.dcm' not found"),
    "missing mask": ({"image": "images/phantom-00001.png", "label": "x", "mask": "m/nope.png"},
                     "mask 'm/nope.png' not found"),
    "no region": ({"image": "images/phantom-00000.dcm", "label": "x"}, "no region"),
    "box outside": ({"image": "images/phantom-00000.dcm", "label": "x", "box": [5, 5, 999, 20]},
                    "outside the"),
    "point outside": ({"image": "images/phantom-00001.png", "label": "x",
                       "points": [[3, 3], [-1, 4]]}, "point 1 is outside"),
    "mask size": ({"image": "images/phantom-00000.dcm", "label": "x", "mask": "small.png"},
                  "mask 'small.png' is 10x12 but its image is"),
    "empty mask": ({"image": "images/phantom-00000.dcm", "label": "x", "mask": "empty.png"},
                   "is empty"),
    "empty label": ({"image": "images/phantom-00000.dcm", "label": "  ", "box": [1, 1, 9, 9]},
                    "empty 'label'"),
    "unknown key": ({"image": "images/phantom-00000.dcm", "label": "x", "box": [1, 1, 9, 9],
                     "spilt": "val"}, "unknown key(s) 'spilt'"),
    "bad split": ({"image": "images/phantom-00000.dcm", "label": "x", "box": [1, 1, 9, 9],
                   "split": "test"}, "'split' must be one of train, val"),
    "unreadable image": ({"image": "broken.dcm", "label": "x", "box": [1, 1, 9, 9]},
                         "image 'broken.dcm':"),
    "split straddles": ({"image": "images/phantom-00000.dcm", "label": "x", "box": [1, 1, 9, 9],
                         "split": "val"}, "has regions in both splits (lines 1, 3)"),
    "label too long": ({"image": "images/phantom-00000.dcm", "label": " ".join(["word"] * 40),
                        "box": [1, 1, 9, 9]}, "the label is"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_manifest_exits_2_naming_the_line(case, phantom_dir, start, tmp_path, capsys):
    good = lines_of(phantom_dir)[:2]  # both on phantom-00000.dcm
    good[0]["split"] = "train"
    bad, problem = BAD[case]
    folder = phantom_dir  # relative paths resolve against the manifest's folder
    (folder / "small.png").write_bytes(_png((12, 10)))
    h, w = P.phantoms(SEED, 1)[0].hu.shape
    (folder / "empty.png").write_bytes(_png((h, w), on=False))
    dicom = P.to_dicom(P.phantoms(SEED, 1)[0])
    (folder / "broken.dcm").write_bytes(dicom[: len(dicom) // 2])  # a truncated file
    path = write_lines(folder / f"bad-{case.replace(' ', '-')}.jsonl", [*good, bad])
    out = tmp_path / "out"
    code = finetune.main([str(path), "--from", str(start), "--out", str(out), "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"{path.name} line 3: " in err and problem in err, err
    assert "PHANTOM" not in err  # never a DICOM tag value (PatientName, PatientID)
    assert not out.exists()  # failed before training


def test_bad_arguments_exit_2(phantom_dir, start, tmp_path, capsys):
    man = str(phantom_dir / "manifest.jsonl")
    assert finetune.main([man, "--from", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    assert "not a checkpoint folder" in capsys.readouterr().err
    assert finetune.main([man, "--from", str(start), "--out", str(start)]) == 2
    assert "--out is the --from checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        finetune.main([man, "--from", str(start), "--out", str(tmp_path), "--holdout", "1"])
    assert exc.value.code == 2
    all_val = tmp_path / "all-val.jsonl"
    write_lines(all_val, [{**s, "image": str(phantom_dir / s["image"]),
                           "mask": str(phantom_dir / s["mask"]), "split": "val"}
                          for s in lines_of(phantom_dir)[:3]])  # fmt: skip
    assert finetune.main([str(all_val), "--from", str(start), "--out", str(tmp_path / "o")]) == 2
    assert "no training regions" in capsys.readouterr().err


# --- splits ---------------------------------------------------------------------------------


def _sides(data: finetune.Data) -> tuple[set[int], set[int]]:
    return {it.image for it in data.train}, {it.image for it in data.val}


def test_split_fields_are_honoured(phantom_dir, start):
    lines = lines_of(phantom_dir)
    images = list(dict.fromkeys(s["image"] for s in lines))
    chosen = {images[1]: "val", images[2]: "train", images[5]: "val"}
    for name, side in chosen.items():  # on one line of the image: it applies to all its lines
        next(s for s in lines if s["image"] == name)["split"] = side
    path = write_lines(phantom_dir / "split.jsonl", lines)
    man = M.read_manifest(path)
    model = load_checkpoint(start)
    tok = load_tokenizer(start / "tokenizer.json", model.cfg.text.context_length)
    for seed in range(4):  # the images without split fields are held out at random, seeded
        splits = M.assign_splits(man, 0.25, seed)
        data = finetune.prepare_data(man, splits, model, tok)
        train, val = _sides(data)
        assert not train & val and len(train | val) == COUNT
        for name, side in chosen.items():
            assert images.index(name) in (val if side == "val" else train)
        free = COUNT - len(chosen)
        assert len(val) == 2 + round(0.25 * free)
    assert M.assign_splits(man, 0.25, 0) != M.assign_splits(man, 0.25, 1)


def test_regions_of_one_image_never_straddle_train_and_val(phantom_dir, start):
    man = M.read_manifest(phantom_dir / "manifest.jsonl")
    model = load_checkpoint(start)
    tok = load_tokenizer(start / "tokenizer.json", model.cfg.text.context_length)
    seen = set()
    for seed in range(6):
        splits = M.assign_splits(man, 0.3, seed)
        data = finetune.prepare_data(man, splits, model, tok)
        train, val = _sides(data)
        assert not train & val and len(train | val) == COUNT
        assert len(val) == round(0.3 * COUNT)
        assert len(data.train) + len(data.val) == len(man.regions)
        seen.add(frozenset(val))
    assert len(seen) > 1  # the seed chooses


# --- training -------------------------------------------------------------------------------


def test_region_mode_trains_only_the_region_parts_on_a_cached_trunk(
    phantom_dir, start, tmp_path, monkeypatch
):
    from medpclip.modeling import ImageEncoder

    calls = []
    trunk = ImageEncoder.forward_trunk
    monkeypatch.setattr(
        ImageEncoder, "forward_trunk", lambda self, x: calls.append(len(x)) or trunk(self, x)
    )
    out = tmp_path / "ckpt"
    man = str(phantom_dir / "manifest.jsonl")
    args = ["--steps", "4", "--batch", "8", "--evaluate", "none"]
    code = finetune.main([man, "--from", str(start), "--out", str(out), *args])
    assert code == 0
    assert calls == [COUNT]  # every image through the trunk once, in one batch, then cached
    before, after = load_checkpoint(start).state_dict(), load_checkpoint(out).state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    region = ("prompt_encoder.", "mask_decoder.") + tuple(
        f"image_encoder.{p}" for p in finetune.REGION_PARTS
    )
    assert changed and all(k.startswith(region) for k in changed), sorted(changed)
    assert any(k.startswith("image_encoder.gates") for k in changed)
    record = json.loads((out / "finetune.json").read_text())
    assert record["unfreeze"] == "region" and record["steps"] == 4
    assert record["logit_scale_trained"] is False and record["held_out"] == {}


def test_minutes_stops_training_first(phantom_dir, start, tmp_path, capsys):
    out = tmp_path / "ckpt"
    code = finetune.main([str(phantom_dir / "manifest.jsonl"), "--from", str(start), "--out",
                          str(out), "--steps", "100000", "--batch", "4", "--minutes", "0.003",
                          "--evaluate", "reference"])  # fmt: skip
    assert code == 0
    record = json.loads((out / "finetune.json").read_text())
    assert record["stopped_by"] == "minutes" and 1 <= record["steps"] < 100000
    assert "--minutes 0.003 of CPU time used" in capsys.readouterr().out
    held = record["held_out"]
    assert set(held) == {"before_reference", "after_reference"}
    assert held["after_reference"]["chance"] == 0.25


SERVED = re.compile(r"after \(served: tritonserver, gRPC\)\s+accuracy\s+([\d.]+)%\s+Dice ([\d.]+)")


def test_finetune_then_served_scores_and_the_checkpoint_exports(phantom_dir, start, tmp_path):
    """The command as users run it: exit 0, progress, held-out accuracy and Dice from a real
    tritonserver serving the fine-tuned checkpoint, which then loads and exports as is."""
    out = tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "medpclip_tools.finetune", str(phantom_dir / "manifest.jsonl"),
           "--from", str(start), "--out", str(out), "--unfreeze", "prompted", "--steps", "120",
           "--batch", "16", "--lr", "3e-3", "--holdout", "0.25", "--log-every", "40"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[   40/120]" in proc.stdout and "[  120/120]" in proc.stdout
    match = SERVED.search(proc.stdout)
    assert match, proc.stdout
    record = json.loads((out / "finetune.json").read_text())
    held = record["held_out"]
    served, ref, before = held["after_served"], held["after_reference"], held["before_reference"]
    assert float(match[1]) == pytest.approx(100 * served["accuracy"], abs=0.051)
    assert float(match[2]) == pytest.approx(served["dice"], abs=0.0005)
    assert served["regions"] == record["regions"]["val"] == served["dice_regions"] > 0
    assert record["manifest_sha256"] == M.read_manifest(phantom_dir / "manifest.jsonl").sha256
    # the server answered with the fine-tuned weights: as PyTorch does, far from the start
    assert abs(served["accuracy"] - ref["accuracy"]) <= 1 / served["regions"] + 1e-9, held
    assert abs(served["dice"] - ref["dice"]) <= 0.02, held
    assert served["dice"] >= before["dice"] + 0.2, held
    assert record["final_training_ema"]["acc"] >= 0.5, record  # above chance (0.25)

    # what was frozen stayed bit-identical; the checkpoint exports as is
    a, b = load_checkpoint(start).state_dict(), load_checkpoint(out).state_dict()
    frozen = [k for k in a if torch.equal(a[k], b[k])]
    trunk = ("text_encoder.", "logit_scale", "image_encoder.blocks.0.", "image_encoder.blocks.1.",
             "image_encoder.patch_embed.", "image_encoder.pos_embed")  # fmt: skip
    assert {k for k in a if k.startswith(trunk)} <= set(frozen)
    assert "image_encoder.proj.weight" not in frozen
    assert not all(k in frozen for k in a if k.startswith("image_encoder.blocks.3."))
    build_dir = tmp_path / "build"
    assert export.main(["--checkpoint", str(out), "--out", str(build_dir), "--skip-parity"]) == 0
    assert (build_dir / "model_repository" / "medp_clip" / "config.pbtxt").is_file()
