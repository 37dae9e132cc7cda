"""Folders are published whole (a second publisher keeps the first one's folder unless it replaces it);
JSON lists appended from two processes keep every record."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest

from hllm.files import append_json, publish_folder


def writer(text: str):
    def write(folder: Path) -> None:
        (folder / "part.txt").write_text(text)

    return write


def test_a_publisher_that_lost_the_race_keeps_the_winners_folder(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    rename = os.replace

    def another_process_publishes_first(src, dst):
        """The other process's whole publish lands just before our rename."""
        if Path(dst) == folder and not folder.exists():
            (tmp_path / "theirs").mkdir()
            writer("theirs")(tmp_path / "theirs")
            rename(tmp_path / "theirs", folder)
        rename(src, dst)

    monkeypatch.setattr(os, "replace", another_process_publishes_first)
    publish_folder(writer("mine"), folder, replace=False)
    assert (folder / "part.txt").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]  # no temporary folder left behind


def test_replace_swaps_the_folder_and_a_failed_write_leaves_it_as_it_was(tmp_path):
    folder = tmp_path / "cache"
    publish_folder(writer("old"), folder, replace=True)
    publish_folder(writer("new"), folder, replace=True)
    assert (folder / "part.txt").read_text() == "new"

    def crash(tmp: Path) -> None:
        writer("half")(tmp)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        publish_folder(crash, folder, replace=True)
    assert (folder / "part.txt").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]


def _append_many(path: str, writer: int, count: int) -> None:
    for i in range(count):
        append_json(path, {"writer": writer, "i": i})


def test_append_json_from_two_processes_keeps_every_record(tmp_path):
    path = tmp_path / "results.json"
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_append_many, args=(str(path), w, 25)) for w in range(2)]
    for process in writers:
        process.start()
    for process in writers:
        process.join(timeout=120)
        assert process.exitcode == 0
    records = json.loads(path.read_text())
    assert sorted((r["writer"], r["i"]) for r in records) == [(w, i) for w in range(2) for i in range(25)]
