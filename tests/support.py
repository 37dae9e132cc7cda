"""Helpers the test modules share (fixtures live in conftest.py): the CLI in-process, the one-line
error contract, the tiny run config, the cycle dataset and Creator rows, artifact copies, a live server."""

from __future__ import annotations

import contextlib
import io
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pandas as pd
import uvicorn

from hllm.bench.serve import free_port
from hllm.cli import main

CYCLE_ITEMS = 12
CYCLE_USERS = 36
CYCLE_TITLES = (
    "red lamp",
    "blue pen",
    "green ink",
    "black tape",
    "white desk",
    "gold box",
    "paper kit",
    "glass set",
    "water bag",
    "mini cable",
    "dark chair",
    "pro light",
)
INTERESTS = (["science lab"], ["home office"], ["kids toy"])


def run_cli(*args: object) -> tuple[int, str, str]:
    """Run `hllm ARGS` in-process through `main()`; return (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["hllm", *map(str, args)]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as exit_info:
        code = exit_info.code or 0
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


def assert_one_line_error(code: int, err: str, *expected: str) -> None:
    """The CLI's contract for bad input: exit 2, one `error: ` line holding every `expected` text."""
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in lines[0], err


def write_cycle_data(folder: Path) -> Path:
    """A deterministic pattern: every user walks a cycle of 12 items, so item i is always followed
    by item i+1; a model that learns it ranks the next item first (Recall@1 = 1)."""
    rows = [
        (f"u{user}", f"i{(user + step) % CYCLE_ITEMS}", step)
        for user in range(CYCLE_USERS)
        for step in range(6)
    ]
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).to_csv(folder / "cycle.csv", index=False)
    items = pd.DataFrame({"item_id": [f"i{i}" for i in range(CYCLE_ITEMS)], "title": CYCLE_TITLES})
    items.to_csv(folder / "cycle_items.csv", index=False)
    return folder


def tiny_overrides(data_folder: Path, out_dir: Path, **extra: object) -> list[str]:
    """Config overrides for a fast CPU run on tiny random models over the cycle data; `a__b=v` in
    `extra` adds or replaces `a.b=v`."""
    values = {
        "name": "tiny",
        "out_dir": out_dir,
        "data.path": data_folder / "cycle.csv",
        "data.item_path": data_folder / "cycle_items.csv",
        "data.cache_dir": out_dir / "cache",
        "data.prompt": "''",
        "data.max_history": 5,
        "model.item.backbone": "tiny-bert",
        "model.item.pooling": "mean",
        "model.user.backbone": "tiny-llama",
        "train.batch_size": 8,
        "train.num_negatives": 8,
        "train.lr": 3e-3,
        "train.warmup": 0.0,
        "train.log_every": 1,
        "train.accelerator": "cpu",
        "eval.metric": "recall@1",
        "eval.ks": "[1,5]",
    }
    values.update({key.replace("__", "."): value for key, value in extra.items()})
    return [f"{key}={value}" for key, value in values.items()]


def cycle_rows(data) -> pd.DataFrame:
    """Creator rows, one per cycle user: its last training item, retitled for one of three interests."""
    rows = []
    for user in range(data.num_users):
        training = data.sequence(user)[:-2]
        item = int(training[-1])
        interests = INTERESTS[user % 3]
        title = data.item_titles[item]
        rows.append(
            {
                "user_id": str(data.user_ids[user]),
                "history_item_ids": [str(data.item_ids[i]) for i in training[:-1]],
                "item_id": str(data.item_ids[item]),
                "original_title": title,
                "selling_points": f"description: a {title} for the desk",
                "history": "\n".join(f"- {data.item_titles[i]}" for i in training[:-1]),
                "interests": interests,
                "personalised_title": f"{title} for {interests[0]}",
                "reasons": [],
                "kept": user % 4 != 3,
            }
        )
    return pd.DataFrame(rows)


def copy_artifact(source: Path, target: Path) -> Path:
    """A private copy of a session artifact, for a test that changes it."""
    shutil.copytree(source, target)
    return target


@contextlib.contextmanager
def serving_app(app, *, health: str = "/health") -> Iterator[str]:
    """uvicorn on 127.0.0.1, a free port, in a background thread; yields the URL once `health` answers."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}{health}", timeout=1).status_code == 200:
                    break
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        assert not thread.is_alive(), "the server did not stop"
