"""serve_cli serve: a real server in a subprocess on 127.0.0.1 (random free port), real HTTP clients."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from loraship.task import softmax
from serve_cli.__main__ import main as cli_main
from serve_cli.runtime import OnnxClassifier
from tests.conftest import REPO, make_texts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen([sys.executable, "-m", "serve_cli", "serve", "--model", str(model), "--port", str(self.port), *args],
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.stdout.read() if self.proc.stdout else ""
            try:
                if httpx.get(f"{self.url}/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise AssertionError("server did not become ready")

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.stdout.read() if self.proc.stdout else ""


@pytest.fixture(scope="module")
def fp32_server(exported: Path) -> Iterator[Server]:
    server = Server(exported, "--variant", "fp32")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return [t for t, _ in make_texts(200, seed=21, min_words=1, max_words=40)]


def predict_file(model: Path, texts: list[str], variant: str, tmp_path: Path) -> list[dict]:
    src = tmp_path / f"in-{variant}.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = tmp_path / f"out-{variant}.jsonl"
    assert cli_main(["predict", "--model", str(model), "--input", str(src), "--output", str(out), "--variant", variant,
                     "--top-k", "4", "--quiet"]) == 0
    return [json.loads(x) for x in out.read_text().splitlines()]


def test_endpoints(fp32_server: Server, exported: Path) -> None:
    url = fp32_server.url
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{url}/ready").json() == {"ready": True}
    info = httpx.get(f"{url}/info").json()
    assert info["labels"] == ["Business", "Sci/Tech", "Sports", "World"] and info["variant"] == "fp32"
    assert info["max_length"] == 32 and info["limits"]["max_client_batch_size"] == 256 and info["version"]
    assert info["limits"]["max_batch_size"] == 1 and info["workers"] * info["threads_per_worker"] >= 1
    assert info["model"] == exported.name and str(exported.parent) not in json.dumps(info), "no server paths in /info"
    assert httpx.get(f"{url}/docs").status_code == 200
    schema = httpx.get(f"{url}/openapi.json").json()["paths"]["/predict"]["post"]
    assert "inputs" in schema["requestBody"]["content"]["application/json"]["schema"]["properties"]
    wrong = httpx.get(f"{url}/predict")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST" and wrong.json()["error_type"] == "Validation"
    assert info["limits"]["merge_depth"] == 16 and info["limits"]["merge_rows"] == 4
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and 'id="top-label"' in page.text
    httpx.post(f"{url}/predict", json={"inputs": "game team"})
    metrics = httpx.get(f"{url}/metrics").text
    for name in ("loraship_requests_total", "loraship_request_seconds_bucket", "loraship_batch_rows_bucket",
                 "loraship_batch_tokens_bucket", "loraship_queue_rows"):
        assert name in metrics
    assert 'loraship_requests_total{path="/predict",status="200"}' in metrics


def test_tei_request_and_response_shapes(fp32_server: Server, exported: Path) -> None:
    url, clf = fp32_server.url, OnnxClassifier(exported, variant="fp32")
    one = httpx.post(f"{url}/predict", json={"inputs": "stock market profit"})
    assert one.status_code == 200 and "x-total-time" in one.headers
    body = one.json()
    assert [set(x) for x in body] == [{"score", "label"}] * 4
    assert [x["score"] for x in body] == sorted((x["score"] for x in body), reverse=True)
    assert sum(x["score"] for x in body) == pytest.approx(1.0, abs=1e-5)
    batch = httpx.post(f"{url}/predict", json={"inputs": ["stock market", "game team"], "truncate": True}).json()
    assert len(batch) == 2 and all(len(r) == 4 for r in batch)
    raw = httpx.post(f"{url}/predict", json={"inputs": ["stock market"], "raw_scores": True}).json()[0]
    logits = clf.logits(["stock market"])[0]
    assert {x["label"]: x["score"] for x in raw} == pytest.approx(dict(zip(clf.labels, logits.tolist(), strict=True)), abs=1e-5)
    top2 = httpx.post(f"{url}/predict", json={"inputs": "stock market", "top_k": 2}).json()
    assert (len(top2) == 2 and top2[0] == body[0]) or top2[0]["label"] == clf.labels[int(softmax(logits).argmax())]


@pytest.mark.parametrize("payload, status, error_type", [
    ({"inputs": ""}, 422, "Empty"),
    ({"inputs": []}, 422, "Empty"),
    ({"inputs": [1, 2]}, 422, "Validation"),
    ({"text": "no inputs"}, 422, "Validation"),
    ({"inputs": "a", "raw_scores": "yes"}, 422, "Validation"),
    ({"inputs": ["a"] * 257}, 413, "Validation"),
    ({"inputs": " ".join(["market"] * 100), "truncate": False}, 413, "Validation"),
])
def test_errors_are_json_with_their_codes(fp32_server: Server, payload: dict, status: int, error_type: str) -> None:
    r = httpx.post(f"{fp32_server.url}/predict", json=payload)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error", "error_type"} and r.json()["error_type"] == error_type


def test_bad_json_and_oversized_payload(fp32_server: Server) -> None:
    r = httpx.post(f"{fp32_server.url}/predict", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error_type"] == "Validation"
    big = json.dumps({"inputs": "x" * 2_100_000}).encode()
    r = httpx.post(f"{fp32_server.url}/predict", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "payload" in r.json()["error"]


async def _concurrent(url: str, requests: list[list[str]], clients: int) -> list[httpx.Response]:
    queue: asyncio.Queue[tuple[int, list[str]]] = asyncio.Queue()
    for item in enumerate(requests):
        queue.put_nowait(item)
    out: list[httpx.Response | None] = [None] * len(requests)

    async def client() -> None:
        async with httpx.AsyncClient(timeout=60) as c:
            while not queue.empty():
                i, texts = queue.get_nowait()
                out[i] = await c.post(f"{url}/predict", json={"inputs": texts})

    await asyncio.gather(*(client() for _ in range(clients)))
    return out  # type: ignore[return-value]


def _requests(texts: list[str]) -> list[list[str]]:
    # 200 requests of 1 to 5 texts each, so batches mix requests of different sizes.
    return [[texts[(i * 7 + k) % len(texts)] for k in range(1 + i % 5)] for i in range(200)]


def test_200_concurrent_requests_match_serve_cli_predict_fp32(fp32_server: Server, exported: Path, texts: list[str], tmp_path: Path) -> None:
    reqs = _requests(texts)
    responses = asyncio.run(_concurrent(fp32_server.url, reqs, 32))
    assert all(r.status_code == 200 for r in responses)
    expected = {t: p for t, p in zip(texts, predict_file(exported, texts, "fp32", tmp_path), strict=True)}
    for req, r in zip(reqs, responses, strict=True):
        body = r.json()
        assert len(body) == len(req), "each request gets exactly its own rows"
        for text, labels in zip(req, body, strict=True):
            ref = {x["label"]: x["score"] for x in expected[text]["top_k"]}
            assert {x["label"]: x["score"] for x in labels} == pytest.approx(ref, abs=1e-5)


def test_int8_server_agrees_with_serve_cli_predict(exported: Path, texts: list[str], tmp_path: Path) -> None:
    server = Server(exported, "--variant", "int8", "--max-padding", "1")
    try:
        # 1. The same batches as serve_cli forms (length-sorted, 32 rows), one request each, not split for
        #    padding (--max-padding 1): identical outputs.
        clf = OnnxClassifier(exported, variant="int8")
        encs = clf.encode(texts)
        order = sorted(range(len(texts)), key=lambda i: len(encs[i].ids))
        batches = [[texts[i] for i in order[b : b + 32]] for b in range(0, len(order), 32)]
        same_batches = [httpx.post(f"{server.url}/predict", json={"inputs": b}, timeout=30).json() for b in batches]
        # 2. 200 concurrent requests: the server's batches mix rows of other requests.
        reqs = _requests(texts)
        responses = asyncio.run(_concurrent(server.url, reqs, 32))
    finally:
        server.stop()
    expected = {t: p for t, p in zip(texts, predict_file(exported, texts, "int8", tmp_path), strict=True)}
    for batch, body in zip(batches, same_batches, strict=True):
        for text, labels in zip(batch, body, strict=True):
            ref = {x["label"]: x["score"] for x in expected[text]["top_k"]}
            assert {x["label"]: x["score"] for x in labels} == pytest.approx(ref, abs=1e-5)
    agree = np.mean([expected[t]["label"] == labels[0]["label"]
                     for req, r in zip(reqs, responses, strict=True) for t, labels in zip(req, r.json(), strict=True)])
    # The export's int8 is batch-independent (row-wise): the server's mixed batches change nothing. (A dynamic
    # int8, chosen only with --allow-batch-dependent, picks activation scales per batch and would not agree.)
    assert agree == 1.0, agree


def test_overload_answers_200_or_429_and_health_stays_up(exported: Path) -> None:
    server = Server(exported, "--max-queue", "8", "--max-batch-size", "4", "--max-wait-ms", "20")
    try:
        async def flood() -> tuple[list[int], list[int]]:
            health: list[int] = []

            async def probe() -> None:
                async with httpx.AsyncClient(timeout=30) as c:
                    for _ in range(20):
                        health.append((await c.get(f"{server.url}/health")).status_code)
                        await asyncio.sleep(0.01)

            reqs = [["stock market profit shares today"] * 4] * 200
            responses, _ = await asyncio.gather(_concurrent(server.url, reqs, 64), probe())
            for r in responses:
                if r.status_code == 429:
                    assert r.headers["retry-after"] == "1" and r.json()["error_type"] == "Overloaded"
            return [r.status_code for r in responses], health

        codes, health = asyncio.run(flood())
        assert set(codes) <= {200, 429} and 429 in codes and 200 in codes, sorted(set(codes))
        assert health == [200] * 20
        assert httpx.get(f"{server.url}/health").status_code == 200
    finally:
        server.stop()


def test_sigterm_answers_every_request_in_flight(exported: Path) -> None:
    # A long batching wait keeps requests in flight when SIGTERM arrives.
    server = Server(exported, "--max-wait-ms", "3000", "--max-batch-size", "1000")

    async def run() -> list[int]:
        async def one(c: httpx.AsyncClient) -> int:
            return (await c.post(f"{server.url}/predict", json={"inputs": ["game team"] * 3})).status_code

        async def queued_rows(c: httpx.AsyncClient) -> float:
            text = (await c.get(f"{server.url}/metrics")).text
            return next(float(x.split()[1]) for x in text.splitlines() if x.startswith("loraship_queue_rows "))

        async with httpx.AsyncClient(timeout=30) as c:
            tasks = [asyncio.create_task(one(c)) for _ in range(20)]
            # SIGTERM only once all 20 requests (60 rows) wait in the server's queue: a request the server has not
            # received yet is not in flight (on a loaded machine a fixed sleep raced it and got a reset).
            deadline = time.monotonic() + 20
            while await queued_rows(c) < 60 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            server.proc.send_signal(signal.SIGTERM)
            return list(await asyncio.gather(*tasks))

    codes = asyncio.run(run())
    assert codes == [200] * 20
    assert server.proc.wait(timeout=30) == 0
    log = server.stop()
    assert "/predict 200 rows=3" in log and "game team" not in log, "one line per request, no texts"


@pytest.mark.skipif(shutil.which("chromium") is None and not os.environ.get("CI"), reason="chromium not installed (.ci/run installs it)")
def test_try_it_page_in_a_real_browser(fp32_server: Server, exported: Path, tmp_path: Path) -> None:
    browser = shutil.which("chromium")
    assert browser, "chromium is missing: .ci/run installs it with apt-get"
    text = "stock market profit shares"
    expected = OnnxClassifier(exported, variant="fp32").labels[int(OnnxClassifier(exported, variant="fp32").logits([text])[0].argmax())]
    url = f"{fp32_server.url}/?text={text.replace(' ', '+')}&autorun=1"
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
              "--virtual-time-budget=5000"]
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert f'<strong id="top-label">{expected}</strong>' in dom.stdout, dom.stdout[-2000:] + dom.stderr[-2000:]
    assert 'class="bar"' in dom.stdout and "variant: fp32" in dom.stdout
    shot = tmp_path / "page.png"
    subprocess.run([*common, "--window-size=900,700", f"--screenshot={shot}", url], capture_output=True, timeout=120)
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unhandled_error_is_a_json_500_counted_in_metrics(exported: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from starlette.testclient import TestClient

    import serve_cli.http as http

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(http, "scores", broken)
    with TestClient(http.create_app(OnnxClassifier(exported, variant="fp32")), raise_server_exceptions=False) as client:
        r = client.post("/predict", json={"inputs": "game team"})
        assert r.status_code == 500 and r.json() == {"error": "internal error", "error_type": "Backend"}
        assert "x-total-time" in r.headers
        assert client.get("/health").status_code == 200
        metrics = client.get("/metrics").text
    assert 'loraship_requests_total{path="/predict",status="500"} 1.0' in metrics
    assert 'loraship_requests_total{path="/health",status="200"} 1.0' in metrics


def test_model_workers_split_the_threads() -> None:
    from serve_cli.http import worker_threads

    assert worker_threads(2, 0) == (2, 1)  # 2 cores: two one-thread workers
    assert worker_threads(16, 0) == (2, 8)
    assert worker_threads(1, 0) == (1, 1)
    assert worker_threads(4, 1) == (1, 4)
    assert worker_threads(3, 4) == (4, 1)  # never fewer than one thread per worker


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a thread's own nice value is Linux's")
def test_model_workers_run_at_a_lower_priority_than_the_event_loop(exported: Path) -> None:
    """The event loop (requests in, answers out) must not wait behind a model run for a core: the workers'
    threads run --worker-nice above the server's nice value, the loop's thread keeps it."""
    import threading

    from starlette.testclient import TestClient

    import serve_cli.http as http

    base = os.getpriority(os.PRIO_PROCESS, 0)
    workers = [OnnxClassifier(exported, variant="fp32") for _ in range(2)]
    with TestClient(http.create_app(workers[0], http.Limits(worker_nice=3), more_workers=workers[1:])) as client:
        threads = [t for t in threading.enumerate() if t.name.startswith("onnx")]
        assert len(threads) == 2 and all(t.native_id for t in threads)
        assert [os.getpriority(os.PRIO_PROCESS, t.native_id) for t in threads] == [min(base + 3, 19)] * 2  # type: ignore[arg-type]
        assert os.getpriority(os.PRIO_PROCESS, 0) == base
        assert client.post("/predict", json={"inputs": "game team"}).status_code == 200


def test_warm_up_runs_every_worker_and_http_texts_get_the_file_character_cap(exported: Path) -> None:
    """Each worker's session runs once before the server is ready; a huge text sent over HTTP is cut to the
    same characters as in a file before tokenizing (the cap lives in the classifier, for every path)."""
    from starlette.testclient import TestClient

    import serve_cli.http as http

    workers = [OnnxClassifier(exported, variant="fp32") for _ in range(3)]
    seen: dict[int, list[int]] = {id(w): [] for w in workers}
    for w in workers:
        real = w.tokenizer.encode_batch_fast

        def spy(texts: list[str], _w=w, _real=real) -> list:
            seen[id(_w)].extend(len(t) for t in texts)
            return _real(texts)

        w.tokenizer = type("Spy", (), {"encode_batch_fast": staticmethod(spy)})()
    with TestClient(http.create_app(workers[0], more_workers=workers[1:])) as client:
        assert all(seen[id(w)] for w in workers), "a worker was not warmed up"
        huge = "word " * 200_000
        assert client.post("/predict", json={"inputs": huge}).status_code == 200
    from serve_cli.runtime import CHARS_PER_TOKEN_CAP, MIN_CHARS_CAP

    cap = max(workers[0].max_length * CHARS_PER_TOKEN_CAP, MIN_CHARS_CAP)
    assert max(n for lengths in seen.values() for n in lengths) == cap < len(huge)


def test_the_default_variant_answers_a_text_the_same_alone_in_files_and_under_64_clients(exported: Path, tmp_path: Path) -> None:
    """500 texts: alone, in one file, in two shuffled files, and through HTTP (single-text requests from 64
    clients, so every server batch mixes other clients' texts): the same label and probabilities (1e-6)."""
    report = json.loads((exported / "export_report.json").read_text())
    assert report["default_variant"] == "int8" and report["int8_search"]["batch_independent"], report["int8_search"]["verdict"]
    clf = OnnxClassifier(exported)  # the default variant
    labels = clf.labels
    texts = [t for t, _ in make_texts(500, seed=77, min_words=1, max_words=40)]
    alone = np.stack([clf.predict_proba([t])[0] for t in texts])

    def as_probs(rows: list[dict]) -> np.ndarray:
        return np.array([[{x["label"]: x["score"] for x in r["top_k"]}[n] for n in labels] for r in rows])

    one_file = as_probs(predict_file(exported, texts, "int8", tmp_path))
    perm = np.random.default_rng(5).permutation(len(texts))
    shuffled = np.empty_like(alone)
    for part, idx in enumerate((perm[:250], perm[250:])):
        sub = tmp_path / f"part{part}"
        sub.mkdir()
        shuffled[idx] = as_probs(predict_file(exported, [texts[i] for i in idx], "int8", sub))
    # --merge-depth 1: whenever a row waits, texts of one token length run together (in the default, only in
    # deep queues): the answers must not change
    server = Server(exported, "--merge-depth", "1")
    try:
        responses = asyncio.run(_concurrent(server.url, [[t] for t in texts], 64))
        runs = {line.split()[0]: float(line.split()[1]) for line in httpx.get(f"{server.url}/metrics").text.splitlines()
                if line.startswith(("loraship_batch_rows_bucket{le=\"1.0\"}", "loraship_batch_rows_count"))}
    finally:
        server.stop()
    assert all(r.status_code == 200 for r in responses)
    assert runs['loraship_batch_rows_bucket{le="1.0"}'] < runs["loraship_batch_rows_count"], runs  # some runs merged texts
    http = np.array([[{x["label"]: x["score"] for x in r.json()[0]}[n] for n in labels] for r in responses])
    for got in (one_file, shuffled, http):
        np.testing.assert_allclose(got, alone, atol=1e-6, rtol=0)
        assert (got.argmax(-1) == alone.argmax(-1)).all()


def test_a_large_request_is_shared_by_the_idle_workers(exported: Path) -> None:
    """One 32-text request on two workers: each runs a share (not one worker alone), and the answer is the
    request's rows in order, equal to one worker's."""
    from starlette.testclient import TestClient

    import serve_cli.http as http

    workers = [OnnxClassifier(exported, variant="fp32", threads=1) for _ in range(2)]
    rows = {id(w): 0 for w in workers}
    for w in workers:
        real = w.run

        def spy(encodings: list, _w=w, _real=real) -> np.ndarray:
            rows[id(_w)] += len(encodings)
            time.sleep(0.05)  # a real model's time: the other worker wakes meanwhile (the tiny one is done first)
            return _real(encodings)

        w.run = spy  # type: ignore[method-assign]
    texts = [t for t, _ in make_texts(32, seed=9)]
    with TestClient(http.create_app(workers[0], more_workers=workers[1:])) as client:
        for w in workers:
            rows[id(w)] = 0  # the warm-up run
        body = client.post("/predict", json={"inputs": texts}).json()
        split = sorted(rows.values())
        small = client.post("/predict", json={"inputs": texts[:15]}).json()  # under 2 x 8 rows: one worker
    assert split == [16, 16]
    assert sorted(rows.values()) == [16, 31]
    want = softmax(workers[0].logits(texts))
    got = np.array([[{x["label"]: x["score"] for x in r}[n] for n in workers[0].labels] for r in body])
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert len(small) == 15


def test_a_deep_queue_runs_the_head_request_with_waiting_texts_of_its_exact_token_length() -> None:
    """With merge_depth rows waiting, single texts are tokenized on arrival; a worker takes the head of the queue
    and, first come first, waiting single texts of exactly its length, up to merge_rows rows. Texts of another
    length (padding would cost more than the batch saves), split shares and timed-out requests stay queued."""
    import serve_cli.http as http

    class Model:
        def encode(self, texts: list[str]) -> list[list[int]]:
            return [[0] * len(t.split()) for t in texts]  # an "encoding" as long as the text's words

    loop = asyncio.new_event_loop()
    batcher = http.Batcher([Model(), Model()], http.Limits(merge_depth=3, merge_rows=3), http.Metrics())  # type: ignore[list-item]
    batcher.loop = loop
    words = ["a b", "c d e", "f g", "h i", "j k", "l m", "l m"]  # 2, 3, 2, 2, 2, 2, 2 words
    tasks = [loop.create_task(batcher.submit([t], True)) for t in words]
    tasks.append(loop.create_task(batcher.submit(["n o"] * 16, True)))  # two shares of one request: run alone
    loop.run_until_complete(asyncio.sleep(0))  # every submit has queued its rows
    queued = list(batcher.jobs)
    assert [j.encodings is not None for j in queued[:7]] == [False, False, False, True, True, True, True]  # from 3 waiting on
    assert not any(j.encodings for j in queued[7:])
    queued[4].cancelled = True
    # "a b" came before the queue was deep: it runs alone
    assert [j.texts for j in batcher._collect() or []] == [["a b"]]
    assert [j.texts for j in batcher._collect() or []] == [["c d e"]]
    assert [j.texts for j in batcher._collect() or []] == [["f g"]]
    # "h i" was tokenized on arrival: it takes both "l m" (same length; "j k" timed out), each request itself
    head, *taken = batcher._collect() or []
    assert head.texts == ["h i"] and taken == queued[5:7] and taken[0] is not taken[1]
    assert [j.texts for j in batcher.jobs] == [["j k"], ["n o"] * 8, ["n o"] * 8]
    assert batcher.jobs[0] is queued[4]
    for task in tasks:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    loop.close()


def test_a_request_not_answered_in_time_gets_504_and_its_rows_are_skipped() -> None:
    """No worker answers (none runs here): the request gets 504 after its timeout, every share of it is marked
    so a worker skips it, and a late answer is dropped without error."""
    import serve_cli.http as http

    async def scenario() -> tuple[list[http.Job], BaseException | None]:
        batcher = http.Batcher([object(), object()], http.Limits(request_timeout_s=0.05), http.Metrics())  # type: ignore[list-item]
        batcher.loop = asyncio.get_running_loop()
        try:
            await batcher.submit(["a"] * 16, True)  # two shares
        except http.ApiError as e:
            error: BaseException | None = e
        else:
            error = None
        jobs = list(batcher.jobs)
        http._settle(jobs[0].future, np.zeros((8, 2), dtype=np.float32))  # a worker answering too late
        return jobs, error

    jobs, error = asyncio.run(scenario())
    assert isinstance(error, http.ApiError) and error.status == 504 and error.error_type == "Timeout"
    assert len(jobs) == 2 and all(j.cancelled for j in jobs)


def test_a_worker_hands_requests_beyond_its_share_to_idle_workers() -> None:
    """8 single-text requests collected by one worker while another idles: it keeps 4 and queues 4 again (in
    order, ahead of later requests), so both run at once; with no idle worker, or switched off, it keeps all."""
    import serve_cli.http as http

    def scenario(idle: int, share: bool) -> tuple[int, list[str]]:
        batcher = http.Batcher([object(), object()], http.Limits(share_with_idle=share), http.Metrics())  # type: ignore[list-item]
        loop = asyncio.new_event_loop()
        batcher.jobs.append(http.Job(["next"], True, loop.create_future()))  # a request that came in meanwhile
        jobs = [http.Job([f"t{i}"], True, loop.create_future()) for i in range(8)]
        batcher.idle = idle
        with batcher.cond:
            kept = batcher._share(jobs, 8)
        loop.close()
        return len(kept), [j.texts[0] for j in batcher.jobs]

    # handed back first in line, in order: they came before the request that is waiting
    assert scenario(1, True) == (4, ["t4", "t5", "t6", "t7", "next"])
    assert scenario(0, True) == (8, ["next"])
    assert scenario(1, False) == (8, ["next"])
