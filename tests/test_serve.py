"""The real HTTP server on 127.0.0.1: recommendations, bad input (4xx naming the fix), cold start, restart."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import numpy as np
import pytest

from hllm.bench.serve import free_port, start_server, stop_server
from hllm.serving.app import create_app
from hllm.serving.export import load_artifact
from tests.support import assert_one_line_error, copy_artifact, run_cli, serving_app

MAX_BODY = 2000
MAX_HISTORY = 5  # data.max_history of the tiny run
ITEMS = 12
TIMEOUT = 30  # seconds for any one request
JSON = {"content-type": "application/json"}


@contextlib.contextmanager
def serving(folder: Path, overrides: list[str] | None = None) -> Iterator[str]:
    """`hllm serve` over `folder` on a free port in a background thread; yields its URL."""
    with serving_app(create_app(load_artifact(folder, overrides))) as url:
        yield url


@pytest.fixture(scope="module")
def url(tiny_artifact, tmp_path_factory) -> Iterator[str]:
    """One server for the module, on a copy of the artifact (cold-start items are written into it)."""
    folder = copy_artifact(tiny_artifact, tmp_path_factory.mktemp("served") / "artifact")
    with serving(folder, [f"serve.max_body_bytes={MAX_BODY}"]) as address:
        yield address


@pytest.fixture(scope="module")
def http(url) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=TIMEOUT) as client:
        yield client


def size(http: httpx.Client) -> int:
    response = http.get("/health")
    assert response.status_code == 200
    return response.json()["items"]


def recommend(http: httpx.Client, **body) -> httpx.Response:
    return http.post("/recommend", json=body)


def assert_error(response: httpx.Response, status: int, *words: str) -> None:
    """`status` with a `detail` that names what to fix."""
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str), detail
    for word in words:
        assert word in detail, detail


def assert_well_formed(result: dict, k: int) -> None:
    assert set(result) == {"items", "unknown", "truncated"}
    items = result["items"]
    assert 1 <= len(items) <= k
    assert all(isinstance(i["id"], str) and isinstance(i["title"], str) for i in items)
    scores = [i["score"] for i in items]
    assert scores == sorted(scores, reverse=True), scores  # best first
    assert len({i["id"] for i in items}) == len(items)


# --- recommend -----------------------------------------------------------------------------------


def test_recommend_known_ids_best_first_without_the_history(http):
    catalogue = {f"i{n}" for n in range(ITEMS)}
    history = ["i3", "i4", "i5"]
    response = recommend(http, history=history, k=5)
    assert response.status_code == 200, response.text
    result = response.json()
    assert_well_formed(result, 5)
    assert len(result["items"]) == 5
    assert {i["id"] for i in result["items"]} <= catalogue - set(history)
    assert result["unknown"] == [] and result["truncated"] == 0


def test_exclude_history_false_allows_history_items(http):
    everything = size(http)
    history = ["i3", "i4", "i5"]
    kept = recommend(http, history=history, k=everything, exclude_history=False).json()["items"]
    assert len(kept) == everything and set(history) <= {i["id"] for i in kept}
    dropped = recommend(http, history=history, k=everything).json()["items"]
    assert len(dropped) == everything - len(history)
    assert not set(history) & {i["id"] for i in dropped}
    # The same ranking, minus the history.
    assert [i["id"] for i in kept if i["id"] not in history] == [i["id"] for i in dropped]


def test_recommend_by_history_text(http):
    texts = [{"title": "red lamp"}, {"title": "a brand new blue thing"}]
    response = recommend(http, history_text=texts, k=3)
    assert response.status_code == 200, response.text
    result = response.json()
    assert_well_formed(result, 3)
    assert len(result["items"]) == 3 and result["truncated"] == 0


def test_unknown_ids_are_listed_and_all_unknown_is_404(http):
    response = recommend(http, history=["i1", "nope", "i2", 77], k=3)
    assert response.status_code == 200, response.text
    assert response.json()["unknown"] == ["nope", "77"]
    assert_well_formed(response.json(), 3)
    assert_error(recommend(http, history=["nope", "nada"]), 404, "nope", "nada", "POST /items")


def test_history_longer_than_max_history_is_cut(http):
    history = [f"i{n}" for n in range(8)]
    response = recommend(http, history=history, k=2)
    assert response.status_code == 200, response.text
    assert response.json()["truncated"] == len(history) - MAX_HISTORY
    texts = [{"title": f"thing {n}"} for n in range(7)]
    assert recommend(http, history_text=texts, k=2).json()["truncated"] == 7 - MAX_HISTORY


@pytest.mark.parametrize(
    "body, words",
    [
        ({"history": []}, ["history", "at least 1"]),
        ({"history_text": []}, ["history_text", "at least 1"]),
        ({}, ["exactly one of history", "history_text"]),
        ({"history": ["i1"], "history_text": [{"title": "x"}]}, ["exactly one of history"]),
        ({"history": ["i1"], "k": 0}, ["k:", "greater than or equal to 1"]),
        ({"history": ["i1"], "k": "ten"}, ["k:", "integer"]),
        ({"history": 5}, ["history:", "list"]),
        ({"history_text": [{"colour": "red"}]}, ["unknown field(s) ['colour']", "title"]),
        ({"history_text": [{"title": "  "}]}, ["empty"]),
    ],
)
def test_bad_requests_are_422_naming_the_field(http, body, words):
    assert_error(http.post("/recommend", json=body), 422, *words)


def test_k_above_the_catalogue_is_422_with_its_size(http):
    everything = size(http)
    assert_error(recommend(http, history=["i1"], k=everything + 1), 422, f"({everything})", "max_k")


def test_malformed_json_is_400(http):
    response = http.post("/recommend", content=b'{"history": ["i1",', headers=JSON)
    assert_error(response, 400, "malformed JSON")


def test_oversized_bodies_are_413_declared_or_chunked(http):
    big = {"history": [f"i{n % ITEMS}" for n in range(MAX_BODY)]}
    assert len(json.dumps(big)) > MAX_BODY
    assert_error(http.post("/recommend", json=big), 413, str(MAX_BODY), "serve.max_body_bytes")
    # A chunked body declares no length: it is counted as it arrives.
    chunks = iter([b'{"history": [', b'"i1", ' * 400, b'"i2"]}'])
    response = http.post("/recommend", content=chunks, headers=JSON)
    assert "content-length" not in response.request.headers
    assert_error(response, 413, "serve.max_body_bytes")
    small = iter([b'{"history": ', b'["i1"], "k": 2}'])
    response = http.post("/recommend", content=small, headers=JSON)
    assert response.status_code == 200, response.text


def test_the_server_survives_bad_input(http):
    """After every kind of bad request above, it still answers."""
    http.post("/recommend", content=b"\xff\xfe not json", headers=JSON)
    http.post("/recommend", content=b"history=i1", headers={"content-type": "text/plain"})
    http.post("/items", json={"id": "x", "fields": "not a dict"})
    response = http.get("/health")
    assert response.status_code == 200 and response.json()["status"] == "ok"
    assert recommend(http, history=["i1"], k=2).status_code == 200


# --- cold start ----------------------------------------------------------------------------------


def test_cold_start_item_is_added_found_and_refused_twice(http):
    before = size(http)
    response = http.post("/items", json={"id": "new-lamp", "fields": {"title": "a lamp nobody saw"}})
    assert response.status_code == 201, response.text
    assert response.json() == {"id": "new-lamp", "items": before + 1}
    assert size(http) == before + 1
    item = http.get("/items/new-lamp")
    assert item.status_code == 200
    assert item.json()["fields"] == {"title": "a lamp nobody saw"} and item.json()["added"] is True
    assert "a lamp nobody saw" in item.json()["text"]
    assert http.get("/items/i3").json()["added"] is False
    assert_error(http.get("/items/never-added"), 404, "never-added")
    assert_error(http.post("/items", json={"id": "new-lamp", "fields": {"title": "again"}}), 409, "new-lamp")
    assert_error(http.post("/items", json={"id": "i3", "fields": {"title": "again"}}), 409, "i3")
    assert_error(http.post("/items", json={"id": "[PAD]", "fields": {"title": "pad"}}), 409, "[PAD]")
    assert_error(http.post("/items", json={"id": "odd", "fields": {"colour": "red"}}), 422, "colour")
    assert_error(http.post("/items", json={"id": "", "fields": {"title": "x"}}), 422, "id")
    assert_error(http.post("/items", json={"id": "odd", "fields": {}}), 422, "fields")
    assert http.get("/items/odd").status_code == 404  # a refused item is not half-added
    # Usable in a history at once (as its only known item too).
    response = recommend(http, history=["new-lamp"], k=3)
    assert response.status_code == 200, response.text
    assert "new-lamp" not in {i["id"] for i in response.json()["items"]}


def test_an_id_with_a_slash_can_be_fetched(http):
    raw = "shelf/lamp 2"
    response = http.post("/items", json={"id": raw, "fields": {"title": "shelf lamp"}})
    assert response.status_code == 201, response.text
    for path in (f"/items/{quote(raw, safe='')}", f"/items/{raw}"):
        item = http.get(path)
        assert item.status_code == 200 and item.json()["id"] == raw, (path, item.text)
    assert recommend(http, history=[raw], k=2).json()["unknown"] == []


def test_cold_start_item_is_recommended_like_its_twin(http):
    """A new item with an existing item's text gets its embedding: it ranks beside it, same score."""
    request = {"history": ["i2", "i3", "i4"], "k": 3, "exclude_history": False}
    top = recommend(http, **request).json()["items"][0]
    twin = http.get(f"/items/{top['id']}").json()
    response = http.post("/items", json={"id": "twin", "fields": {"title": twin["title"]}})
    assert response.status_code == 201, response.text
    assert http.get("/items/twin").json()["text"] == twin["text"]
    found = {i["id"]: i["score"] for i in recommend(http, **request).json()["items"]}
    assert top["id"] in found and "twin" in found, found
    assert found["twin"] == pytest.approx(found[top["id"]], abs=1e-4)
    assert found[top["id"]] == pytest.approx(top["score"], abs=1e-5)


def test_adds_while_recommending(http):
    """One thread adds 20 items while three others recommend: every answer is 200 and well formed."""
    problems: list[str] = []
    answers, overlapped = [0, 0, 0], [0, 0, 0]
    done = threading.Event()
    together = threading.Barrier(4, timeout=30)
    before = size(http)

    def add() -> None:
        together.wait()
        try:
            for n in range(20):
                body = {"id": f"busy-{n}", "fields": {"title": f"busy item number {n}"}}
                response = http.post("/items", json=body)
                if response.status_code != 201:
                    problems.append(f"add {n}: {response.status_code} {response.text}")
        finally:
            done.set()

    def ask(client: int) -> None:
        together.wait()
        for n in range(200):  # bounded, also if the adder is slow
            if n % 2:  # ids being added (unknown until they are), or texts through the Item LLM
                body = {"history": ["i1", "i2", f"busy-{n % 20}"], "k": 5}
            else:
                body = {"history_text": [{"title": f"query {client} {n}"}], "k": 5}
            adding = not done.is_set()
            response = http.post("/recommend", json=body)
            answers[client] += 1
            overlapped[client] += adding and not done.is_set()
            try:
                assert response.status_code == 200, response.text
                assert_well_formed(response.json(), 5)
            except AssertionError as err:
                problems.append(f"recommend {body}: {err}")
            if done.is_set() and n >= 10:
                break

    threads = [threading.Thread(target=add), *(threading.Thread(target=ask, args=(c,)) for c in range(3))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a request hung"
    assert not problems, problems[:5]
    assert min(answers) >= 10 and sum(overlapped) > 0
    assert size(http) == before + 20
    assert http.get("/items/busy-19").status_code == 200
    assert recommend(http, history=["busy-0", "busy-19"], k=3).json()["unknown"] == []


# --- health, metrics, docs, CLI ------------------------------------------------------------------


def test_health_metrics_and_docs(http):
    assert recommend(http, history=["i1"], k=2).status_code == 200
    health = http.get("/health").json()
    assert health["status"] == "ok" and health["items"] >= ITEMS and health["index"] == "exact"
    assert set(health["model"]) == {"item_backbone", "user_backbone", "dim"}
    metrics = http.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    lines = metrics.text.splitlines()
    counted = 'hllm_requests_total{route="/recommend",status="200"} '
    assert any(line.startswith(counted) and int(line.split()[-1]) >= 1 for line in lines), metrics.text
    assert any(line.startswith('hllm_request_seconds{route="/recommend",quantile="0.99"} ') for line in lines)
    assert f"hllm_catalogue_items {health['items']}" in lines
    assert http.get("/docs").status_code == 200
    schema = http.get("/openapi.json")
    assert schema.status_code == 200 and "/recommend" in schema.json()["paths"]


def test_cli_recommend_asks_the_server(url):
    code, out, err = run_cli("recommend", "--server", url, "--items", "i1,i2", "-k", "3")
    assert code == 0, err
    result = json.loads(out)
    assert len(result["items"]) == 3 and {"id", "title", "score"} <= set(result["items"][0])
    code, _, err = run_cli("recommend", "--server", f"http://127.0.0.1:{free_port()}", "--items", "i1")
    assert_one_line_error(code, err, "cannot reach the server")
    code, _, err = run_cli("recommend", "--server", url, "--items", "nope")
    assert_one_line_error(code, err, "404", "nope")


# --- restart -------------------------------------------------------------------------------------


@pytest.mark.process
def test_cold_start_items_survive_a_restart(tiny_artifact, tmp_path):
    """Added in one server; the next one (the real `hllm serve`, HNSW index) still has it."""
    folder = copy_artifact(tiny_artifact, tmp_path / "artifact")
    with serving(folder) as address:
        response = httpx.post(
            f"{address}/items", json={"id": "kept", "fields": {"title": "kept lamp"}}, timeout=TIMEOUT
        )
        assert response.status_code == 201, response.text
    assert (folder / "added.npz").is_file()
    process, address = start_server(folder, "hnsw", timeout=120)
    try:
        with httpx.Client(base_url=address, timeout=TIMEOUT) as client:
            item = client.get("/items/kept")
            assert item.status_code == 200 and item.json()["fields"] == {"title": "kept lamp"}
            health = client.get("/health").json()
            assert health["items"] == ITEMS + 1 and health["index"] == "hnsw"
            assert_error(client.post("/items", json={"id": "kept", "fields": {"title": "x"}}), 409, "kept")
            response = client.post("/recommend", json={"history": ["kept", "i1"], "k": 3})
            assert response.status_code == 200, response.text
            response = client.post("/items", json={"id": "later", "fields": {"title": "later lamp"}})
            assert response.status_code == 201 and response.json()["items"] == ITEMS + 2
    finally:
        stop_server(process)
    with np.load(folder / "added.npz") as saved:  # both, in the order they were added
        assert [item["id"] for item in json.loads(str(saved["meta"]))["items"]] == ["kept", "later"]
        assert saved["embeddings"].shape[0] == 2


@pytest.mark.parametrize("precision", ["bf16", "int8"])  # bf16 autocast; int8 User LLM weights
def test_a_lower_precision_user_llm_ranks_like_fp32(tiny_artifact, tmp_path, precision):
    body = {"history": ["i3", "i4", "i5"], "k": 5}
    answers = []
    for name in ("fp32", precision):
        folder = copy_artifact(tiny_artifact, tmp_path / name)
        with serving(folder, [f"serve.precision={name}"]) as address:
            answers.append(httpx.post(f"{address}/recommend", json=body, timeout=TIMEOUT).json()["items"])
    fp32, lower = answers
    assert [i["id"] for i in lower] == [i["id"] for i in fp32]
    np.testing.assert_allclose([i["score"] for i in lower], [i["score"] for i in fp32], atol=2e-2)


def test_history_window_reads_only_the_most_recent_items(tiny_artifact, tmp_path):
    folder = copy_artifact(tiny_artifact, tmp_path / "windowed")
    answers = []
    with serving(folder, ["serve.history_window=2"]) as address:
        for history in (["i1", "i2", "i3", "i4"], ["i3", "i4"]):
            body = {"history": history, "k": 3, "exclude_history": False}
            answers.append(httpx.post(f"{address}/recommend", json=body, timeout=TIMEOUT).json())
    long, short = answers
    assert long["truncated"] == 2 and short["truncated"] == 0
    assert long["items"] == short["items"]


def test_the_whole_user_llm_pass_answers_like_the_last_position_shortcut(tiny_artifact, tmp_path):
    body = {"history": ["i3", "i4", "i5"], "k": 5}
    answers = []
    for whole in (False, True):
        artifact = load_artifact(
            copy_artifact(tiny_artifact, tmp_path / str(whole)), [f"serve.last_position_only={not whole}"]
        )
        app = create_app(artifact)
        assert artifact.model.user_encoder.last_position_only is not whole  # the setting reaches the model
        with serving_app(app) as address:
            answers.append(httpx.post(f"{address}/recommend", json=body, timeout=TIMEOUT).json()["items"])
    shortcut, whole_pass = answers
    assert [i["id"] for i in shortcut] == [i["id"] for i in whole_pass]
    np.testing.assert_allclose([i["score"] for i in shortcut], [i["score"] for i in whole_pass], atol=1e-5)
