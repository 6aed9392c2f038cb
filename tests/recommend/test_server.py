"""``xkern serve``'s application in process (TestClient), its batching worker, and one loopback run."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import xkern

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from xkern.recommend.server import ServeConfig, create_app  # noqa: E402


@pytest.fixture(scope="module")
def rec(lora_run):
    return xkern.load_recommender(lora_run)


class Gate:
    """Holds the worker inside ``run_jobs`` until opened: requests pile up behind it."""

    def __init__(self, rec, monkeypatch) -> None:
        self.open, self.entered = threading.Event(), threading.Event()
        real = rec.run_jobs

        def held(jobs):
            self.entered.set()
            self.open.wait(30)
            return real(jobs)

        monkeypatch.setattr(rec, "run_jobs", held)


def _post_in_thread(client, path, body, out, key):
    t = threading.Thread(target=lambda: out.__setitem__(key, client.post(path, json=body)))
    t.start()
    return t


def _wait(cond, seconds=10.0):
    end = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.005)


def test_endpoints_answer_what_the_recommender_answers(rec):
    before = {k: v.clone() for k, v in rec.model.state_dict().items() if torch.is_tensor(v)}
    with TestClient(create_app(rec)) as client:
        health = client.get("/health")
        assert health.status_code == 200 and health.json()["runs"] == rec.runs
        r = client.post("/rank", json={"history": [3, 7], "candidates": ["SYN-Tools-00001", 2, 9]})
        assert r.status_code == 200
        want = rec.rank([3, 7], [1, 2, 9]).to_dict()["items"]
        assert [x["item"] for x in r.json()["items"]] == [x["item"] for x in want]
        assert [x["score"] for x in r.json()["items"]] == pytest.approx([x["score"] for x in want], abs=1e-5)
        r = client.post("/rank", json={"history": [3, 7], "candidates": [1, 2, 9], "k": 2})
        assert len(r.json()["items"]) == 2
        r = client.post("/recommend", json={"history": [3, 7], "k": 4, "retriever": "item-markov"})
        assert r.status_code == 200 and len(r.json()["items"]) == 4 and r.json()["retriever"] == "item-markov"
        assert client.post("/recommend", json={"history": []}).json()["fallback"] is True
        m = client.get("/metrics").json()
        assert m["requests"] == {"rank": 2, "recommend": 2} and m["responses"] == {"200": 4}
        assert m["batches"] == 4 and m["latency_ms_p50"] > 0
    after = rec.model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # no request changed the model


@pytest.mark.parametrize("body,status,words", [
    (b"{not json", 400, "malformed JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (b'{"history": ["no such item"], "candidates": [1]}', 422, "'no such item'"),
    (b'{"history": [1]}', 422, "missing field 'candidates'"),
    (b'{"history": [1], "candidates": [2], "colour": 1}', 422, "unknown field(s) ['colour']"),
    (b'{"history": [1], "candidates": [2], "k": 0}', 422, "k must be"),
    (b'{"history": [1], "candidates": [2], "run": "other"}', 422, "unknown run 'other'"),
    (b'{"history": [1], "candidates": [' + b"1, " * 40 + b'2]}', 413, "over the limit of 30"),
    (b'{"history": [1], "candidates": [2], "pad": "' + b"x" * 3000 + b'"}', 413, "over the limit of 2048"),
])
def test_bad_requests_are_answered_at_once_naming_the_problem(rec, body, status, words):
    with TestClient(create_app(rec, ServeConfig(max_body_bytes=2048, max_items=30))) as client:
        r = client.post("/rank", content=body, headers={"content-type": "application/json"})
        assert r.status_code == status and words in r.json()["error"]
        assert client.get("/metrics").json()["batches"] == 0  # nothing reached the model


def test_requests_waiting_together_run_as_one_batch_and_a_full_queue_is_503(rec, monkeypatch):
    gate = Gate(rec, monkeypatch)
    cfg = ServeConfig(batch_wait_ms=50, max_batch_size=8, max_queue=3)
    app = create_app(rec, cfg)
    with TestClient(app) as client:
        out, threads = {}, []
        threads.append(_post_in_thread(client, "/rank", {"history": [1], "candidates": [2, 3]}, out, "first"))
        assert gate.entered.wait(10)  # the worker holds the first request
        for i in range(3):
            threads.append(_post_in_thread(client, "/rank", {"history": [i], "candidates": [4, 5, 6]}, out, i))
        _wait(lambda: app.state.batcher.queue.qsize() == 3)
        full = client.post("/rank", json={"history": [1], "candidates": [2]})
        assert full.status_code == 503 and "queue is full" in full.json()["error"]
        assert full.headers["retry-after"] == "1"
        gate.open.set()
        for t in threads:
            t.join(30)
        assert out["first"].json()["batch_size"] == 1
        assert [out[i].json()["batch_size"] for i in range(3)] == [3, 3, 3]
        m = client.get("/metrics").json()
        assert m["batch_sizes"] == {"1": 1, "3": 1} and m["responses"] == {"200": 4, "503": 1}


def test_the_token_budget_splits_a_batch(rec, monkeypatch):
    gate = Gate(rec, monkeypatch)
    one = rec.rank_job([1], [4, 5, 6]).tokens
    app = create_app(rec, ServeConfig(batch_wait_ms=50, max_batch_tokens=2 * one, max_queue=8))
    with TestClient(app) as client:
        out: dict = {}
        threads = [_post_in_thread(client, "/rank", {"history": [1], "candidates": [2]}, out, "first")]
        assert gate.entered.wait(10)
        for i in range(3):
            threads.append(_post_in_thread(client, "/rank", {"history": [1], "candidates": [4, 5, 6]}, out, i))
        _wait(lambda: app.state.batcher.queue.qsize() == 3)
        gate.open.set()
        for t in threads:
            t.join(30)
        assert sorted(out[i].json()["batch_size"] for i in range(3)) == [1, 2, 2]


def test_a_request_past_its_timeout_is_504_and_never_scored(rec, monkeypatch):
    gate = Gate(rec, monkeypatch)
    app = create_app(rec, ServeConfig(timeout_s=0.3, max_batch_size=1, batch_wait_ms=0))
    with TestClient(app) as client:
        out = {}
        first = _post_in_thread(client, "/rank", {"history": [1], "candidates": [2]}, out, "first")
        assert gate.entered.wait(10)
        late = client.post("/rank", json={"history": [1], "candidates": [3]})  # waits behind the held one
        assert late.status_code == 504 and "within 0.3 s" in late.json()["error"]
        gate.open.set()
        first.join(30)
        assert out["first"].status_code == 504  # held past its own timeout too
        _wait(lambda: app.state.batcher.cancelled == 1)  # the late one was dropped, not scored
        assert client.get("/health").status_code == 200


def test_one_server_answers_users_of_two_runs(two_domain_runs):
    rec2 = xkern.load_recommender(two_domain_runs)
    with TestClient(create_app(rec2)) as client:
        assert client.get("/health").json()["runs"] == ["Tools", "Toys"]
        toys = client.post("/recommend", json={"history": ["SYN-Toys-00001"], "k": 2, "run": "Toys"}).json()
        assert [x["item"][:8] for x in toys["items"]] == ["SYN-Toys"] * 2 and toys["run"] == "Toys"
        unnamed = client.post("/recommend", json={"history": [1]})
        assert unnamed.status_code == 422 and "name one with run=" in unnamed.json()["error"]


def test_a_loopback_server_answers_within_bounded_time(rec):
    import httpx
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(create_app(rec), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        _wait(lambda: server.started, 20)
        host, port = server.servers[0].sockets[0].getsockname()[:2]
        assert host == "127.0.0.1"
        with httpx.Client(base_url=f"http://{host}:{port}", timeout=20) as client:
            assert client.get("/health").json()["status"] == "ok"
            r = client.post("/recommend", json={"history": ["SYN-Tools-00003"], "k": 3})
            assert r.status_code == 200 and len(r.json()["items"]) == 3
    finally:
        server.should_exit = True
        thread.join(20)
    assert not thread.is_alive()
