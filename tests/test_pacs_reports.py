"""The PACS bridge's DICOM building blocks without a server or archive: mask outlines, what is
copied from a source (and what is not), the model identity, and that no library warning or log
record carrying a patient attribute escapes while the objects are built."""

from __future__ import annotations

import logging
import shutil
import warnings

import numpy as np
import pytest

from medpclip import repository
from medpclip.config import DEFAULT_CHECKPOINT
from medpclip_client import client
from medpclip_client.pacs import reports
from medpclip_client.pacs.bridge import RegionPrompt, Request
from medpclip_client.pacs.geometry import largest_component, outline
from medpclip_client.pacs.reports import (
    Finding,
    ModelIdentity,
    build_reports,
    check_seg_possible,
    evidence_copy,
    mask_outline,
    redact,
    region_graphic,
)
from medpclip_core.tensors import ENSEMBLES

IDENTITY = ModelIdentity("MedP-CLIP", "tiny", "ab" * 32, "0.1.0", "0.1.0")


def _testfile(name: str):
    import pydicom
    from pydicom.data import get_testdata_file

    return pydicom.dcmread(get_testdata_file(name))


def _inside(polygon: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Pixel centres inside a closed polygon (even-odd rule)."""
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]] + 0.5
    inside = np.zeros(shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(polygon[:-1], polygon[1:], strict=True):
        if y0 != y1:
            crosses = (y0 > ys) != (y1 > ys)
            inside ^= crosses & (xs < x0 + (ys - y0) * (x1 - x0) / (y1 - y0))
    return inside


def _outside(part: np.ndarray) -> np.ndarray:
    """The background 8-connected to the image border (a flood fill)."""
    h, w = part.shape
    seen = np.zeros(part.shape, dtype=bool)
    todo = [(r, c) for r in range(h) for c in range(w) if r in (0, h - 1) or c in (0, w - 1)]
    while todo:
        r, c = todo.pop()
        if 0 <= r < h and 0 <= c < w and not seen[r, c] and not part[r, c]:
            seen[r, c] = True
            todo += [(r + dr, c + dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1)]
    return seen


# --- outlines ------------------------------------------------------------------------------------


def test_outline_follows_pixel_edges_and_closes():
    mask = np.zeros((6, 6), bool)
    mask[1:4, 1:3] = True
    mask[3, 3] = True  # an L: six corners
    got = outline(mask)
    assert got.tolist() == [[1, 1], [3, 1], [3, 3], [4, 3], [4, 4], [1, 4], [1, 1]]
    assert outline(np.zeros((3, 3), bool)) is None
    assert mask_outline(np.zeros((3, 3))) is None


def test_outline_encloses_exactly_the_largest_part_and_its_holes():
    rng = np.random.default_rng(14)
    for _ in range(200):
        shape = tuple(int(v) for v in rng.integers(1, 24, 2))
        mask = rng.random(shape) < rng.random()
        part = largest_component(mask)
        polygon = outline(mask)
        if part is None:
            assert polygon is None and not mask.any()
            continue
        assert (polygon[0] == polygon[-1]).all()
        # exactly the part with its holes filled: the background the border does not reach
        # (8-connected: where the part touches itself at a corner only, background passes)
        assert (_inside(polygon, shape) == ~_outside(part)).all()


def test_parts_touching_at_a_corner_are_separate_and_the_largest_wins():
    mask = np.zeros((5, 5), bool)
    mask[0, 0] = True
    mask[1:4, 1:4] = True  # touches the first at a corner only: not 4-connected
    assert outline(mask).tolist() == [[1, 1], [4, 1], [4, 4], [1, 4], [1, 1]]


def test_prompt_graphics():
    assert region_graphic([(3, 4)], None, 10, 10).graphic_type == "POINT"
    several = region_graphic([(3, 4), (5, 6)], None, 10, 10)
    assert several.graphic_type == "MULTIPOINT" and several.data.tolist() == [[3, 4], [5, 6]]
    box = region_graphic(None, (1, 2, 5, 6), 10, 10)
    assert box.data.tolist() == [[1, 2], [5, 2], [5, 6], [1, 6], [1, 2]]
    mask = np.zeros((10, 10), np.uint8)
    mask[2:4, 3:7] = 1
    assert region_graphic(None, None, 10, 10, mask).data.tolist() == outline(mask).tolist()


# --- what is copied from a source ----------------------------------------------------------


def test_invalid_optional_patient_attributes_are_not_copied():
    ct = _testfile("CT_small.dcm")  # Patient's Weight 0
    assert float(ct.PatientWeight) == 0
    ev = evidence_copy(ct)
    assert "PatientWeight" not in ev and "PixelData" not in ev
    assert (ev.PatientName, ev.PatientID, ev.StudyInstanceUID) == (
        ct.PatientName,
        ct.PatientID,
        ct.StudyInstanceUID,
    )
    mr = _testfile("MR_small.dcm")  # a reading physician of the retired form "----"
    ev = evidence_copy(mr)
    assert "NameOfPhysiciansReadingStudy" not in ev and float(ev.PatientWeight) == 80
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about these invalid values: the point
        ct.StudyDate, ct.PatientAge, ct.PatientSex = "20041399", "12 years", "X"
    ev = evidence_copy(ct)
    assert not ev.StudyDate and not ev.PatientSex and "PatientAge" not in ev  # type 2: empty


def test_identity_removed_is_copied_only_with_its_method():
    j2k = _testfile("693_J2KI.dcm")  # YES, without a method: dciodvfy's error in the source
    assert j2k.PatientIdentityRemoved == "YES" and "DeidentificationMethod" not in j2k
    assert "PatientIdentityRemoved" not in evidence_copy(j2k)
    j2k.DeidentificationMethod = "CTP basic profile"
    ev = evidence_copy(j2k)
    assert (ev.PatientIdentityRemoved, ev.DeidentificationMethod) == ("YES", "CTP basic profile")


def test_the_source_is_left_untouched():
    ct = _testfile("CT_small.dcm")
    before = ct.to_json_dict()
    build_reports(ct, [_finding()], IDENTITY, masks=[_mask(ct)])
    assert ct.to_json_dict() == before


def _mask(ds) -> np.ndarray:
    mask = np.zeros((int(ds.Rows), int(ds.Columns)), np.uint8)
    mask[10:30, 20:40] = 1
    return mask


def _finding(mask: np.ndarray | None = None) -> Finding:
    return Finding(
        label="a nodule",
        probability=0.9,
        image_probability=0.4,
        iou=0.8,
        graphic=region_graphic([(12, 14), (20, 22)], None, 128, 128),
        outline=mask_outline(mask),
    )


def test_seg_possible_is_said_before_inference():
    assert "Frame Of Reference" in (check_seg_possible(_testfile("693_J2KI.dcm")) or "")
    assert check_seg_possible(_testfile("CT_small.dcm")) is None
    us = _testfile("examples_ybr_color.dcm")  # legacy multi-frame: one frame referenced
    assert check_seg_possible(us, 2) is None


# --- model identity ------------------------------------------------------------------------------


def test_identity_keys_are_one_list():
    assert repository.IDENTITY_KEYS == client.MODEL_IDENTITY_KEYS == reports.IDENTITY_KEYS


def test_identity_is_the_weights_and_stable_across_exports(tmp_path):
    """Same weights: same identity (a copy of the checkpoint elsewhere too); other weights:
    another digest."""
    from safetensors.numpy import load_file, save_file

    first = repository.model_identity(DEFAULT_CHECKPOINT)
    copy = tmp_path / "copy"
    shutil.copytree(DEFAULT_CHECKPOINT, copy)
    assert repository.model_identity(copy) == first == repository.model_identity(DEFAULT_CHECKPOINT)
    tensors = load_file(copy / "model.safetensors")
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + np.asarray(1e-3, dtype=tensors[name].dtype)
    save_file(tensors, copy / "model.safetensors")
    changed = repository.model_identity(copy)
    assert changed["checkpoint_sha256"] != first["checkpoint_sha256"]
    assert {k: v for k, v in changed.items() if k != "checkpoint_sha256"} == {
        k: v for k, v in first.items() if k != "checkpoint_sha256"
    }
    # stated where clients read it with the API key (every ensemble's config) and for the
    # admin's view of the composing models (postprocess's)
    files = repository.source_files(copy)
    for name in [*(spec.name for spec in ENSEMBLES), "postprocess"]:
        assert changed["checkpoint_sha256"] in files[f"{name}/config.pbtxt"], name
        assert first["checkpoint_sha256"] not in files[f"{name}/config.pbtxt"], name


def test_identity_from_the_server_is_checked():
    params = {
        "model_name": "MedP-CLIP",
        "model_config": "tiny",
        "checkpoint_sha256": "AB" * 32,
        "medpclip_version": "0.1.0",
    }
    identity = ModelIdentity.from_server(params)
    assert identity.checkpoint_sha256 == "ab" * 32  # hex, lower case
    assert identity.model_name == "MedP-CLIP tiny"
    assert all(len(v) <= 64 for v in [*identity.software_versions, identity.algorithm_version])
    with pytest.raises(ValueError, match="does not state checkpoint_sha256, medpclip_version"):
        ModelIdentity.from_server({"model_name": "MedP-CLIP", "model_config": "tiny"})
    with pytest.raises(ValueError, match="not a SHA-256"):
        ModelIdentity.from_server({**params, "checkpoint_sha256": "abc"})
    with pytest.raises(ValueError, match="model_config is not"):
        ModelIdentity.from_server({**params, "model_config": "a\\b"})


# --- privacy -------------------------------------------------------------------------------------


def test_building_lets_no_warning_or_patient_attribute_out(caplog):
    """highdicom warns about a single-component patient name, quoting it: the warning is
    captured while the objects are built and logged without its text."""
    j2k = _testfile("693_J2KI.dcm")
    name = str(j2k.PatientName)
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as escaped:
        warnings.simplefilter("always")
        sr, _ = build_reports(j2k, [_finding(_mask(j2k))], IDENTITY)
    assert not escaped
    assert sr.PatientName == name  # the report is still filed with its patient
    assert any("withheld a UserWarning" in r.getMessage() for r in caplog.records)
    assert not any(name in r.getMessage() for r in caplog.records)


def test_redact_hides_quoted_values():
    text = "Invalid value for VR PN: 'Doe^John'. The string \"CQ500-CT-310\" is <odd>"
    assert redact(text) == "Invalid value for VR PN: '...'. The string '...' is '...'"


# --- requests ------------------------------------------------------------------------------------


def test_mask_and_frame_enter_the_fingerprint_without_changing_old_ones():
    plain = Request(labels=("a",), box=(0, 0, 5, 5))
    assert plain.fingerprint() == '[["a"],null,[0,0,5,5],false,null]'
    mask = np.zeros((8, 8), np.uint8)
    mask[1:3, 1:3] = 1
    a = Request(labels=("a",), mask=mask)
    assert a.fingerprint() == Request(labels=("a",), mask=mask.astype(bool)).fingerprint()
    assert a.fingerprint() != Request(labels=("a",), mask=np.roll(mask, 1)).fingerprint()
    assert Request(labels=("a",), box=(0, 0, 5, 5), frame=2).fingerprint() != plain.fingerprint()
    assert RegionPrompt(mask=mask).describe() == "mask of 4 px"
    with pytest.raises(ValueError, match="not both"):
        Request(labels=("a",), mask=mask, regions=(RegionPrompt(box=(0, 0, 5, 5)),))
