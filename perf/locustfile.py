"""Locust load test of the MedP-CLIP ensembles over gRPC.

    locust -f perf/locustfile.py --headless --host 127.0.0.1:8001

A mix of what clients do: region classification against a label list, embeddings only,
interactive segmentation, and every finding of one image through a session (one encode, one
prompt each), on phantom CT slices sent as DICOM; every answer is checked.
The load ramps in stages (`RampShape`) and the run ends by itself after the last one; set
MEDPCLIP_RAMP="users:seconds,..." to change them (e.g. "2:6" for a few-second smoke test).

A server with TLS and an API key (python -m medpclip_tools.serve --tls-cert ... --api-key-file ...):
MEDPCLIP_ROOT_CERT=<CA file> turns TLS on and verifies the server with that CA;
MEDPCLIP_API_KEY_FILE=<file> holds the key sent as "authorization: Bearer <key>". Both are file
paths, as Kubernetes and compose mount secrets (deploy/k8s/base/locust-job.yaml,
deploy/compose/tls.yml); without a key file the client falls back to MEDPCLIP_API_KEY.
"""

from __future__ import annotations

# gRPC must cooperate with gevent before tritonclient is imported, or users take turns.
import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()

import logging  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from collections.abc import Mapping  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from locust import LoadTestShape, User, between, events, task  # noqa: E402

from medpclip_client import MedPClipClient, Region  # noqa: E402
from medpclip_tools.evaluate import centre_point  # noqa: E402
from medpclip_tools.phantoms import CANONICAL, phantoms, to_dicom  # noqa: E402

CASES = [(to_dicom(p, i), p) for i, p in enumerate(phantoms(seed=4242, count=8))]

ROOT_CERT_ENV = "MEDPCLIP_ROOT_CERT"
API_KEY_FILE_ENV = "MEDPCLIP_API_KEY_FILE"
LOG = logging.getLogger("medpclip.locust")


def connection_options(environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """MedPClipClient options for TLS and the API key, from the files the environment names.

    Paths, never values: a key in an environment variable shows in pod specs and `ps e`.
    Called once at import, so the key file is read once for all users, and a missing or empty
    file stops the run before it starts: otherwise every user's on_start would fail, locust
    would report 0 requests and 0 failures, and a broken secret mount would look like success.
    The key itself is never logged or put in an error message."""
    options: dict[str, Any] = {}
    cert = environ.get(ROOT_CERT_ENV) or None
    if cert is not None:
        if not Path(cert).is_file():
            raise SystemExit(f"{ROOT_CERT_ENV}={cert}: no such file (the CA certificate)")
        options["root_certificates"] = cert
    key_file = environ.get(API_KEY_FILE_ENV) or None
    if key_file is not None:
        try:
            key = Path(key_file).read_text().strip()  # a trailing newline is not part of it
        except OSError as exc:
            raise SystemExit(
                f"{API_KEY_FILE_ENV}={key_file}: cannot read: {exc.strerror}"
            ) from None
        if not key:
            raise SystemExit(f"{API_KEY_FILE_ENV}={key_file}: the file is empty")
        options["api_key"] = key
    LOG.info(
        "gRPC %s, API key %s",
        f"over TLS (CA {cert})" if cert else "in plaintext",
        f"from {key_file}" if key_file else "none (or MEDPCLIP_API_KEY)",
    )
    return options


CONNECTION = connection_options()


class MedPClipUser(User):
    wait_time = between(0.05, 0.2)

    def on_start(self) -> None:
        self.client = MedPClipClient(self.host or "127.0.0.1:8001", timeout_s=30, **CONNECTION)
        self.rng = np.random.default_rng()

    def on_stop(self) -> None:
        # Closed here, while gevent still runs: a close left to tritonclient's __del__ at
        # interpreter exit deadlocks gRPC and hung about 1 locust run in 4 after its summary
        # (MedPClipClient.close makes the second close a no-op).
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


    @task(1)
    def every_finding_of_one_image(self) -> None:
        """A viewer asking about each finding of one image: one encode, one prompt each."""
        data, p, _ = self._case()

        def run():
            with self.client.session(data) as s:
                for f in p.findings:
                    r = s.infer(Region(points=[centre_point(f)]), labels=CANONICAL)
                    assert abs(float(r.region_probs.sum()) - 1) < 1e-4

        self._call("session encode+prompts", run)


class RampShape(LoadTestShape):
    """Stages of (users, seconds), cumulative; the test stops after the last stage."""

    stages = [
        (int(u), float(t))
        for u, t in (
            stage.split(":")
            for stage in os.environ.get("MEDPCLIP_RAMP", "2:30,4:30,8:60,16:60").split(",")
        )
    ]

    def tick(self):
        elapsed, end = self.get_run_time(), 0.0
        for users, seconds in self.stages:
            end += seconds
            if elapsed < end:
                return users, max(1, users)  # spawn rate: reach the stage within a second
        return None
