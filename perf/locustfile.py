"""Locust load test of the MedP-CLIP ensembles over gRPC.

    locust -f perf/locustfile.py --headless -u 4 -r 2 -t 30s --host 127.0.0.1:8001

A mix of what clients do: region classification against a label list, embeddings only, and
interactive segmentation, on phantom CT slices sent as DICOM; every answer is checked.
"""

from __future__ import annotations

# gRPC must cooperate with gevent before tritonclient is imported, or users take turns.
import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()

import time  # noqa: E402

import numpy as np  # noqa: E402
from locust import User, between, events, task  # noqa: E402

from medpclip.evaluate import centre_point  # noqa: E402
from medpclip.phantoms import CANONICAL, phantoms, to_dicom  # noqa: E402
from medpclip_client import MedPClipClient, Region  # noqa: E402

CASES = [(to_dicom(p, i), p) for i, p in enumerate(phantoms(seed=4242, count=8))]


class MedPClipUser(User):
    wait_time = between(0.05, 0.2)

    def on_start(self) -> None:
        self.client = MedPClipClient(self.host or "127.0.0.1:8001", timeout_s=30)
        self.rng = np.random.default_rng()

    def on_stop(self) -> None:
        self.client.close()

    def _call(self, name: str, fn) -> None:
        start = time.perf_counter()
        exc = None
        try:
            fn()
        except Exception as e:  # reported to locust as a failure
            exc = e
        events.request.fire(
            request_type="grpc",
            name=name,
            context={},
            exception=exc,
            response_time=(time.perf_counter() - start) * 1000,
            response_length=0,
        )

    def _case(self):
        data, p = CASES[int(self.rng.integers(len(CASES)))]
        return data, p, p.findings[int(self.rng.integers(len(p.findings)))]

    @task(3)
    def classify_region(self) -> None:
        data, _, f = self._case()

        def run():
            r = self.client.infer(data, Region(points=[centre_point(f)]), labels=CANONICAL)
            assert r.region_probs.shape == (len(CANONICAL),)
            assert abs(float(r.region_probs.sum()) - 1) < 1e-4

        self._call("medp_clip point+labels", run)

    @task(1)
    def embeddings_only(self) -> None:
        data, _, f = self._case()

        def run():
            r = self.client.infer(data, Region(box=f.box))
            assert abs(float(np.linalg.norm(r.region_embedding)) - 1) < 1e-3

        self._call("medp_clip_image box", run)

    @task(1)
    def segment(self) -> None:
        data, p, f = self._case()

        def run():
            r = self.client.infer(data, Region(points=[centre_point(f)]))
            assert r.mask.shape == p.hu.shape

        self._call("medp_clip_image segment", run)
