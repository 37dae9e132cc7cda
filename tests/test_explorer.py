"""The explorer page at `/`: its read routes in-process, then every action in a real headless Chromium
(Debian's `chromium`, driven by Playwright) against the real `hllm serve` on a free loopback port;
the same for an artifact exported with the Creator titles of a hand-made `hllm creator infer` folder."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from playwright.sync_api import Page, expect, sync_playwright

from hllm.bench.serve import start_server, stop_server
from hllm.errors import UserError
from hllm.serving.app import create_app
from hllm.serving.export import load_artifact, read_manifest
from tests.support import assert_one_line_error, copy_artifact, run_cli

CHROMIUM = "/usr/bin/chromium"  # the OS package (make test installs it); never a downloaded browser
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VARIABLE = "HLLM_TEST_EXPLORER_KEY"
KEY = "explorer-key"
TIMEOUT_MS = 20_000
KEPT_TITLE = "blue pen for the science lab"  # u1's cluster 0: passed the hallucination filter
REJECTED_TITLE = "blue pen that writes itself"  # u2's cluster 1: did not


# --- the routes, in-process ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(tiny_artifact) -> TestClient:
    return TestClient(create_app(load_artifact(tiny_artifact)))


def test_page_and_script_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="explorer.js">' in page.text
    script = client.get("/explorer.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert "/" not in client.get("/openapi.json").json()["paths"]  # the page is not part of the API


def test_sample_users_and_their_histories(client, tiny_artifact):
    artifact = load_artifact(tiny_artifact, verify=False)
    users = client.get("/samples", params={"limit": 3}).json()["users"]
    assert [u["user"] for u in users] == artifact.users[:3]
    assert all(u["user"].startswith("u") for u in users)  # the dataset's raw user ids
    first = client.get(f"/samples/{users[0]['user']}").json()
    assert [item["id"] for item in first["history"]] == artifact.histories[0]
    assert all(item["title"] for item in first["history"])
    assert client.get("/samples/nobody").status_code == 404


def test_title_search_puts_exact_matches_first(client):
    assert client.get("/search", params={"title": "GREEN INK"}).json()["items"] == [
        {"id": "i2", "title": "green ink"}
    ]
    found = client.get("/search", params={"title": "l", "limit": 20}).json()["items"]
    assert {"i0", "i9", "i11"} <= {item["id"] for item in found}  # red lamp, mini cable, pro light
    assert client.get("/search", params={"title": "zzz"}).json()["items"] == []
    assert client.get("/search", params={"title": ""}).status_code == 422


def test_creator_titles_are_absent_cleanly(client):
    assert client.get("/health").json()["creator_titles"] is False
    missing = client.get("/users/u1/titles/i1")
    assert missing.status_code == 404 and "no Creator titles" in missing.json()["detail"]


# --- the page, in a real browser -----------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_artifact, tmp_path_factory) -> Iterator[str]:
    """The real `hllm serve` with a write key, on a copy of the artifact (the page adds items)."""
    folder = copy_artifact(tiny_artifact, tmp_path_factory.mktemp("explorer") / "artifact")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(VARIABLE, KEY)
        process, url = start_server(
            folder, "exact", overrides=[f"serve.write_key_env={VARIABLE}"], timeout=120
        )
    try:
        yield url
    finally:
        stop_server(process)


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@contextlib.contextmanager
def opened(browser, url: str) -> Iterator[Page]:
    tab = browser.new_page()
    tab.set_default_timeout(TIMEOUT_MS)
    tab.goto(url)
    expect(tab.locator("#user option").first).to_be_attached()  # start() has finished
    try:
        yield tab
    finally:
        tab.close()


@pytest.fixture
def page(browser, server) -> Iterator[Page]:
    with opened(browser, server) as tab:
        yield tab


def api_top(url: str, history: list[str], k: int = 10) -> list[str]:
    response = httpx.post(f"{url}/recommend", json={"history": history, "k": k}, timeout=30)
    assert response.status_code == 200, response.text
    return [item["id"] for item in response.json()["items"]]


def column(page: Page, table: str, index: int) -> list[str]:
    return page.locator(f"#{table} tbody tr td:nth-child({index})").all_inner_texts()


def test_page_shows_the_catalogue_and_hides_absent_panels(page, server):
    health = httpx.get(f"{server}/health").json()
    expect(page.locator("#info")).to_contain_text(f"{health['items']} items")
    users = httpx.get(f"{server}/samples", params={"limit": 1000}).json()["users"]
    assert page.locator("#user option").count() == len(users)
    expect(page.locator("#key-label")).to_be_visible()  # the server has a write key
    expect(page.locator("#creator")).to_be_hidden()  # no Creator titles in the artifact


def test_look_up_a_sample_user(page, server):
    user = page.locator("#user option").nth(1).get_attribute("value")
    page.select_option("#user", user)
    page.click("#lookup")
    history = httpx.get(f"{server}/samples/{user}").json()["history"]
    expect(page.locator("#topk tbody tr").first).to_be_visible()
    assert column(page, "history-table", 1) == [item["id"] for item in history]
    assert column(page, "history-table", 2) == [item["title"] for item in history]
    assert column(page, "topk", 2) == api_top(server, [item["id"] for item in history])
    scores = [float(s) for s in column(page, "topk", 4)]
    assert scores == sorted(scores, reverse=True)


def test_type_a_history_by_ids_and_titles(page, server):
    page.fill("#history", "i1, Green Ink")
    page.fill("#k", "3")
    page.click("#recommend")
    expect(page.locator("#history-table tbody tr")).to_have_count(2)
    assert column(page, "history-table", 1) == ["i1", "i2"]
    assert column(page, "history-table", 2) == ["blue pen", "green ink"]
    expect(page.locator("#topk tbody tr")).to_have_count(3)
    assert column(page, "topk", 2) == api_top(server, ["i1", "i2"], k=3)


def test_an_unknown_history_item_is_reported(page):
    page.fill("#history", "i1, no such thing")
    page.click("#recommend")
    expect(page.locator("#status")).to_contain_text(
        'no item has the id or a title containing "no such thing"'
    )


def test_add_an_item_and_see_where_it_ranks(page, server):
    page.fill("#history", "i3, i4")
    page.click("#recommend")
    expect(page.locator("#topk tbody tr").first).to_be_visible()
    page.fill("#new-id", "new-lamp")
    page.fill("#field-title", "bright red lamp")
    page.click("#add")  # no key: the server refuses and the page says why
    expect(page.locator("#status")).to_contain_text("401")
    page.fill("#key", KEY)
    page.click("#add")
    expect(page.locator("#rank")).to_contain_text("new-lamp ranks #")
    size = httpx.get(f"{server}/health").json()["items"]
    ranked = api_top(server, ["i3", "i4"], k=size - 2)
    place = ranked.index("new-lamp") + 1
    expect(page.locator("#rank")).to_contain_text(f"ranks #{place} of {size} items")
    if place <= 10:  # the new item is highlighted in the refreshed top-k
        expect(page.locator("#topk tr.added td:nth-child(2)")).to_have_text("new-lamp")


# --- Creator titles: exported with the artifact, served, shown -----------------------------------


def write_infer_folder(folder: Path) -> Path:
    """What `hllm creator infer` writes, by hand: u1 in cluster 0, u2 in cluster 1, and a title of i1
    for each cluster, of which only cluster 0's passed the hallucination filter."""
    folder.mkdir(parents=True)
    assignments = pd.DataFrame({"user_id": ["u1", "u2"], "cluster": [0, 1]})
    titles = pd.DataFrame(
        {
            "cluster": [0, 1],
            "item_id": ["i1", "i1"],
            "title": [KEPT_TITLE, REJECTED_TITLE],
            "score": [0.9, 0.8],
            "kept": [True, False],
            "reasons": [[], ["claims a fact the item does not have"]],
        }
    )
    items = pd.DataFrame({"item_id": ["i1", "i2"], "original_title": ["blue pen", "green ink"]})
    for name, frame in (("assignments", assignments), ("titles", titles), ("items", items)):
        frame.to_parquet(folder / f"{name}.parquet", index=False)
    return folder


@pytest.fixture(scope="module")
def creator_artifact(tiny_run, tmp_path_factory) -> Path:
    """The tiny run exported with `hllm export --creator` (the page only reads it: no copy needed)."""
    folder = tmp_path_factory.mktemp("creator")
    out = folder / "artifact"
    code, _, err = run_cli("export", tiny_run, out, "--creator", write_infer_folder(folder / "infer"))
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def creator_client(creator_artifact) -> TestClient:
    return TestClient(create_app(load_artifact(creator_artifact)))


def test_creator_titles_travel_in_the_artifact_under_its_hashes(creator_artifact, tmp_path):
    files = read_manifest(creator_artifact)["files"]
    assert {"creator/assignments.parquet", "creator/titles.parquet", "creator/items.parquet"} <= set(files)
    artifact = copy_artifact(creator_artifact, tmp_path / "a")
    titles = artifact / "creator" / "titles.parquet"
    data = bytearray(titles.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different contents
    titles.write_bytes(bytes(data))
    with pytest.raises(UserError, match="does not match the manifest"):
        load_artifact(artifact)


def test_export_refuses_an_incomplete_infer_folder(tiny_run, tmp_path):
    infer = write_infer_folder(tmp_path / "infer")
    (infer / "assignments.parquet").unlink()
    code, _, err = run_cli("export", tiny_run, tmp_path / "artifact", "--creator", infer)
    assert_one_line_error(code, err, "no assignments.parquet", str(infer))
    assert not (tmp_path / "artifact").exists()


def test_a_users_kept_cluster_title(creator_client):
    assert creator_client.get("/health").json()["creator_titles"] is True
    assert creator_client.get("/users/u1/titles/i1").json() == {
        "user": "u1",
        "item": "i1",
        "title": KEPT_TITLE,
        "source": "cluster 0",
        "original_title": "blue pen",
    }


def test_a_rejected_or_missing_cluster_title_falls_back_to_the_original(creator_client):
    rejected = creator_client.get("/users/u2/titles/i1").json()
    assert (rejected["title"], rejected["source"]) == ("blue pen", "original")
    untitled = creator_client.get("/users/u1/titles/i2").json()
    assert (untitled["title"], untitled["source"]) == ("green ink", "original")


@pytest.mark.parametrize(
    "path, named", [("/users/nobody/titles/i1", "'nobody'"), ("/users/u1/titles/i99", "'i99'")]
)
def test_an_unknown_user_or_item_is_a_404_naming_it(creator_client, creator_artifact, path, named):
    answer = creator_client.get(path)
    assert answer.status_code == 404 and named in answer.json()["detail"]
    assert str(creator_artifact) not in answer.json()["detail"]  # no server paths in answers


@pytest.fixture(scope="module")
def creator_server(creator_artifact) -> Iterator[str]:
    process, url = start_server(creator_artifact, "exact", timeout=120)
    try:
        yield url
    finally:
        stop_server(process)


def test_page_shows_a_users_creator_title(browser, creator_server):
    with opened(browser, creator_server) as page:
        expect(page.locator("#creator")).to_be_visible()
        expect(page.locator("#title-out")).to_be_hidden()
        page.fill("#title-user", "u1")
        page.fill("#title-item", "i1")
        page.click("#creator-title")
        expect(page.locator("#title-text")).to_have_text(KEPT_TITLE)
        expect(page.locator("#title-source")).to_have_text("(cluster 0)")
        expect(page.locator("#title-original")).to_have_text("blue pen")
        page.fill("#title-user", "u2")
        page.click("#creator-title")
        expect(page.locator("#title-text")).to_have_text("blue pen")
        expect(page.locator("#title-source")).to_have_text("(original)")
        page.fill("#title-user", "nobody")
        page.click("#creator-title")
        expect(page.locator("#status")).to_contain_text("404: unknown user id 'nobody'")
        expect(page.locator("#title-out")).to_be_hidden()
        page.click("#lookup")  # looking up a sample user asks the panel about that user
        expect(page.locator("#title-user")).to_have_value(page.locator("#user").input_value())
