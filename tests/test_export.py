"""The serving artifact: it reproduces the run it came from, and a damaged one is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hllm.errors import UserError
from hllm.evaluate import item_table, recommend_items
from hllm.runs import load_run
from hllm.serving.export import encode_histories, encode_texts, load_artifact, read_manifest
from tests.support import assert_one_line_error, copy_artifact, run_cli


def test_artifact_reproduces_the_runs_item_table_and_recommendations(tiny_run, tiny_artifact):
    run = load_run(tiny_run)
    table = item_table(run.model, run.data.num_items, run.item_tokens, batch_size=64)
    artifact = load_artifact(tiny_artifact)
    np.testing.assert_allclose(artifact.embeddings, table.numpy(), atol=1e-6)
    assert artifact.item_ids == list(run.data.item_ids)
    history = [run.data.item_index(raw) for raw in ("i3", "i4", "i5")]
    expected, _ = recommend_items(run.model, table, history, k=5, max_history=5, exclude_history=False)
    user = encode_histories(artifact, [artifact.embeddings[history]])[0]
    assert np.argsort(-(artifact.embeddings[1:] @ user))[:5].tolist() == [i - 1 for i in expected]


def test_item_text_encodes_to_the_catalogue_row(tiny_artifact):
    """A cold-start item with a catalogue item's text gets that item's embedding: same Item LLM path."""
    artifact = load_artifact(tiny_artifact)
    rows = [1, 5]
    np.testing.assert_allclose(
        encode_texts(artifact, [artifact.texts[r] for r in rows]), artifact.embeddings[rows], atol=1e-5
    )


def test_manifest_hashes_every_file_and_records_versions(tiny_artifact):
    manifest = read_manifest(tiny_artifact)
    files = {p.relative_to(tiny_artifact).as_posix() for p in tiny_artifact.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == files - {"manifest.json"}
    assert {"item_llm/model.safetensors", "user_llm/model.safetensors", "embeddings.npy"} <= files
    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["items"] == 12 and manifest["model"]["text_fields"] == ["title"]


def test_a_changed_byte_is_refused(tiny_artifact, tmp_path):
    artifact = copy_artifact(tiny_artifact, tmp_path / "a")
    data = bytearray((artifact / "embeddings.npy").read_bytes())
    data[-1] ^= 0xFF  # same size, different contents
    (artifact / "embeddings.npy").write_bytes(bytes(data))
    with pytest.raises(UserError, match="does not match the manifest"):
        load_artifact(artifact)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda a: (a / "user_llm" / "model.safetensors").unlink(), "missing"),
        (lambda a: (a / "manifest.json").unlink(), "not an hllm artifact"),
        (lambda a: (a / "manifest.json").write_text("{not json"), "damaged manifest"),
        (lambda a: _set_format(a, 99), "format 99"),
    ],
)
def test_a_damaged_or_mismatched_artifact_is_refused(tiny_artifact, tmp_path, damage, message):
    artifact = copy_artifact(tiny_artifact, tmp_path / "a")
    damage(artifact)
    with pytest.raises(UserError, match=message):
        load_artifact(artifact)


def _set_format(artifact: Path, value: int) -> None:
    manifest = json.loads((artifact / "manifest.json").read_text())
    (artifact / "manifest.json").write_text(json.dumps({**manifest, "format": value}))


def test_only_serve_settings_can_be_overridden(tiny_artifact):
    assert load_artifact(tiny_artifact, ["serve.index=hnsw"]).config.serve.index == "hnsw"
    with pytest.raises(UserError, match="only serve"):
        load_artifact(tiny_artifact, ["model.item.pooling=cls"])


def test_cli_export_refuses_an_existing_folder_and_a_damaged_artifact(tiny_run, tiny_artifact, tmp_path):
    code, _, err = run_cli("export", tiny_run, tiny_artifact)
    assert_one_line_error(code, err, "already exists")
    artifact = copy_artifact(tiny_artifact, tmp_path / "a")
    (artifact / "items.parquet").write_bytes(b"garbage")
    code, _, err = run_cli("index", artifact, "--kind", "exact")
    assert_one_line_error(code, err, "items.parquet", "does not match the manifest")
