"""`serve_cli serve`: the ONNX export as an HTTP service over several model workers, torch-free.

    serve_cli serve --model runs/agnews_minilm/onnx --port 8080
    curl -s localhost:8080/predict -H 'content-type: application/json' -d '{"inputs": "Stocks rally as oil falls"}'

`POST /predict` takes and answers what Hugging Face text-embeddings-inference (TEI) does for sequence
classifiers: `{"inputs": "text" | ["a", "b"], "raw_scores": false, "truncate": true}` -> every label with
its score, best first (a list of such lists for a batch); `top_k` keeps only the best k. A pair model takes
TEI's pair shapes: `["text", "text_pair"]` is one pair, `[["a", "b"], ["c", "d"]]` a batch of pairs. A
regression model answers `[{"score": value, "label": target name}]` (the value in the data's units). Errors are JSON
`{"error", "error_type"}`: 413 payload or batch too large (or too long with truncate=false), 422 bad input,
429 queue full (with Retry-After), 504 timeout. `GET /health`, `/ready`, `/info`, `/metrics` (Prometheus),
`/docs` (OpenAPI), and a try-it page at `/`.

A free model worker takes the next request (with --max-batch-size above 1, concurrent requests are
merged: it waits at most --max-wait-ms after the first for up to that many rows), tokenizes its rows and
runs them length-sorted in sub-batches under --max-batch-tokens and --max-padding. In a deep queue
(--merge-depth rows waiting), single texts are tokenized on arrival and the head request runs with waiting
texts of exactly its token length (--merge-rows). Each worker is a thread owning its own ONNX session
(--workers, default 2 of one thread each on 2 cores). The event loop never runs the model, so it keeps
answering /health while the model works. Each request gets exactly its own rows back.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import logging
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse, Response

from loraship.task import Task
from serve_cli.page import PAGE
from serve_cli.runtime import (
    DEFAULT_BATCH_SIZE,
    MAX_PADDING,
    OnnxClassifier,
    int8_batch_independent,
    length_batches,
)

log = logging.getLogger("serve_cli.http")


@dataclass
class Limits:
    """Defaults sized for a 2-core machine (see the README's serving benchmark)."""

    max_batch_tokens: int = 16384  # padded tokens in one ONNX run (rows x longest row)
    # Rows of concurrent requests merged into one batch. 1: a free worker takes the next request alone. With
    # length-sorted, tightly padded sub-batches, merging single texts saves no time per row on one thread,
    # while every request of a merged batch waits for all of it: its latency then spreads with its batch
    # mates' lengths (benchmarks/serve_http.py: ours vs ours-batch4).
    max_batch_size: int = 1
    max_wait_ms: float = 2.0  # how long the first request of an idle batcher waits for company
    max_padding: float = MAX_PADDING  # a sub-batch ends where padding would pass this share of its tokens (1 = no limit)
    max_queue: int = 2048  # rows waiting before new requests get 429
    max_client_batch_size: int = 256  # inputs in one request
    payload_limit: int = 2_000_000  # bytes of one request body
    request_timeout_s: float = 30.0  # a request not answered by then gets 504
    # A worker that collected several requests while others sat idle keeps its share and hands the rest
    # back, so the idle workers run them at the same time instead of after (the tail of the latency).
    share_with_idle: bool = True
    # Model workers' threads run this much above the server's nice value (Linux; 0: the same). The event loop,
    # which reads requests and writes answers, then gets a core as soon as it has work instead of waiting for a
    # model run's time slice to end: an answer is not held back behind the next request's model time.
    worker_nice: int = 5
    # When this many rows wait (a new request then waits for several model runs anyway), a single text is
    # tokenized as it arrives, and a worker runs the request at the head of the queue together with waiting
    # single texts of exactly its token length, up to merge_rows rows: rows of one length batch without padding
    # and cost less each than alone, while even a token of padding costs more than batching saves
    # (benchmarks/README.md, serving). Throughput under deep queues; shallow queues are served as before. 0: never.
    merge_depth: int = 16
    merge_rows: int = 4


class ApiError(Exception):
    def __init__(self, status: int, message: str, error_type: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.error_type, self.headers = status, message, error_type, headers or {}


@dataclass(eq=False)  # a job is itself: taking one out of the queue must not find an equal-looking other
class Job:
    texts: list[Any]
    truncate: bool
    future: asyncio.Future[Any]
    part: bool = False  # one share of a request split across the workers: run as a batch of its own
    cancelled: bool = False  # its request timed out: a worker that has not run it yet skips it
    answered: bool = False  # a worker has handed it its result
    encodings: list[Any] | None = None  # tokenized on arrival (deep queue), else by the worker that runs it


SPLIT_MIN_ROWS = 8  # a request of at least twice this many rows is split across the model workers


class Metrics:
    """Prometheus metrics in a registry of this app's own (several apps in one process stay apart)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("loraship_requests", "HTTP requests by path and status", ["path", "status"], registry=self.registry)
        self.latency = Histogram("loraship_request_seconds", "request latency", ["path"], registry=self.registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.batch_rows = Histogram("loraship_batch_rows", "rows per model run", registry=self.registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.batch_tokens = Histogram("loraship_batch_tokens", "padded tokens per model run", registry=self.registry,
                                      buckets=(64, 256, 1024, 4096, 8192, 16384, 32768, 65536))
        self.queue_rows = Gauge("loraship_queue_rows", "rows waiting for the model", registry=self.registry)
        self.rows = Counter("loraship_rows", "rows predicted", registry=self.registry)


class Batcher:
    """Model workers fed from one queue: each worker is a thread that owns its own ONNX session and takes
    the next request from the queue itself when it is free, so a worker never waits for the event loop to
    hand it work (the loop parses requests and writes answers meanwhile). With two workers of one thread
    each, small batches do not pay for onnxruntime's cross-thread synchronisation (measured on 2 cores:
    README, serving benchmark)."""

    def __init__(self, models: list[OnnxClassifier], limits: Limits, metrics: Metrics) -> None:
        self.models, self.limits, self.metrics = models, limits, metrics
        self.jobs: collections.deque[Job] = collections.deque()
        self.cond = threading.Condition()  # guards jobs, pending_rows, idle and stopping
        self.pending_rows = 0
        self.idle = 0  # workers waiting for a first request
        self.stopping = False
        self.threads: list[threading.Thread] = []
        self.loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.threads = [threading.Thread(target=self._work, args=(clf,), name=f"onnx{i}", daemon=True)
                        for i, clf in enumerate(self.models)]
        for thread in self.threads:
            thread.start()

    async def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        for thread in self.threads:
            await asyncio.to_thread(thread.join)

    async def submit(self, texts: list[Any], truncate: bool) -> np.ndarray:
        """Logits for `texts`, in order; 429 when the queue is full, 504 after the request timeout. A large
        request is split into one share per worker, so idle workers run it together instead of one alone
        (the shares' rows are the same rows: with fp32 or batch-independent int8 the answers are too)."""
        loop = asyncio.get_running_loop()
        shares = max(1, min(len(self.models), len(texts) // SPLIT_MIN_ROWS))
        bounds = [len(texts) * k // shares for k in range(shares + 1)]
        jobs = [Job(texts[a:b], truncate, loop.create_future(), part=shares > 1) for a, b in itertools.pairwise(bounds)]
        if len(texts) == 1 and 0 < self.limits.merge_depth <= self.pending_rows:
            jobs[0].encodings = self.models[0].encode(texts)  # so a worker can find it rows of its length
        with self.cond:
            if self.pending_rows + len(texts) > self.limits.max_queue:
                raise ApiError(429, f"queue full ({self.pending_rows} rows waiting, limit {self.limits.max_queue}); retry shortly",
                               "Overloaded", {"Retry-After": "1"})
            self.pending_rows += len(texts)
            self.jobs.extend(jobs)
            self.cond.notify_all()
            self.metrics.queue_rows.set(self.pending_rows)
        # A timer answers 504 rather than asyncio.wait_for: no task or shield per request on the event loop.
        timer = loop.call_later(self.limits.request_timeout_s, _expire, jobs, self.limits.request_timeout_s)
        try:
            if len(jobs) == 1:
                return await jobs[0].future
            results = await asyncio.gather(*(j.future for j in jobs), return_exceptions=True)
        except asyncio.CancelledError:  # the client went away: workers skip what they have not run yet
            for job in jobs:
                job.cancelled = True
            raise
        finally:
            timer.cancel()
        failed = next((r for r in results if isinstance(r, BaseException)), None)
        if failed is not None:
            raise failed
        return np.concatenate(results)

    def _collect(self) -> list[Job] | None:
        """Worker thread: the next batch (None when the server stops). With --max-batch-size above 1, waits up
        to --max-wait-ms after the first request for more rows; a share of a split request runs alone."""
        with self.cond:
            self.idle += 1
            while not self.jobs and not self.stopping:
                self.cond.wait()
            self.idle -= 1
            if self.stopping:
                return None
            jobs = [self.jobs.popleft()]
            if jobs[0].encodings is not None:
                jobs += self._same_length(jobs[0])
            rows = sum(len(j.texts) for j in jobs)
            deadline = time.monotonic() + self.limits.max_wait_ms / 1000
            while not jobs[0].part and rows < self.limits.max_batch_size:
                if not self.jobs:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or self.stopping:
                        break
                    self.cond.wait(remaining)
                    continue
                if self.jobs[0].part:  # left for an idle worker; this batch runs as it is
                    break
                jobs.append(self.jobs.popleft())
                rows += len(jobs[-1].texts)
            jobs = self._share(jobs, rows)
            self.pending_rows -= sum(len(j.texts) for j in jobs)
            self.metrics.queue_rows.set(self.pending_rows)
        return jobs

    def _same_length(self, head: Job) -> list[Job]:
        """Waiting single texts, tokenized on arrival, of exactly `head`'s token length (up to merge_rows - 1 of
        them, first come first): taken out of the queue to run in one batch with it (called holding the lock)."""
        assert head.encodings is not None
        width, found = len(head.encodings[0]), []
        for job in itertools.islice(self.jobs, 4 * self.limits.merge_depth):  # bounded time under the lock
            if len(found) + 1 >= self.limits.merge_rows:
                break
            if job.encodings is not None and len(job.encodings[0]) == width and not job.cancelled:
                found.append(job)
        for job in found:
            self.jobs.remove(job)
        return found

    def _share(self, jobs: list[Job], rows: int) -> list[Job]:
        """With workers idle, keep an even share of the collected rows and queue the rest again for them, first
        in line (called holding the lock)."""
        if not (self.limits.share_with_idle and self.idle and len(jobs) > 1):
            return jobs
        share = -(-rows // (self.idle + 1))
        kept, n = [], 0
        for k, job in enumerate(jobs):
            if kept and n >= share:
                self.jobs.extendleft(reversed(jobs[k:]))
                self.cond.notify_all()
                break
            kept.append(job)
            n += len(job.texts)
        return kept

    def _work(self, clf: OnnxClassifier) -> None:
        """Worker thread: run batches until the server stops; each answer goes back to the event loop."""
        _lower_priority(self.limits.worker_nice)
        while (jobs := self._collect()) is not None:
            jobs = [j for j in jobs if not j.cancelled]
            if not jobs:
                continue
            try:
                self._infer(clf, jobs)
            except Exception as e:  # a model failure answers its requests; the worker goes on
                log.exception("model run failed")
                for job in jobs:
                    if not job.answered:
                        self._answer(job, ApiError(500, f"model run failed: {type(e).__name__}: {e}", "Backend"))

    def _answer(self, job: Job, result: np.ndarray | ApiError) -> None:
        """Worker thread: hand a request its result (the event loop sets it)."""
        job.answered = True
        assert self.loop is not None
        self.loop.call_soon_threadsafe(_settle, job.future, result)

    def _infer(self, clf: OnnxClassifier, jobs: list[Job]) -> None:
        """Worker thread: tokenize every row, run length-sorted sub-batches under the token budget, and answer
        each request as soon as its own rows are done (not when the whole batch is)."""
        texts = [t for j in jobs for t in j.texts]
        todo = [j for j in jobs if j.encodings is None]
        fresh = iter(clf.encode([t for j in todo for t in j.texts]) if todo else [])
        for job in todo:
            job.encodings = [next(fresh) for _ in job.texts]
        encs = [e for j in jobs for e in j.encodings or ()]
        owner = [k for k, j in enumerate(jobs) for _ in j.texts]
        start = list(itertools.accumulate((len(j.texts) for j in jobs), initial=0))
        left = [len(j.texts) for j in jobs]  # rows not yet run, per job
        for k, job in enumerate(jobs):
            if not job.truncate and any(encs[i].overflowing for i in range(start[k], start[k + 1])):
                left[k] = -1
                message = f"an input is longer than the model's {clf.max_length} tokens and truncate is false"
                self._answer(job, ApiError(413, message, "Validation"))
        order = sorted((i for i in range(len(texts)) if left[owner[i]] >= 0), key=lambda i: len(encs[i]))
        logits = np.zeros((len(texts), len(clf.labels)), dtype=np.float32)
        widths = [len(encs[i]) for i in order]
        # One request's own rows batch up to the usual batch size: sorted, they pad little.
        rows_per_run = max(self.limits.max_batch_size, DEFAULT_BATCH_SIZE)
        for a, b in length_batches(widths, rows_per_run, self.limits.max_batch_tokens, self.limits.max_padding):
            idx = order[a:b]
            logits[idx] = clf.run([encs[i] for i in idx])
            self.metrics.batch_rows.observe(len(idx))
            self.metrics.batch_tokens.observe(len(idx) * widths[b - 1])
            for i in idx:
                k = owner[i]
                left[k] -= 1
                if left[k] == 0:
                    self._answer(jobs[k], logits[start[k] : start[k + 1]].copy())
        self.metrics.rows.inc(len(order))


def _lower_priority(increment: int) -> None:
    """Raise the calling thread's nice value by `increment` (up to 19). Linux only: elsewhere the nice value is
    the whole process's, the event loop's too."""
    if increment <= 0 or not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(os.getpriority(os.PRIO_PROCESS, tid) + increment, 19))
    except OSError as e:
        log.warning("model worker keeps the server's priority: %s", e)


def _expire(jobs: list[Job], timeout_s: float) -> None:
    """Event loop: a request's time is up: 504, and workers skip its rows if they have not run them yet."""
    for job in jobs:
        job.cancelled = True
        if not job.future.done():
            job.future.set_exception(ApiError(504, f"no answer within {timeout_s:g}s", "Timeout"))


def _settle(future: asyncio.Future[Any], result: np.ndarray | ApiError) -> None:
    """Event loop: answer a request's future (unless it timed out meanwhile)."""
    if future.done():
        return
    if isinstance(result, ApiError):
        future.set_exception(result)
    else:
        future.set_result(result)


def _shape(inputs: Any, pair: bool) -> tuple[list[Any], bool]:
    """(inputs as a list, single) for TEI's shapes. One-text models: "a" or ["a", "b", ...] (or [["a"], ["b"]]).
    Pair models: ["a", "b"] is one pair, [["a", "b"], ...] a batch of pairs."""
    if pair:
        if isinstance(inputs, str):
            raise ApiError(422, 'this model reads pairs of texts: send "inputs": ["text", "text_pair"] or a list of such pairs', "Validation")
        if isinstance(inputs, list) and inputs and all(isinstance(x, str) for x in inputs):
            if len(inputs) != 2:
                raise ApiError(422, f'a pair is two texts, ["text", "text_pair"]; got {len(inputs)}', "Validation")
            return [tuple(inputs)], True
        items = inputs if isinstance(inputs, list) else None
        if items is None or not items:
            raise ApiError(422, '"inputs" must be a pair ["a", "b"] or a non-empty list of pairs', "Empty" if items == [] else "Validation")
        for i, x in enumerate(items):
            if not (isinstance(x, list) and len(x) == 2):
                raise ApiError(422, f'inputs[{i}] must be a pair ["text", "text_pair"]', "Validation")
        return [tuple(x) for x in items], False
    if isinstance(inputs, str):
        return [inputs], True
    if isinstance(inputs, list) and inputs and all(isinstance(x, list) for x in inputs):
        if any(len(x) == 2 for x in inputs):
            raise ApiError(422, "this model reads one text per input, not pairs", "Validation")
        return [x[0] if len(x) == 1 else x for x in inputs], False  # TEI's [["a"], ["b"]]
    if not isinstance(inputs, list) or not inputs:
        raise ApiError(422, '"inputs" must be a non-empty string or a non-empty list of strings', "Empty" if inputs == [] else "Validation")
    return inputs, False


def parse_predict(body: bytes, limits: Limits, pair: bool = False) -> tuple[list[Any], bool, bool, bool, int | None]:
    """(texts or pairs, single, raw_scores, truncate, top_k) of a /predict body, or ApiError 413/422."""
    try:
        req = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(422, f"body is not valid JSON: {e}", "Validation") from None
    if not isinstance(req, dict) or "inputs" not in req:
        raise ApiError(422, 'expected a JSON object with "inputs": ' + ('a pair ["a", "b"] or a list of pairs' if pair
                       else "a string or a list of strings"), "Validation")
    texts, single = _shape(req["inputs"], pair)
    if len(texts) > limits.max_client_batch_size:
        raise ApiError(413, f"{len(texts)} inputs in one request; the limit is {limits.max_client_batch_size}", "Validation")
    for i, item in enumerate(texts):
        for j, t in enumerate(item if isinstance(item, tuple) else (item,)):
            at = f"inputs[{i}]" + (f"[{j}]" if isinstance(item, tuple) else "")
            if not isinstance(t, str):
                raise ApiError(422, f"{at} must be a string, got {type(t).__name__}", "Validation")
            if not t.strip():
                raise ApiError(422, f"{at} is empty", "Empty")
    flags = {}
    for name, default in (("raw_scores", False), ("truncate", True)):
        value = req.get(name, default)
        if not isinstance(value, bool):
            raise ApiError(422, f'"{name}" must be true or false', "Validation")
        flags[name] = value
    top_k = req.get("top_k")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ApiError(422, '"top_k" must be a positive integer or null', "Validation")
    return texts, single, flags["raw_scores"], flags["truncate"], top_k


def scores(logits: np.ndarray, task: Task, raw: bool, top_k: int | None) -> list[list[dict[str, Any]]]:
    """TEI's shape: per input, labels with scores, best first. Multi-label: each label's sigmoid probability
    (they do not sum to 1) and `chosen`, whether it is on at its threshold (the same decision as files)."""
    probs = task.probs(logits)
    values = logits if raw else probs
    on = task.predict(probs) if task.multi else None
    out = []
    orders = np.argsort(-values, axis=-1, kind="stable")[:, : top_k or len(task.labels)].tolist()
    for r, (row, order) in enumerate(zip(values.tolist(), orders, strict=True)):
        items = [{"score": row[i], "label": task.labels[i]} for i in order]
        if on is not None:
            for item, i in zip(items, order, strict=True):
                item["chosen"] = bool(on[r, i])
        out.append(items)
    return out


class FrontDoor:
    """The server's front door, as plain ASGI around the FastAPI app: timing header, metrics and one log line
    per request, and `/predict` served directly (the FastAPI app serves everything else).

    Per request, Starlette's `@app.middleware("http")` adds a task and a response stream, and FastAPI's routing,
    dependency solving and middleware stack cost the event loop about as much as the predict handler itself:
    work that a 2-core machine takes from the model (benchmarks/serve_http.py, event-loop CPU per request).
    """

    def __init__(self, app: Any, metrics: Metrics, predict: Any) -> None:
        self.app, self.metrics, self.predict = app, metrics, predict

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        state = scope.setdefault("state", {})  # request.state: the handler records its rows there
        status = 0

        async def timed_send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                ms = 1000 * (time.perf_counter() - t0)
                message = {**message, "headers": [*message.get("headers", []), (b"x-total-time", f"{ms:.1f}".encode())]}
            await send(message)

        try:
            await (self.predict if scope["path"] == "/predict" else self.app)(scope, receive, timed_send)
        except Exception:
            log.exception("unhandled error")
            if status == 0:  # nothing sent yet: the client still gets a JSON answer
                await send_json(timed_send, 500, {"error": "internal error", "error_type": "Backend"})
            else:
                status = 500
        ms = 1000 * (time.perf_counter() - t0)
        path = scope["path"] if scope["path"] in _KNOWN_PATHS else "other"
        status = status or 499  # the client closed the connection before its answer (nginx's code for it)
        self.metrics.requests.labels(path, str(status)).inc()
        self.metrics.latency.labels(path).observe(ms / 1000)
        log.info("%s %s %d rows=%d %.1fms", scope["method"], scope["path"], status, state.get("rows", 0), ms)


async def send_json(send: Any, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
    """One JSON response, encoded as Starlette's JSONResponse does."""
    body = json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    head += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


async def read_body(scope: dict[str, Any], receive: Any, limit: int) -> bytes | None:
    """A request's body (None if the client went away meanwhile); 413 past `limit` bytes (by its content-length
    header, or as it arrives)."""
    size = next((v for k, v in scope["headers"] if k == b"content-length"), None)
    if size is not None and size.isdigit() and int(size) > limit:
        raise ApiError(413, f"payload of {size.decode()} bytes; the limit is {limit}", "Validation")
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body += message.get("body", b"")
        if len(body) > limit:
            raise ApiError(413, f"payload over {limit} bytes", "Validation")
        if not message.get("more_body"):
            return bytes(body)


def create_app(clf: OnnxClassifier, limits: Limits | None = None, log_texts: bool = False,
               more_workers: list[OnnxClassifier] | None = None) -> Any:
    """The app; `clf` and each of `more_workers` (sessions of the same model) become a model worker."""
    limits = limits or Limits()
    models = [clf, *(more_workers or [])]
    metrics = Metrics()
    state: dict[str, Any] = {"ready": False}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        batcher = Batcher(models, limits, metrics)
        batcher.start()
        state["batcher"] = batcher
        # The first ONNX run of each session allocates; users should not wait for it. Each worker's own
        # session, directly: through the batcher the warm-ups could all land in one batch on one worker.
        warm = [("warm up", "warm up")] if clf.task.pair else ["warm up"]
        await asyncio.gather(*(asyncio.to_thread(m.logits, warm) for m in models))
        state["ready"] = True
        log.info("ready: %s (%s), labels %s", clf.model_dir, clf.variant, clf.labels)
        yield
        state["ready"] = False
        await batcher.stop()

    app = FastAPI(title="loraship serve_cli", version=_version(), lifespan=lifespan)

    async def predict(scope: dict[str, Any], receive: Any, send: Any) -> None:
        """POST /predict (TEI's shapes), as plain ASGI: the front door calls it without FastAPI's layers."""
        try:
            if scope["method"] != "POST":
                raise ApiError(405, "use POST /predict", "Validation", {"Allow": "POST"})
            body = await read_body(scope, receive, limits.payload_limit)
            if body is None:
                return  # nobody to answer
            texts, single, raw, truncate, top_k = parse_predict(body, limits, clf.task.pair)
            scope["state"]["rows"] = len(texts)
            if log_texts:
                log.info("texts: %s", json.dumps(texts, ensure_ascii=False)[:2000])
            if not state["ready"]:
                raise ApiError(503, "model is loading", "Unhealthy")
            logits = await state["batcher"].submit(texts, truncate)
            result = scores(logits, clf.task, raw, top_k)
        except ApiError as e:
            await send_json(send, e.status, {"error": e.message, "error_type": e.error_type}, e.headers)
            return
        await send_json(send, 200, result[0] if single else result)

    def openapi() -> dict[str, Any]:
        """FastAPI's schema of its own routes, and /predict's (served by the front door, not a FastAPI route)."""
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schema["paths"]["/predict"] = {"post": {
                "summary": "TEI-compatible sequence classification",
                "requestBody": {"required": True, "content": {"application/json": {"schema": PREDICT_SCHEMA}}},
                "responses": {"200": {"description": "per input, every label with its score, best first"},
                              **{str(code): {"description": text} for code, text in PREDICT_ERRORS.items()}}}}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        return JSONResponse({"ready": state["ready"]}, status_code=200 if state["ready"] else 503)

    @app.get("/info")
    async def info() -> dict[str, Any]:
        return {
            # The dir's name only: where the server keeps its files is none of a client's business.
            "model": clf.model_dir.name, "labels": clf.labels, "variant": clf.variant, "task": clf.task.name,
            "thresholds": clf.task.thresholds,
            # What /predict takes: one text per input, or pairs (and the fields the model was trained on)
            "inputs": "pair" if clf.task.pair else "text", "input_fields": clf.task.inputs,
            "target": clf.task.target,  # regression: the target's name and the training scale
            # fp32, or an int8 whose answer for a row never depends on its batch mates (row-wise, static)
            "batch_independent": clf.variant == "fp32" or int8_batch_independent(clf.report),
            "quantization": (clf.report.get("quantization") or {}).get("method") if clf.variant == "int8" else None,
            "max_length": clf.max_length, "limits": asdict(limits), "version": _version(),
            "workers": len(models), "threads_per_worker": clf.threads,
        }

    @app.get("/metrics")
    async def prometheus() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return PAGE

    return FrontDoor(app, metrics, predict)


PREDICT_SCHEMA = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "inputs": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}},
                             {"type": "array", "items": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 2}}],
                   "description": "a text, or a list of texts (answered with a list of lists); pair models: a pair "
                   '["text", "text_pair"], or a list of pairs'},
        "raw_scores": {"type": "boolean", "default": False, "description": "logits instead of probabilities"},
        "truncate": {"type": "boolean", "default": True, "description": "false: inputs over max_length tokens get 413"},
        "top_k": {"type": ["integer", "null"], "default": None, "description": "only the k best labels"},
    },
    "example": {"inputs": "Stocks rally as oil prices fall"},
}

PREDICT_ERRORS = {413: "payload, batch or (with truncate false) an input too large", 422: "invalid input",
                  429: "queue full (Retry-After)", 503: "model loading", 504: "no answer within the request timeout"}

_KNOWN_PATHS = {"/predict", "/health", "/ready", "/info", "/metrics", "/"}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("loraship")
    except PackageNotFoundError:
        return "unknown"


def worker_threads(threads: int, workers: int) -> tuple[int, int]:
    """(workers, onnxruntime threads per worker). threads 0 = every core; workers 0 = two one-thread-ish
    workers where there are at least two threads (measured best on 2 cores), else one."""
    threads = threads or os.cpu_count() or 1
    workers = workers or (2 if threads >= 2 else 1)
    return workers, max(1, threads // workers)


def serve(model: str, variant: str | None, host: str, port: int, threads: int, workers: int, limits: Limits,
          log_texts: bool, log_level: str) -> int:
    """Run until SIGINT/SIGTERM: uvicorn stops accepting, in-flight requests finish, then exit 0."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # uvicorn re-raises the stopping signal after its graceful shutdown (exit status -15);
            # a stop that answered every request in flight is a clean exit here: status 0.
            super().handle_exit(sig, frame)
            self._captured_signals.clear()

    logging.basicConfig(level=getattr(logging, log_level.upper()), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    workers, per_worker = worker_threads(threads, workers)
    models = [OnnxClassifier(model, variant=variant, threads=per_worker, spin=False) for _ in range(workers)]
    app = create_app(models[0], limits, log_texts, more_workers=models[1:])
    # proxy_headers off: nothing here reads the client's address, so X-Forwarded-* need no parsing per request.
    config = uvicorn.Config(app, host=host, port=port, access_log=False, log_level=log_level, timeout_graceful_shutdown=60,
                            proxy_headers=False)
    Server(config).run()
    return 0
