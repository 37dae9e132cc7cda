"""`hllm bench replay`: online equals offline for a run trained under the new-item protocol.

The run's artifact is served (`hllm serve`, fp32) without its new items, each new item is added
through `POST /items` from its fields, and the test users are replayed through `POST /recommend`;
the served Recall/NDCG must equal the offline evaluation of the same checkpoint (to 1e-4 with the
exact index). The HNSW figure is reported beside it.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from hllm.bench.serve import start_server, stop_server
from hllm.errors import UserError
from hllm.evaluate import evaluate_split
from hllm.files import write_json
from hllm.runs import load_run
from hllm.serving.export import export_run
from hllm.serving.replay import add_items, drop_items, item_fields, replay_users

TOLERANCE = 1e-4  # offline vs served metric, exact index


def replay_run(run_dir: Path, out: Path, *, indexes: tuple[str, ...] = ("exact", "hnsw")) -> dict:
    """Offline and served test metrics of `run_dir` (one entry per index kind) -> `out/replay.json`."""
    run = load_run(run_dir)
    new = [str(run.data.item_ids[i]) for i in run.data.holdout.held_out]
    if not new:
        raise UserError("the run holds out no item; train it with data.cold_items > 0", where=str(run_dir))
    offline = evaluate_split(run.config, run.model, run.data, run.item_tokens, "test")
    artifact = export_run(run_dir, out / "artifact")
    fields = item_fields(run.config.data, new, run.data.stats["text_fields"])
    result: dict = {"run": str(run_dir), "new_items": len(new), "tolerance": TOLERANCE}
    keys = [f"{name}@{k}" for name in ("recall", "ndcg") for k in run.config.eval.ks]
    result["offline"] = {key: offline[key] for key in [*keys, "users"]}
    for kind in indexes:
        folder = drop_items(artifact, out / f"served-{kind}", set(new))
        process, url = start_server(folder, kind, overrides=["serve.precision=fp32"])
        try:
            with httpx.Client(base_url=url, timeout=120) as client:
                add_items(client, new, fields)
                online = replay_users(client, run.data, run.config.eval.ks)
        finally:
            stop_server(process)
        result[kind] = online | {"max_abs_diff": max(abs(online[key] - offline[key]) for key in keys)}
    write_json(out / "replay.json", result)
    return result
