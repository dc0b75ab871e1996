"""What the PACS bridge stores, as a PACS administrator checks it (issue 14): every SR and SEG
`medpclip-pacs run` writes, for several sources (CT, MR, JPEG 2000, a legacy multi-frame US
cine, an enhanced multi-frame CT) and region forms (several points, a box, a mask, several
regions), is validated by dciodvfy (Debian's dicom3tools) against dciodvfy's report on the
source, and read back by highdicom for its references (SR -> SEG segment -> source frame),
values and model identity. Real Orthanc, real server, the command line in-process."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from orthanc import Orthanc, admin_key, enhanced_ct, missing
from PIL import Image

from medpclip import export, repository
from medpclip.config import DEFAULT_CHECKPOINT
from medpclip_client import MedPClipClient, __version__
from medpclip_client.pacs import LOCAL_SCHEME, label_concept
from medpclip_client.pacs.cli import main
from medpclip_client.pacs.geometry import outline
from medpclip_tools.serve import ServeProcess

DCIODVFY = shutil.which("dciodvfy")
pytestmark = [
    pytest.mark.skipif(missing() is not None, reason=missing() or ""),
    pytest.mark.skipif(
        DCIODVFY is None, reason="dciodvfy not found: run scripts/setup.sh (dicom3tools)"
    ),
]

SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
SEED_POINT, REGION_PROMPT = "128139", "PROMPT"  # the prompt SCOORDs' concepts
LABELS = ("a nodule", "a cyst", "a vertebra")

# name -> (pydicom test file or builder, frame to read, whether a SEG can reference it)
SOURCES = {
    "ct": ("CT_small.dcm", None, True),
    "mr": ("MR_small.dcm", None, True),
    # JPEG 2000 CT without the Frame of Reference its IOD requires: an SR only (a SEG must
    # share a Frame of Reference; --mask-out is refused before inference)
    "jpeg2000_ct": ("693_J2KI.dcm", None, False),
    "jpeg2000_mr": ("MR_small_jp2klossless.dcm", None, True),
    # legacy multi-frame (US cine, JPEG baseline YBR, 30 frames, no Frame of Reference)
    "us_multiframe": ("examples_ybr_color.dcm", 2, True),
    # enhanced multi-frame with a Frame of Reference (per-frame plane positions)
    "enhanced_ct": ("enhanced_ct", 2, True),
}
FORMS = {
    "points": ["--point", "40,40", "--point", "46,44"],
    "box": ["--box", "20,24,60,60"],
    "mask": ["--mask", "{mask}"],
    "regions": ["--region", "point=40,40 point=46,44", "--region", "box=20,24,60,60"],
}


def _source_bytes(name: str) -> bytes:
    from pydicom.data import get_testdata_file

    if name == "enhanced_ct":
        return enhanced_ct(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    data = Path(get_testdata_file(name)).read_bytes()
    if name == "MR_small_jp2klossless.dcm":  # MR_small.dcm, compressed, with the same UIDs
        import pydicom
        from pydicom.uid import generate_uid

        ds = pydicom.dcmread(io.BytesIO(data))
        ds.SeriesInstanceUID = generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        data = _part10(ds)
    return data


def dciodvfy(data: bytes, tmp: Path) -> tuple[list[str], list[str]]:
    """dciodvfy's Error and Warning lines for a Part 10 file."""
    path = tmp / "object.dcm"
    path.write_bytes(data)
    r = subprocess.run([DCIODVFY, "-new", str(path)], capture_output=True, text=True, timeout=60)
    lines = (r.stdout + r.stderr).splitlines()
    return [x for x in lines if x.startswith("Error")], [
        x for x in lines if x.startswith("Warning")
    ]


def _part10(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Server (default model, an API key and an admin key), Orthanc holding the sources, and
    per source its UIDs, bytes and dciodvfy report. Every `medpclip-pacs` and client here
    holds the API key only (MEDPCLIP_API_KEY_FILE): the least a PACS integration needs, the
    served model's identity included."""
    import pydicom

    out = tmp_path_factory.mktemp("conformance")
    export.export(checkpoint=export.DEFAULT_CHECKPOINT, out=out)
    key = out / "api.key"
    key.write_text("pacs-tests-api-" + os.urandom(16).hex() + "\n")
    admin = admin_key(out)  # configured (admin methods closed), never given to the bridge
    args = [f"--api-key-file={key}", f"--admin-key-file={admin}"]
    with (
        ServeProcess(out / "model_repository", args=args) as server,
        Orthanc(out / "orthanc") as orthanc,
        pytest.MonkeyPatch.context() as env,
    ):
        env.setenv("MEDPCLIP_API_KEY_FILE", str(key))
        env.setenv("MEDPCLIP_API_KEY", key.read_text().strip())
        sources = {}
        for name, (file, _, _) in SOURCES.items():
            data = _source_bytes(file)
            answer = orthanc.upload(data)
            assert answer["Status"] == "Success", (name, answer)
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            errors, warnings = dciodvfy(data, out)
            sources[name] = {
                "uids": (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID),
                "data": data,
                "rows": int(ds.Rows),
                "columns": int(ds.Columns),
                "errors": errors,
                "warnings": warnings,
            }
        yield {"url": server.grpc_url, "orthanc": orthanc, "sources": sources, "key": key}


def _address(source: dict) -> list[str]:
    study, series, instance = source["uids"]
    return ["--study", study, "--series", series, "--instance", instance]


def _prompt_mask(source: dict, tmp: Path) -> tuple[Path, np.ndarray]:
    rows, columns = source["rows"], source["columns"]
    mask = np.zeros((rows, columns), np.uint8)
    mask[rows // 4 : rows // 2, columns // 4 : columns // 2] = 255
    mask[rows // 2 : rows // 2 + 3, columns // 4 : columns // 4 + 2] = 255  # not a rectangle
    path = tmp / "prompt-mask.png"
    Image.fromarray(mask).save(path)
    return path, mask != 0


def _items(ds, code: str, value_type: str) -> list:
    """Content items of `ds`'s tree (any depth) with concept `code` and `value_type`."""
    found = []
    for item in ds.get("ContentSequence", []):
        name = item.get("ConceptNameCodeSequence")
        if name and name[0].CodeValue == code and item.ValueType == value_type:
            found.append(item)
        found += _items(item, code, value_type)
    return found


def _expected_prompts(form: str, mask: np.ndarray) -> list[tuple[str, str, list]]:
    """(concept, graphic type, data) of each region's prompt SCOORD."""
    points = (SEED_POINT, "MULTIPOINT", [[40, 40], [46, 44]])
    box = (REGION_PROMPT, "POLYLINE", [[20, 24], [60, 24], [60, 60], [20, 60], [20, 24]])
    return {
        "points": [points],
        "box": [box],
        "mask": [(REGION_PROMPT, "POLYLINE", outline(mask).tolist())],
        "regions": [points, box],
    }[form]


def _segment_of_frame(seg_ds, frame_number: int) -> tuple[int, list]:
    """The segment number of a SEG frame and the source references it derives from."""
    group = seg_ds.PerFrameFunctionalGroupsSequence[frame_number - 1]
    ids = group.get("SegmentIdentificationSequence") or (
        seg_ds.SharedFunctionalGroupsSequence[0].SegmentIdentificationSequence
    )
    sources = [s for d in group.DerivationImageSequence for s in d.SourceImageSequence]
    return int(ids[0].ReferencedSegmentNumber), sources


def _check_identity(ds, identity: dict[str, str]) -> None:
    """The served model's identity in an object's header (both SR and SEG)."""
    assert ds.ManufacturerModelName == f"{identity['model_name']} {identity['model_config']}"
    digest = identity["checkpoint_sha256"]
    versions = list(ds.SoftwareVersions)
    assert f"{identity['model_config']} sha256:{digest[:16]}" in versions, versions
    assert f"{identity['model_name']} {identity['medpclip_version']}" in versions, versions
    assert ds.DeviceSerialNumber == digest[:16]
    schemes = {i.CodingSchemeDesignator for i in ds.CodingSchemeIdentificationSequence}
    assert LOCAL_SCHEME in schemes
    assert re.fullmatch(r"\d{8}", ds.SeriesDate) and re.fullmatch(r"\d{6}(\.\d+)?", ds.SeriesTime)


def _algorithm_version(identity: dict[str, str]) -> str:
    return (
        f"{identity['medpclip_version']} {identity['model_config']} "
        f"sha256:{identity['checkpoint_sha256'][:16]}"
    )


@pytest.fixture(scope="module")
def identity() -> dict[str, str]:
    """What the export wrote into the served repository for the default model."""
    return repository.model_identity(DEFAULT_CHECKPOINT)


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("name", list(SOURCES))
def test_stored_objects_pass_dciodvfy_and_read_back(stack, identity, name, form, tmp_path, capsys):
    import highdicom as hd
    from dicomweb_client import DICOMwebClient
    from pydicom.sr.codedict import codes

    source = stack["sources"][name]
    _, frame, seg_possible = SOURCES[name]
    study, series, instance = source["uids"]
    mask_path, prompt_mask = _prompt_mask(source, tmp_path)
    argv = ["run", "--dicomweb", stack["orthanc"].dicomweb, *_address(source)]
    argv += [a.format(mask=mask_path) for a in FORMS[form]]
    argv += ["--frame", str(frame)] if frame else []
    argv += ["--triton", stack["url"], "--json", "--labels", *LABELS]
    if not seg_possible:
        # refused before inference, with the reason, and nothing stored
        before = stack["orthanc"].count_instances()
        assert main([*argv, "--mask-out"]) == 3
        assert "Frame Of Reference" in capsys.readouterr().err
        assert stack["orthanc"].count_instances() == before
    code = main(argv + (["--mask-out"] if seg_possible else []))
    out, err = capsys.readouterr()
    assert code == 0, err
    answer = json.loads(out)
    regions = answer["regions"] if "regions" in answer else [answer]
    prompts = _expected_prompts(form, prompt_mask)
    assert len(regions) == len(prompts)
    assert answer["model"] == {**_model_json(identity), "medpclip_client_version": __version__}
    assert answer.get("frame") == frame

    wado = DICOMwebClient(stack["orthanc"].dicomweb)
    sr_ds = wado.retrieve_instance(study, answer["sr"]["series"], answer["sr"]["instance"])
    seg_ds = None
    if seg_possible:
        seg_ds = wado.retrieve_instance(study, answer["seg"]["series"], answer["seg"]["instance"])

    # --- dciodvfy: nothing we write is an error the source does not have -----------------
    report = {}
    for kind, ds in (("SR", sr_ds), ("SEG", seg_ds)):
        if ds is None:
            continue
        errors, warnings = dciodvfy(_part10(ds), tmp_path)
        report[kind] = (len(errors), len(warnings))
        introduced = [e for e in errors if e not in source["errors"]]
        assert not introduced, f"{kind} of {name}/{form}: errors not in the source:\n" + "\n".join(
            introduced
        )
        # warnings too: none but dciodvfy not knowing our declared private coding scheme
        ours = [w for w in warnings if w not in source["warnings"] and f"<{LOCAL_SCHEME}>" not in w]
        assert not ours, f"{kind} of {name}/{form}: warnings not in the source:\n" + "\n".join(ours)

    # --- SR ------------------------------------------------------------------------------
    _check_identity(sr_ds, identity)
    sr = hd.sr.Comprehensive3DSR.from_dataset(sr_ds)
    groups = sr.content.get_planar_roi_measurement_groups()
    assert len(groups) == len(regions)
    evidence = {
        sop.ReferencedSOPInstanceUID
        for st in sr_ds.CurrentRequestedProcedureEvidenceSequence
        for se in st.ReferencedSeriesSequence
        for sop in se.ReferencedSOPSequence
    }
    assert instance in evidence
    if seg_ds is not None:
        assert seg_ds.SOPInstanceUID in evidence  # the SR's header lists the SEG it references
    for i, (group, region, (concept, graphic_type, data)) in enumerate(
        zip(groups, regions, prompts, strict=True), 1
    ):
        assert group.finding_type.value == label_concept(region["label"]).value
        values = {m.name.meaning: m.value for m in group.get_measurements()}
        assert abs(values[codes.DCM.Probability.meaning] - region["probability"]) <= 1e-6
        assert abs(values["Predicted mask IoU"] - region["iou"]) <= 1e-6
        # the algorithm of every measurement: the served model and its weights
        assert {t.TextValue for t in _items(group[0], "111003", "TEXT")} == {
            _algorithm_version(identity)
        }
        parameters = {t.TextValue for t in _items(group[0], "111002", "TEXT")}
        assert f"checkpoint_sha256={identity['checkpoint_sha256']}" in parameters
        # the prompt, as given, on the source (frame)
        (prompt,) = [
            hd.sr.ScoordContentItem.from_dataset(p) for p in _items(group[0], concept, "SCOORD")
        ]
        assert prompt.graphic_type.value == graphic_type
        np.testing.assert_allclose(prompt.value, data)
        selected = prompt.ContentSequence[0].ReferencedSOPSequence[0]
        assert selected.ReferencedSOPInstanceUID == instance
        assert selected.get("ReferencedFrameNumber") == frame
        # the predicted region
        if seg_ds is not None:
            assert group.reference_type == codes.DCM.ReferencedSegmentationFrame
            frame_item, source_item = group.referenced_segmentation_frame
            ref = frame_item.ReferencedSOPSequence[0]
            assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (
                SEGMENTATION,
                seg_ds.SOPInstanceUID,
            )
            segment, derived_from = _segment_of_frame(seg_ds, int(ref.ReferencedFrameNumber))
            assert segment == i
            assert seg_ds.SegmentSequence[i - 1].TrackingUID == group.tracking_uid
            assert seg_ds.SegmentSequence[i - 1].TrackingID == group.tracking_identifier
            assert [
                (s.ReferencedSOPInstanceUID, s.get("ReferencedFrameNumber")) for s in derived_from
            ] == [(instance, frame)]
            src = source_item.ReferencedSOPSequence[0]
            assert (src.ReferencedSOPInstanceUID, src.get("ReferencedFrameNumber")) == (
                instance,
                frame,
            )
        else:
            roi = group.roi
            assert roi.graphic_type.value == "POLYLINE"
            assert (roi.value[0] == roi.value[-1]).all()  # closed
            assert (roi.value >= 0).all()
            assert (roi.value <= [source["columns"], source["rows"]]).all()
            assert roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == (
                instance
            )

    # --- SEG -----------------------------------------------------------------------------
    if seg_ds is not None:
        _check_identity(seg_ds, identity)
        seg = hd.seg.Segmentation.from_dataset(seg_ds)
        assert (study, series, instance) in seg.get_source_image_uids()
        for i, (segment, region) in enumerate(zip(seg_ds.SegmentSequence, regions, strict=True)):
            (algorithm,) = segment.SegmentationAlgorithmIdentificationSequence
            assert algorithm.AlgorithmName == identity["model_name"]
            assert algorithm.AlgorithmVersion == _algorithm_version(identity)
            assert identity["checkpoint_sha256"] in algorithm.AlgorithmParameters
            assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == (
                label_concept(region["label"]).value
            )
            if frame:
                pixels = seg.get_pixels_by_source_frame(
                    instance, source_frame_numbers=[frame], segment_numbers=[i + 1]
                )
            else:
                pixels = seg.get_pixels_by_source_instance([instance], segment_numbers=[i + 1])
            assert int(np.count_nonzero(pixels)) == region["mask_area_px"]
    print(name, form, report)


def _model_json(identity: dict[str, str]) -> dict[str, str]:
    return {
        "model": identity["model_name"],
        "config": identity["model_config"],
        "checkpoint_sha256": identity["checkpoint_sha256"],
        "medpclip_version": identity["medpclip_version"],
    }


def test_the_identity_is_the_servers(stack, identity):
    """The identity the objects carry is what the server states (the parameters of the
    configuration of the ensemble called, read by the client with the API key alone: every
    ensemble states the same), which is what the export computed from the weights. The key the
    bridge holds is no admin key: a composing model's configuration is refused to it."""
    from medpclip_client import MedPClipError
    from medpclip_core.tensors import ENSEMBLES

    with MedPClipClient(stack["url"], retries=0) as client:
        assert client.model_identity() == identity
        for spec in ENSEMBLES:
            assert client.model_identity(spec.name) == identity, spec.name
        with pytest.raises(MedPClipError) as info:
            client.model_identity("postprocess")
        assert info.value.denied
    digest = hashlib.sha256((DEFAULT_CHECKPOINT / "model.safetensors").read_bytes())
    assert identity["checkpoint_sha256"] == digest.hexdigest()


@pytest.mark.parametrize("key", [None, "not-the-api-key"])
def test_without_the_api_key_nothing_is_stored(stack, capsys, monkeypatch, tmp_path, key):
    """A caller the server refuses gets no report: exit 5 before anything is fetched, with what
    to do (the API key; never the admin key)."""
    monkeypatch.delenv("MEDPCLIP_API_KEY_FILE")
    monkeypatch.delenv("MEDPCLIP_API_KEY")
    if key is not None:
        (tmp_path / "wrong.key").write_text(key)
        monkeypatch.setenv("MEDPCLIP_API_KEY_FILE", str(tmp_path / "wrong.key"))
    before = stack["orthanc"].count_instances()
    argv = ["run", "--dicomweb", stack["orthanc"].dicomweb, *_address(stack["sources"]["ct"])]
    code = main([*argv, "--box", "10,10,50,50", "--triton", stack["url"], "--labels", *LABELS])
    err = capsys.readouterr().err
    assert code == 5, err
    assert "refused the caller" in err and "needs an API key" in err and "--api-key-file" in err
    assert key is None or key not in err
    assert stack["orthanc"].count_instances() == before


def test_no_patient_attribute_reaches_any_output_stream(stack, tmp_path):
    """`medpclip-pacs run -v` as a process (its own warnings registry and logging), on a source
    whose patient name highdicom warns about (quoting it) and one it does not: neither stream
    holds a patient name or ID, at the most verbose level."""
    import pydicom

    for name in ("jpeg2000_ct", "ct"):
        source = stack["sources"][name]
        ds = pydicom.dcmread(io.BytesIO(source["data"]), stop_before_pixels=True)
        phi = {str(ds.get(k)) for k in ("PatientName", "PatientID")}
        assert all(len(v) >= 4 for v in phi), name  # distinctive: not part of a UID or word
        _, frame, seg_possible = SOURCES[name]
        argv = ["run", "--dicomweb", stack["orthanc"].dicomweb, *_address(source), "-v"]
        argv += ["--point", "40,40", "--point", "46,44", "--triton", stack["url"]]
        argv += (["--frame", str(frame)] if frame else []) + (
            ["--mask-out"] if seg_possible else []
        )
        env = {**os.environ, "PYTHONWARNINGS": "always"}  # every warning, every time
        r = subprocess.run(
            [sys.executable, "-m", "medpclip_client.pacs", *argv, "--labels", *LABELS],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr
        assert "model:" in r.stderr  # -v does log (UIDs and the model)
        if name == "jpeg2000_ct":
            assert "withheld a UserWarning" in r.stderr  # highdicom's, without its text
        for value in phi:
            assert value not in r.stdout and value not in r.stderr, (name, r.stderr)


def test_one_report_of_every_region_form(stack, identity, tmp_path):
    """The library takes what the command line cannot mix: points, a box and a mask as three
    regions of one instance, in one SR (a group each, its prompt kept as given) and one SEG."""
    import highdicom as hd
    from dicomweb_client import DICOMwebClient

    from medpclip_client.pacs import Bridge, DicomWeb, InstanceRef, RegionPrompt, Request

    source = stack["sources"]["ct"]
    _, prompt_mask = _prompt_mask(source, tmp_path)
    regions = (
        RegionPrompt(points=((40, 40), (46, 44))),
        RegionPrompt(box=(20, 24, 60, 60)),
        RegionPrompt(mask=prompt_mask),
    )
    key = stack["key"].read_text().strip()
    with Bridge(
        DicomWeb(stack["orthanc"].dicomweb), stack["url"], client_options={"api_key": key}
    ) as b:
        outcome = b.process(
            InstanceRef(*source["uids"]), Request(labels=LABELS, regions=regions, mask_out=True)
        )
    assert outcome.model is not None
    assert outcome.model.checkpoint_sha256 == identity["checkpoint_sha256"]
    wado = DICOMwebClient(stack["orthanc"].dicomweb)
    study = source["uids"][0]
    sr_ds = wado.retrieve_instance(study, outcome.sr_series_uid, outcome.sr_uid)
    seg_ds = wado.retrieve_instance(study, outcome.seg_series_uid, outcome.seg_uid)
    for ds in (sr_ds, seg_ds):
        errors, _ = dciodvfy(_part10(ds), tmp_path)
        assert not [e for e in errors if e not in source["errors"]], errors
    groups = hd.sr.Comprehensive3DSR.from_dataset(sr_ds).content.get_planar_roi_measurement_groups()
    kinds = [
        [
            (i.ConceptNameCodeSequence[0].CodeValue, i.GraphicType)
            for i in g[0].ContentSequence
            if i.ValueType == "SCOORD"
        ]
        for g in groups
    ]
    assert kinds == [
        [(SEED_POINT, "MULTIPOINT")],
        [(REGION_PROMPT, "POLYLINE")],
        [(REGION_PROMPT, "POLYLINE")],
    ]
    assert [s.SegmentNumber for s in seg_ds.SegmentSequence] == [1, 2, 3]
    assert [g.tracking_uid for g in groups] == [s.TrackingUID for s in seg_ds.SegmentSequence]
