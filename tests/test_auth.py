"""Write keys: POST /items needs `Authorization: Bearer KEY` once serve.write_key_env's variable is set."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from hllm.errors import UserError
from hllm.serving.app import create_app
from hllm.serving.auth import check_host
from hllm.serving.export import load_artifact
from tests.support import assert_one_line_error, copy_artifact, run_cli

VARIABLE = "HLLM_TEST_WRITE_KEY"
KEY = "s3cret-key"
OVERRIDES = [f"serve.write_key_env={VARIABLE}"]


@pytest.fixture
def keyed(tiny_artifact, tmp_path, monkeypatch) -> TestClient:
    """The app over a copy of the artifact, with the write key set."""
    monkeypatch.setenv(VARIABLE, KEY)
    folder = copy_artifact(tiny_artifact, tmp_path / "artifact")
    return TestClient(create_app(load_artifact(folder, OVERRIDES)))


def new_item(item_id: str) -> dict:
    return {"id": item_id, "fields": {"title": f"{item_id} lamp"}}


def test_writes_need_the_key(keyed):
    missing = keyed.post("/items", json=new_item("a"))
    assert missing.status_code == 401 and "Bearer" in missing.json()["detail"]
    assert missing.headers["www-authenticate"] == "Bearer"
    basic = keyed.post("/items", json=new_item("a"), headers={"Authorization": f"Basic {KEY}"})
    assert basic.status_code == 401
    wrong = keyed.post("/items", json=new_item("a"), headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 403 and wrong.json()["detail"] == "wrong write key"
    assert keyed.get("/items/a").status_code == 404  # refused writes changed nothing
    right = keyed.post("/items", json=new_item("a"), headers={"Authorization": f"Bearer {KEY}"})
    assert right.status_code == 201, right.text
    assert keyed.get("/items/a").json()["title"] == "a lamp"


def test_reads_stay_open_with_a_key(keyed):
    assert keyed.get("/health").json()["write_key"] is True
    assert keyed.post("/recommend", json={"history": ["i1", "i2"], "k": 3}).status_code == 200
    assert keyed.get("/items/i1").status_code == 200


def test_without_a_key_writes_are_open(tiny_artifact, tmp_path, monkeypatch):
    monkeypatch.delenv(VARIABLE, raising=False)
    client = TestClient(create_app(load_artifact(copy_artifact(tiny_artifact, tmp_path / "a"), OVERRIDES)))
    assert client.get("/health").json()["write_key"] is False
    assert client.post("/items", json=new_item("b")).status_code == 201


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_loopback_needs_no_key(host, monkeypatch):
    monkeypatch.delenv(VARIABLE, raising=False)
    check_host(host, VARIABLE)  # does not raise


def test_beyond_loopback_needs_a_key(monkeypatch):
    monkeypatch.setenv(VARIABLE, "")  # empty counts as unset
    with pytest.raises(UserError, match=f"set \\${VARIABLE}"):
        check_host("0.0.0.0", VARIABLE)
    monkeypatch.setenv(VARIABLE, KEY)
    check_host("0.0.0.0", VARIABLE)


def test_cli_serve_refuses_a_public_host_without_a_key(tiny_artifact, monkeypatch):
    monkeypatch.delenv(VARIABLE, raising=False)
    code, _, err = run_cli("serve", tiny_artifact, *OVERRIDES, "--host", "0.0.0.0")
    assert_one_line_error(code, err, "0.0.0.0", VARIABLE, "serve.host")
