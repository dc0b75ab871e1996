"""The phantom generator: deterministic, labelled, and a valid DICOM path."""

from __future__ import annotations

import io

import numpy as np
import pydicom

from medpclip_core import imaging
from medpclip_tools.phantoms import FINDINGS, KINDS, WINDOW, phantoms, to_dicom


def test_deterministic_from_seed():
    a, b = phantoms(5, 3), phantoms(5, 3)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x.hu, y.hu)
        assert [f.kind for f in x.findings] == [f.kind for f in y.findings]
    assert not np.array_equal(phantoms(6, 1)[0].hu, a[0].hu)


def test_two_or_more_findings_of_different_kinds_with_masks_and_boxes():
    for p in phantoms(0, 20):
        kinds = [f.kind for f in p.findings]
        assert len(kinds) >= 2 and len(set(kinds)) == len(kinds)
        assert set(kinds) <= set(KINDS)
        for f in p.findings:
            ys, xs = np.nonzero(f.mask)
            assert f.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert f.label == FINDINGS[f.kind][0] and len(FINDINGS[f.kind]) >= 3
        union = sum(f.mask.astype(int) for f in p.findings)
        assert union.max() == 1  # findings never overlap


def test_dicom_carries_rescale_and_window_and_decodes_to_the_same_image():
    p = phantoms(1, 1)[0]
    data = to_dicom(p, 7)
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.Modality == "CT" and ds.RescaleSlope == 1 and ds.RescaleIntercept == -1024
    assert (float(ds.WindowCenter), float(ds.WindowWidth)) == WINDOW
    assert np.array_equal(pydicom.pixels.apply_modality_lut(ds.pixel_array, ds), p.hu)
    served = imaging.decode_image(data)
    assert np.array_equal(served, imaging.pixels_to_image(p.hu.astype(np.float32), WINDOW))
