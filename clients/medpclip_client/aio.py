"""asyncio client for the MedP-CLIP ensembles, over `tritonclient.grpc.aio`.

Same options, requests and results as `MedPClipClient` (they share request building, response
parsing and the retry policy in `client.py`); the methods are coroutines. For batch jobs,
`infer_many` keeps a bounded number of requests in flight on the one channel:

    async with AsyncMedPClipClient("127.0.0.1:8001") as client:
        requests = (Request(p.read_bytes(), labels=LABELS, tag=p.name) for p in paths)
        async for out in client.infer_many(requests, concurrency=16):
            print(out.request.tag, out.error or out.result.top(1))

Create the client inside the running event loop (e.g. in `async with`): a grpc.aio channel
belongs to the loop it is first used on.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medpclip_core.tensors import MEDP_CLIP_TEXT

from .client import (
    _ENSEMBLES,
    UNSET,
    MedPClipError,
    Region,
    Request,
    Result,
    _ClientBase,
    _SessionBase,
    parse_result,
    parse_text,
    prepare,
    text_inputs,
)

__all__ = ["AsyncMedPClipClient", "AsyncSession", "Outcome"]


@dataclass
class Outcome:
    """One request of `infer_many`: its position in the input (`index`), the request, and
    either `result` or `error` (a `MedPClipError` from the server, an `InputError` for a
    request that could not be built, or another exception)."""

    index: int
    request: Request
    result: Result | None = None
    error: Exception | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class AsyncMedPClipClient(_ClientBase):
    """asyncio client for the `medp_clip`, `medp_clip_image` and `medp_clip_text` ensembles.

    Options (url, timeout_s, retries, TLS, headers, on_retry): as `MedPClipClient`. Use as
    `async with`, or `await close()`. One instance serves any number of concurrent calls over
    its one channel.
    """

    @staticmethod
    def _triton_class() -> type:
        from tritonclient.grpc.aio import InferenceServerClient

        return InferenceServerClient

    async def close(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> AsyncMedPClipClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(
        self, method: str, *args: Any, timeout_s: Any = UNSET, retry: bool = True, **kwargs: Any
    ) -> Any:
        """`await self.triton.<method>(*args, **kwargs)` with the headers, deadline and
        retries (the same `_Attempts` as the sync client; only the wait differs)."""
        attempts = self._attempts(timeout_s, retry)
        while True:
            try:
                fn = getattr(self._client, method)
                return await fn(
                    *args, headers=self.headers, client_timeout=attempts.timeout(), **kwargs
                )
            except self._errors as exc:
                await asyncio.sleep(attempts.failed(exc))

    async def ready(self) -> bool:
        """True when the server and all three ensembles are ready (one try each)."""
        try:
            if not await self._call("is_server_ready", retry=False):
                return False
            for m in _ENSEMBLES:
                if not await self._call("is_model_ready", m.name, retry=False):
                    return False
            return True
        except MedPClipError:
            return False

    async def infer(
        self,
        image: bytes | np.ndarray,
        region: Region | None = None,
        labels: Sequence[str] | None = None,
        window: tuple[float, float] | None = None,
        *,
        timeout_s: float | None = UNSET,
    ) -> Result:
        """As `MedPClipClient.infer`."""
        model, inputs, outputs = prepare(Request(image, region, labels, window))
        response = await self._call(
            "infer", model.name, inputs, outputs=outputs, timeout_s=timeout_s
        )
        return parse_result(model, labels, response)

    def session(
        self,
        image: bytes | np.ndarray,
        window: tuple[float, float] | None = None,
        *,
        timeout_s: float | None = UNSET,
    ) -> AsyncSession:
        """As `MedPClipClient.session`, used as `async with client.session(image) as s:` and
        `await s.infer(region, labels)`. Several `s.infer` calls may run concurrently (e.g.
        `asyncio.gather`); they share the one encode."""
        return AsyncSession(self, image, window, timeout_s)

    async def text_embeddings(
        self, labels: Sequence[str], *, timeout_s: float | None = UNSET
    ) -> np.ndarray:
        """As `MedPClipClient.text_embeddings`."""
        inputs = text_inputs(labels)
        response = await self._call("infer", MEDP_CLIP_TEXT.name, inputs, timeout_s=timeout_s)
        return parse_text(response)

    async def _outcome(self, index: int, request: Request) -> Outcome:
        try:
            result = await self.infer(request.image, request.region, request.labels, request.window)
        except Exception as exc:  # noqa: BLE001 - one item's failure is that item's outcome
            return Outcome(index, request, error=exc)
        return Outcome(index, request, result=result)

    async def infer_many(
        self,
        requests: Iterable[Request] | AsyncIterable[Request],
        concurrency: int = 8,
    ) -> AsyncIterator[Outcome]:
        """Run `requests` with at most `concurrency` in flight; yield an `Outcome` per request
        AS IT COMPLETES (not in input order: a slow request does not hold back the others;
        `Outcome.index` is the input position, to restore the order).

        A failed request becomes an `Outcome` with `error` and does not stop the batch (each
        request still gets the client's retries and deadline). `requests` is consumed lazily,
        one item per free slot, so a generator that reads files keeps at most `concurrency`
        images in memory; that window bounds the calls in flight, no semaphore needed. Leaving
        the `async for` early (`aclose()`) waits for the requests still in flight.
        """
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        source = _aiter(requests)
        pending: set[asyncio.Task[Outcome]] = set()
        index, exhausted = 0, False
        try:
            while True:
                while not exhausted and len(pending) < concurrency:
                    try:
                        request = await anext(source)
                    except StopAsyncIteration:
                        exhausted = True
                        break
                    pending.add(asyncio.ensure_future(self._outcome(index, request)))
                    index += 1
                if not pending:
                    return
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in sorted(done, key=lambda t: t.result().index):
                    yield task.result()
        finally:
            # Leaving early lets the requests in flight finish (each is bounded by the deadline)
            # rather than cancelling them: Triton up to 24.11 (2.52) can crash when a gRPC
            # request is cancelled while it runs (triton-inference-server/server#7368).
            await asyncio.gather(*pending, return_exceptions=True)


class AsyncSession(_SessionBase):
    """As `client.Session`, for `AsyncMedPClipClient` (made by its `session`)."""

    def __init__(
        self,
        client: AsyncMedPClipClient,
        image: bytes | np.ndarray,
        window: tuple[float, float] | None = None,
        timeout_s: Any = UNSET,
    ) -> None:
        super().__init__(image, window, timeout_s)
        self.client = client
        self._lock: asyncio.Lock | None = None  # made in the running loop, on first use

    async def encode(self, *, timeout_s: float | None = UNSET) -> AsyncSession:
        """Encode the image (once: concurrent first calls wait for the one encode)."""
        if self.tokens is not None:
            return self
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self.tokens is None:
                model, inputs, outputs = self._encode_request()
                response = await self.client._call(
                    "infer",
                    model.name,
                    inputs,
                    outputs=outputs,
                    timeout_s=self._timeout(timeout_s),
                )
                self._encoded(model, response)
        return self

    async def infer(
        self,
        region: Region | None = None,
        labels: Sequence[str] | None = None,
        *,
        timeout_s: float | None = UNSET,
    ) -> Result:
        """As `Session.infer`."""
        await self.encode(timeout_s=timeout_s)
        model, inputs, outputs = self._prompt_request(region, labels)
        response = await self.client._call(
            "infer", model.name, inputs, outputs=outputs, timeout_s=self._timeout(timeout_s)
        )
        return parse_result(model, labels, response)

    def close(self) -> None:
        """Drop the tokens (the server holds nothing to release)."""
        self._close()

    async def __aenter__(self) -> AsyncSession:
        return await self.encode()

    async def __aexit__(self, *exc: object) -> None:
        self.close()


async def _aiter(items: Iterable[Request] | AsyncIterable[Request]) -> AsyncIterator[Request]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item
