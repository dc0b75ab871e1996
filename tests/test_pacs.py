"""The PACS bridge against real parts: Orthanc with DICOMweb, Triton serving the embedded
default model, the `medpclip-pacs` command line in-process. The stored SR and SEG are read back
over WADO-RS and checked against what `MedPClipClient` returns for the same request."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from orthanc import (
    JPEG_XL_LOSSLESS,
    Orthanc,
    admin_key,
    conformant_ct,
    free_port,
    missing,
    part10,
    with_unsupported_syntax,
    without_geometry,
    without_pixel_data,
)

from medpclip import export
from medpclip_client import MedPClipClient, Region
from medpclip_client.pacs import LOCAL_SCHEME, label_concept
from medpclip_client.pacs.cli import main
from medpclip_core import imaging
from medpclip_tools.evaluate import centre_point
from medpclip_tools.phantoms import CANONICAL, phantoms, to_dicom
from medpclip_tools.serve import ServeProcess

pytestmark = pytest.mark.skipif(missing() is not None, reason=missing() or "")

PHANTOM_DATE = "20240102"  # the query's phantoms; everything else is dated otherwise
N_PHANTOMS = 4


def _copy(data: bytes):
    """A dataset of `data` with new Series and SOP Instance UIDs (the archive keeps both)."""
    import io

    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(io.BytesIO(data))
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


def truncated_native(data: bytes) -> bytes:
    """An uncompressed image whose Pixel Data holds half the bytes its size needs (a transfer
    cut short, re-encoded with a consistent length, which archives store as it is)."""
    ds = _copy(data)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    return part10(ds)


def truncated_jpeg(data: bytes) -> bytes:
    """An encapsulated single-frame image whose compressed frame is cut in half."""
    from pydicom.encaps import encapsulate, generate_fragmented_frames

    ds = _copy(data)
    frame = b"".join(next(generate_fragmented_frames(ds.PixelData)))
    ds.PixelData = encapsulate([frame[: len(frame) // 2]])
    return part10(ds)


@pytest.fixture(scope="module")
def triton_url(tmp_path_factory):
    """The embedded default model (meaningful labels), served by a real tritonserver behind
    its gateway with an admin key and no API key (inference open). The bridge reads the served
    model's identity from its ensemble's configuration, which the gateway answers as it
    answers inference: every `medpclip-pacs` (and client) of this module presents no key at
    all (tests/test_pacs_conformance.py runs with an API key)."""
    out = tmp_path_factory.mktemp("pacs_model")
    export.export(checkpoint=export.DEFAULT_CHECKPOINT, out=out)
    key = admin_key(out)  # configured, so that admin methods are closed, and never presented
    with ServeProcess(out / "model_repository", args=[f"--admin-key-file={key}"]) as server:
        with pytest.MonkeyPatch.context() as env:
            env.delenv("MEDPCLIP_API_KEY_FILE", raising=False)
            env.delenv("MEDPCLIP_API_KEY", raising=False)
            yield server.grpc_url


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """A running Orthanc holding pydicom's test files, broken copies and phantom CT slices.
    Yields (orthanc, {name: (study, series, instance, bytes)}, phantom objects)."""
    from pydicom.data import get_testdata_file

    files: dict[str, bytes] = {
        name: Path(get_testdata_file(f"{name}.dcm")).read_bytes()
        for name in ("CT_small", "MR_small", "test-SR", "JPEG-lossy")
    }
    files["no_pixels"] = without_pixel_data(files["CT_small"])
    files["truncated"] = truncated_native(files["CT_small"])
    files["truncated_jpeg12"] = truncated_jpeg(files["JPEG-lossy"])
    files["jpeg_xl"] = with_unsupported_syntax(files["CT_small"])
    slices = phantoms(seed=2024, count=N_PHANTOMS)
    for i, p in enumerate(slices):
        files[f"phantom{i}"] = conformant_ct(to_dicom(p, i), PHANTOM_DATE)
    files["phantom_no_frame_of_reference"] = without_geometry(
        to_dicom(phantoms(seed=7, count=1)[0], 99)
    )

    with Orthanc(tmp_path_factory.mktemp("orthanc")) as orthanc:
        uids = {}
        for name, data in files.items():
            answer = orthanc.upload(data)
            assert answer["Status"] == "Success", (name, answer)
            tags = orthanc.get(f"/instances/{answer['ID']}/simplified-tags")
            uids[name] = (
                tags["StudyInstanceUID"],
                tags["SeriesInstanceUID"],
                tags["SOPInstanceUID"],
                data,
            )
        yield orthanc, uids, slices


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _address(uids, name: str) -> list[str]:
    study, series, instance, _ = uids[name]
    return ["--study", study, "--series", series, "--instance", instance]


def _wado(orthanc: Orthanc):
    from dicomweb_client import DICOMwebClient

    return DICOMwebClient(orthanc.dicomweb)


def test_run_stores_sr_and_seg_matching_the_served_answer(archive, triton_url, capsys):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    orthanc, uids, slices = archive
    study, series, instance, data = uids["phantom0"]
    finding = slices[0].findings[0]
    x, y = centre_point(finding)
    before = orthanc.count_instances()

    code, out, err = _run(
        capsys,
        "run",
        "--dicomweb",
        orthanc.dicomweb,
        *_address(uids, "phantom0"),
        "--point",
        f"{x},{y}",
        "--mask-out",
        "--triton",
        triton_url,
        "--json",
        "--labels",
        *CANONICAL,
    )
    assert code == 0, err
    answer = json.loads(out)
    assert orthanc.count_instances() == before + 2  # one SR, one SEG

    # the same request straight to the server: the reference
    with MedPClipClient(triton_url) as client:
        ref = client.infer(data, Region(points=[(x, y)]), labels=list(CANONICAL))
    label, prob, image_prob = ref.top(1)[0]
    assert label == finding.label == answer["label"]  # the default model names the finding
    assert abs(answer["probability"] - prob) <= 1e-6

    wado = _wado(orthanc)
    # --- SR ---
    sr_ds = wado.retrieve_instance(study, answer["sr"]["series"], answer["sr"]["instance"])
    assert sr_ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr_ds.StudyInstanceUID == study
    evidence = sr_ds.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == study
    referenced = evidence.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == series
    assert referenced.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == instance
    assert sr_ds.ConceptNameCodeSequence[0].CodeValue == "126000"  # TID 1500 report
    sr = hd.sr.Comprehensive3DSR.from_dataset(sr_ds)
    (group,) = sr.content.get_planar_roi_measurement_groups()
    concept = label_concept(label)
    assert group.finding_type.scheme_designator == LOCAL_SCHEME
    assert (group.finding_type.value, group.finding_type.meaning) == (concept.value, label)
    values = {m.name.meaning: m.value for m in group.get_measurements()}
    assert abs(values[codes.DCM.Probability.meaning] - prob) <= 1e-6
    assert abs(values["Whole-image probability of finding"] - image_prob) <= 1e-6
    assert abs(values["Predicted mask IoU"] - ref.iou) <= 1e-6
    texts = [i.TextValue for i in group[0].ContentSequence if i.ValueType == "TEXT"]
    assert label in texts  # the free-text label
    # the point is kept as the prompt (a seed point on the source image) ...
    assert [p.value.tolist() for p in _prompts(group, "128139", "POINT", instance)] == [[[x, y]]]
    # ... and the region is the predicted one: the SEG frame of the finding's segment
    seg_ds = wado.retrieve_instance(study, answer["seg"]["series"], answer["seg"]["instance"])
    assert _segment_of(group, seg_ds, instance) == 1
    assert seg_ds.SegmentSequence[0].TrackingUID == group.tracking_uid  # linked both ways
    assert _evidence(sr_ds) >= {instance, answer["seg"]["instance"]}  # the header lists both

    # --- SEG ---
    seg = hd.seg.Segmentation.from_dataset(seg_ds)
    assert (study, series, instance) in seg.get_source_image_uids()
    assert seg_ds.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == concept.value
    pixels = seg.get_pixels_by_source_instance([instance], segment_numbers=[1])
    served = ref.mask.astype(bool)
    assert served.any()
    np.testing.assert_array_equal(pixels[0, :, :, 0].astype(bool), served)


def _prompts(group, code: str, graphic_type: str, instance: str) -> list:
    """The group's prompt SCOORDs (concept `code`, e.g. DCM 128139 "Seed point"), each
    checked to be of `graphic_type` and drawn on `instance`."""
    import highdicom as hd

    items = [
        hd.sr.ScoordContentItem.from_dataset(i)
        for i in group[0].ContentSequence
        if i.ValueType == "SCOORD" and i.ConceptNameCodeSequence[0].CodeValue == code
    ]
    for item in items:
        assert item.graphic_type.value == graphic_type
        assert item.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == (
            instance
        )
    return items


def _segment_of(group, seg_ds, instance: str) -> int:
    """The segment number of the SEG frame the group's ROI references (TID 1410 "Referenced
    Segmentation Frame"), after checking that it is `seg_ds`'s and derived from `instance`."""
    from pydicom.sr.codedict import codes

    assert group.reference_type == codes.DCM.ReferencedSegmentationFrame
    frame_item, source_item = group.referenced_segmentation_frame
    ref = frame_item.ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == seg_ds.SOPInstanceUID
    assert "ReferencedSegmentNumber" not in ref  # a frame OR segments (PS3.3 C.18.4)
    assert source_item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == instance
    frame = seg_ds.PerFrameFunctionalGroupsSequence[int(ref.ReferencedFrameNumber) - 1]
    ids = frame.get("SegmentIdentificationSequence") or (
        seg_ds.SharedFunctionalGroupsSequence[0].SegmentIdentificationSequence
    )
    return int(ids[0].ReferencedSegmentNumber)


def _evidence(sr_ds) -> set[str]:
    """The SOP instances an SR's header lists as evidence."""
    return {
        sop.ReferencedSOPInstanceUID
        for study in sr_ds.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }


def test_run_box_on_a_real_ct_stores_only_the_sr(archive, triton_url, capsys):
    import highdicom as hd

    from medpclip_client.pacs.geometry import outline

    orthanc, uids, _ = archive
    study, _, instance, data = uids["CT_small"]
    before = orthanc.count_instances()
    code, out, err = _run(
        capsys,
        "run",
        "--dicomweb",
        orthanc.dicomweb,
        *_address(uids, "CT_small"),
        "--box",
        "20,30,90,100",
        "--triton",
        triton_url,
        "--json",
        "--labels",
        "a lung nodule",
        "a vertebra",
    )
    assert code == 0, err
    answer = json.loads(out)
    assert answer["seg"] is None
    assert orthanc.count_instances() == before + 1
    sr = hd.sr.Comprehensive3DSR.from_dataset(
        _wado(orthanc).retrieve_instance(study, answer["sr"]["series"], answer["sr"]["instance"])
    )
    (group,) = sr.content.get_planar_roi_measurement_groups()
    # without a SEG the region is the outline of the served mask (a closed polygon) ...
    with MedPClipClient(triton_url) as client:
        served = client.infer(data, Region(box=(20, 30, 90, 100)), ["a lung nodule", "a vertebra"])
    assert served.mask.any()
    assert group.roi.graphic_type.value == "POLYLINE"
    np.testing.assert_allclose(group.roi.value, outline(served.mask))
    assert group.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == (
        instance
    )
    # ... and the box is kept as the prompt
    (box,) = _prompts(group, "PROMPT", "POLYLINE", instance)
    np.testing.assert_allclose(box.value, [[20, 30], [90, 30], [90, 100], [20, 100], [20, 30]])


def test_run_two_regions_one_encode_one_stow(archive, triton_url, capsys, monkeypatch):
    """Two regions of one instance: one encode, one STOW-RS with one SR holding a measurement
    group per region and one SEG holding a segment per region, each matching the plain call."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from medpclip_client.client import Session
    from medpclip_client.pacs.dicomweb import DicomWeb

    orthanc, uids, slices = archive
    study, series, instance, data = uids["phantom2"]
    findings = slices[2].findings
    x, y = centre_point(findings[0])
    box = tuple(float(v) for v in findings[-1].box)
    regions = [Region(points=[(x, y)]), Region(box=box)]
    with MedPClipClient(triton_url) as client:
        want = [client.infer(data, r, labels=list(CANONICAL)) for r in regions]

    store, stores = DicomWeb.store, []
    encode, encodes = Session.encode, []

    def counting_store(self, datasets):
        stores.append([str(ds.Modality) for ds in datasets])
        return store(self, datasets)

    def counting_encode(self, **kwargs):
        encodes.append(self.encoded)
        return encode(self, **kwargs)

    monkeypatch.setattr(DicomWeb, "store", counting_store)
    monkeypatch.setattr(Session, "encode", counting_encode)
    before = orthanc.count_instances()
    code, out, err = _run(
        capsys,
        "run",
        "--dicomweb",
        orthanc.dicomweb,
        *_address(uids, "phantom2"),
        "--region",
        f"point={x},{y}",
        "--region",
        "box=" + ",".join(str(v) for v in box),
        "--mask-out",
        "--triton",
        triton_url,
        "--json",
        "--labels",
        *CANONICAL,
    )
    assert code == 0, err
    assert stores == [["SR", "SEG"]]  # one STOW-RS for everything
    assert encodes.count(False) == 1  # the instance was encoded once
    assert orthanc.count_instances() == before + 2
    answer = json.loads(out)
    assert [r["region"]["graphic_type"] for r in answer["regions"]] == ["POINT", "POLYLINE"]

    wado = _wado(orthanc)
    sr = hd.sr.Comprehensive3DSR.from_dataset(
        wado.retrieve_instance(study, answer["sr"]["series"], answer["sr"]["instance"])
    )
    groups = sr.content.get_planar_roi_measurement_groups()
    assert len(groups) == 2
    seg_ds = wado.retrieve_instance(study, answer["seg"]["series"], answer["seg"]["instance"])
    x0, y0, x1, y1 = box
    prompts = [
        ("128139", "POINT", [[x, y]]),
        ("PROMPT", "POLYLINE", [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]),
    ]
    for i, (group, ref, (code, kind, prompt), got) in enumerate(
        zip(groups, want, prompts, answer["regions"], strict=True), 1
    ):
        label, prob, image_prob = ref.top(1)[0]
        assert got["label"] == label and abs(got["probability"] - prob) <= 1e-4
        assert group.finding_type.value == label_concept(label).value
        assert group.tracking_identifier == f"MedP-CLIP finding {i}"
        values = {m.name.meaning: m.value for m in group.get_measurements()}
        assert abs(values[codes.DCM.Probability.meaning] - prob) <= 1e-4
        assert abs(values["Whole-image probability of finding"] - image_prob) <= 1e-4
        assert abs(values["Predicted mask IoU"] - ref.iou) <= 1e-4
        (item,) = _prompts(group, code, kind, instance)
        np.testing.assert_allclose(item.value, prompt)
        assert _segment_of(group, seg_ds, instance) == i  # region i is segment i
        assert seg_ds.SegmentSequence[i - 1].TrackingUID == group.tracking_uid
    assert len({g.tracking_uid for g in groups}) == 2

    seg = hd.seg.Segmentation.from_dataset(seg_ds)
    assert [s.SegmentNumber for s in seg_ds.SegmentSequence] == [1, 2]
    pixels = seg.get_pixels_by_source_instance([instance], segment_numbers=[1, 2])
    for k, ref in enumerate(want):
        served = ref.mask.astype(bool)
        assert served.any()
        assert np.mean(pixels[0, :, :, k].astype(bool) != served) < 1e-3


def test_run_decodes_12_bit_jpeg_like_the_server(archive, triton_url, capsys, monkeypatch):
    """12-bit JPEG Extended, which pydicom's own plugins cannot read: the bridge decodes it with
    the client's shared helper (GDCM), as the server does, so the archive is asked for the
    instance once, as stored, and never to transcode it."""
    from pydicom.pixels import get_decoder

    from medpclip_client.pacs.dicomweb import DicomWeb

    if not imaging.is_available(imaging.JPEG_EXTENDED_12BIT):
        pytest.skip("python-gdcm is not installed: no 12-bit JPEG decoder")
    # A fresh medpclip-pacs process starts without the GDCM plugin in pydicom's (global)
    # registry; earlier tests in this one may have added it: start as that process does.
    decoder = get_decoder(imaging.JPEG_EXTENDED_12BIT)
    if imaging._GDCM_12BIT in decoder.available_plugins:
        decoder.remove_plugin(imaging._GDCM_12BIT)
    orthanc, uids, _ = archive
    retrieve, asked = DicomWeb.retrieve, []

    def counting_retrieve(self, ref, *args, **kwargs):
        asked.append((args, kwargs))
        return retrieve(self, ref, *args, **kwargs)

    monkeypatch.setattr(DicomWeb, "retrieve", counting_retrieve)
    before = orthanc.count_instances()
    argv = ["run", "--dicomweb", orthanc.dicomweb, *_address(uids, "JPEG-lossy")]
    argv += ["--point", "128,512", "--triton", triton_url, "--json", "--labels", "a", "b"]
    code, out, err = _run(capsys, *argv)
    assert code == 0, err
    assert asked == [((), {})]  # no second retrieve with a transcoding media type
    assert json.loads(out)["label"] in ("a", "b")
    assert orthanc.count_instances() == before + 1  # the SR


def test_query_processes_all_ct_phantoms_once_with_bounded_concurrency(
    archive, triton_url, capsys, tmp_path
):
    orthanc, uids, _ = archive
    phantom_uids = {uids[f"phantom{i}"][2] for i in range(N_PHANTOMS)}
    state = tmp_path / "state.jsonl"
    argv = [
        "query",
        "--dicomweb",
        orthanc.dicomweb,
        "--modality",
        "CT",
        "--study-date",
        "20240101-20241231",
        "--state",
        str(state),
        "--concurrency",
        "2",
        "--mask-out",
        "--triton",
        triton_url,
        "--json",
        "--labels",
        *CANONICAL,
    ]
    before = orthanc.count_instances()
    code, out, err = _run(capsys, *argv)
    assert code == 0, err
    first = json.loads(out)
    assert {r["instance"] for r in first["results"]} == phantom_uids
    assert first["matched"] == N_PHANTOMS and first["stored"] == N_PHANTOMS
    assert 1 <= first["max_in_flight"] <= 2
    assert orthanc.count_instances() == before + 2 * N_PHANTOMS
    lines = [json.loads(line) for line in state.read_text().splitlines()]
    assert {e["sop_instance_uid"] for e in lines} == phantom_uids
    assert all(e["status"] == "stored" and e["sr"] and e["seg"] for e in lines)

    # resumed: everything is in the state file, nothing is fetched or stored again
    code, out, err = _run(capsys, *[a for a in argv if a != "--json"])
    assert code == 0, err
    assert f"{N_PHANTOMS} matched, 0 stored, {N_PHANTOMS} already done" in out
    assert orthanc.count_instances() == before + 2 * N_PHANTOMS

    # the archive unreachable: the search fails, nothing runs
    closed = f"http://127.0.0.1:{free_port()}/dicom-web"
    code, out, err = _run(capsys, *[closed if a == orthanc.dicomweb else a for a in argv])
    assert code == 4 and "cannot connect" in err

    # a different request must not reuse the state file (its skips would be wrong)
    code, _, err = _run(capsys, *[a if a != "--mask-out" else "-v" for a in argv])
    assert code == 2 and "different request" in err


def test_query_with_two_regions_stores_one_sr_per_instance(archive, triton_url, capsys, tmp_path):
    orthanc, uids, _ = archive
    phantom_uids = {uids[f"phantom{i}"][2] for i in range(N_PHANTOMS)}
    state = tmp_path / "state.jsonl"
    argv = ["query", "--dicomweb", orthanc.dicomweb, "--modality", "CT", "--study-date"]
    argv += [PHANTOM_DATE, "--state", str(state), "--box", "10,10,40,40", "--box", "50,50,90,90"]
    argv += ["--triton", triton_url, "--json", "--labels", *CANONICAL]
    before = orthanc.count_instances()
    code, out, err = _run(capsys, *argv)
    assert code == 0, err
    answer = json.loads(out)
    assert {r["instance"] for r in answer["results"]} == phantom_uids
    for result in answer["results"]:
        assert [r["region"]["data"][0] for r in result["regions"]] == [[10, 10], [50, 50]]
        assert result["seg"] is None
    assert orthanc.count_instances() == before + N_PHANTOMS  # one SR each
    lines = [json.loads(line) for line in state.read_text().splitlines()]
    assert all(len(e["regions"]) == 2 and e["label"] == e["regions"][0]["label"] for e in lines)


def test_a_single_region_request_is_what_it_was():
    from medpclip_client.pacs import Request
    from medpclip_client.pacs.bridge import RegionPrompt

    one = Request(labels=("a", "b"), points=((1.0, 2.0),), mask_out=True)
    assert one.fingerprint() == '[["a","b"],[[1.0,2.0]],null,true,null]'  # state files, UIDs
    assert one.prompts() == (RegionPrompt(points=((1.0, 2.0),)),)
    regions = (RegionPrompt(box=(0, 0, 5, 5)), RegionPrompt(points=((1, 2),)))
    two = Request(labels=("a",), regions=regions)
    assert two.prompts() == regions
    assert two.fingerprint() != Request(labels=("a",), box=(0, 0, 5, 5)).fingerprint()
    with pytest.raises(ValueError, match="not both"):
        Request(labels=("a",), box=(0, 0, 5, 5), regions=regions)


def _error_cases():
    # (id, argv builder(orthanc, uids, triton_url), exit code, message part)
    def run(name, *extra, dicomweb=None, triton=None, labels=("a nodule", "a cyst")):
        def build(orthanc, uids, triton_url):
            return [
                "run",
                "--dicomweb",
                dicomweb or orthanc.dicomweb,
                *_address(uids, name),
                *(extra or ("--point", "40,40")),
                "--triton",
                triton or triton_url,
                "--labels",
                *labels,
            ]

        return build

    closed = f"http://127.0.0.1:{free_port()}/dicom-web"
    yield "orthanc-unreachable", run("phantom1", dicomweb=closed), 4, "cannot connect"
    yield (
        "triton-unreachable",
        run("phantom1", triton=f"127.0.0.1:{free_port()}"),
        4,
        ("inference server"),
    )

    def unknown(orthanc, uids, triton_url):
        argv = run("phantom1")(orthanc, uids, triton_url)
        argv[argv.index("--instance") + 1] = "1.2.3.4.5.6.7.8.9"
        return argv

    yield "unknown-uid", unknown, 6, "not in the archive"
    yield "sr-instance", run("test-SR"), 3, "not an image"
    yield "no-pixel-data", run("no_pixels"), 3, "no pixel data"
    # said before any decoding (and without a transcoding attempt), not "install a decoder"
    yield "truncated", run("truncated"), 3, "pixel data is truncated: expected 32768 bytes"
    yield (
        "truncated-12-bit-jpeg",
        run("truncated_jpeg12"),
        3,
        "may be corrupt or truncated, and the archive did not transcode it",
    )
    yield "unsupported-syntax", run("jpeg_xl"), 3, f"{JPEG_XL_LOSSLESS} (JPEG XL"
    yield (
        "no-seg-possible",
        run("phantom_no_frame_of_reference", "--point", "40,40", "--mask-out"),
        (3),
        "Frame Of Reference",
    )
    yield (
        "server-invalid-argument",
        run("phantom1", "--point", "5000,5000"),
        3,
        ("refused the request"),
    )
    # several regions are stored together or not at all: the second one's refusal stores nothing
    yield (
        "second-region-invalid",
        run("phantom1", "--region", "point=40,40", "--region", "box=10,10,5000,5000", "--mask-out"),
        3,
        "(region 2: box 10,10,5000,5000)",
    )


CASES = list(_error_cases())


@pytest.mark.parametrize(
    ("build", "code", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_errors_exit_with_their_code_and_store_nothing(
    archive, triton_url, capsys, build, code, message
):
    orthanc, uids, _ = archive
    before = orthanc.count_instances()
    got, out, err = _run(capsys, *build(orthanc, uids, triton_url))
    assert got == code, err
    assert message in err, err
    assert out == ""
    assert "PHANTOM" not in err and "CompressedSamples" not in err  # no patient names/IDs
    assert orthanc.count_instances() == before  # nothing half-written


def test_module_entry_point_and_usage_errors(capsys):
    r = subprocess.run(
        [sys.executable, "-m", "medpclip_client.pacs", "--help"], capture_output=True, text=True
    )
    assert r.returncode == 0 and "query" in r.stdout and "exit codes" in r.stdout
    assert main(["run", "--dicomweb", "http://x", "--study", "1.2", "--labels", "a"]) == 2
    assert main(["query", "--dicomweb", "http://x", "--state", "s", "--study-date", "2024"]) == 2
    assert (
        main(
            [
                "run",
                "--dicomweb",
                "http://x",
                *("--study", "1.2", "--series", "1.2.3", "--instance", "1.2.3.x"),
                *("--point", "1,2", "--labels", "a"),
            ]
        )
        == 2
    )
    capsys.readouterr()


def test_state_file_survives_a_torn_line_and_admits_one_run(tmp_path):
    from medpclip_client.pacs import InstanceRef, PacsError, StateFile

    path = tmp_path / "state.jsonl"
    path.write_text('{"sop_instance_uid": "1.2.3", "status": "stored"}\n{"sop_instance_u')
    with StateFile(path) as state:
        assert state.is_done("1.2.3") and not state.is_done("1.2.4")
        with pytest.raises(PacsError, match="in use by another run"), StateFile(path):
            pass
        state.request = "k"
        state.record_refused(InstanceRef("1", "1.1", "1.2.4"), PacsError("no pixels"))
    with StateFile(path) as state:
        assert state.is_done("1.2.4") and not state.is_done("1.2.4", retry_refused=True)
        assert state.requests == {"k"}
    assert json.loads(path.read_text().splitlines()[-1])["status"] == "refused"
