"""`hllm creator demo`: the whole Creator path on a slice of amazon-scientific, offline on a CPU.

a short HLLM run (frozen MiniLM items) -> build-data (the grounded teacher, grounded-v3: titles
from each item's own text, the facts chosen by the interest that run's user embedding predicts; no
LLM) -> Creator training (with the fact selector) -> cluster-level inference for a few held-out
items -> evaluation with the ablations and a second judge. Every step resumes what OUT already holds.
Writes OUT/metrics.json: {"full", "random_user", "no_user"} figures plus each step's seconds.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from hllm.bench.recipes import recipe_path
from hllm.bench.run import dataset_overrides
from hllm.config import RunConfig, load_config
from hllm.creator.data.stages import claim_folder
from hllm.creator.data.teacher import build_data
from hllm.creator.evaluate import evaluate_creator
from hllm.creator.infer.infer import embed_shards, infer
from hllm.creator.model.training import fit_creator, load_creator
from hllm.files import write_json
from hllm.runs import load_run
from hllm.train import fit

CREATOR_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "creator-demo.yaml"
HLLM_EPOCHS = 2  # measured ~1 minute each on 2 cores; the bench's best epoch is later, but the demo is short
INFER_ITEMS = 8  # cluster titles for a few held-out items: the evaluation judges the rest
# ~300 of the default 700 users held out and all their rows evaluated: fewer rows cannot resolve a
# lift of ~0.005 (40 held-out rows could not, even for the teacher's own titles: BENCHMARKS.md)
HELD_OUT_SHARE = 0.43


def demo_configs(out: Path, *, limit: int, precision: str = "32-true") -> tuple[RunConfig, RunConfig]:
    """The demo's HLLM run config and its Creator config, both writing under `out`.

    `precision` is the Creator training's (train.precision): bf16-mixed is for CPUs with native bf16
    (avx512_bf16 or AMX); where bf16 is emulated it is slower than fp32."""
    hllm_config = load_config(
        recipe_path("hllm-minilm-frozen"),
        [
            *dataset_overrides("amazon-scientific"),
            f"train.epochs={HLLM_EPOCHS}",
            "name=hllm",
            f"out_dir={out}",
        ],
    )
    creator_config = load_config(
        CREATOR_CONFIG,
        [
            f"out_dir={out}",
            "name=creator",
            f"creator.data.limit={limit}",
            f"creator.data.interest_run={out / 'hllm'}",
            f"creator.model.hllm_run={out / 'hllm'}",
            f"creator.train.rows={out / 'data' / 'rows.parquet'}",
            f"creator.train.holdout={HELD_OUT_SHARE}",
            "creator.eval.limit=0",
            f"train.precision={precision}",
        ],
    )
    return hllm_config, creator_config


def run_creator_demo(
    out: str | Path = "runs/creator-demo", *, limit: int, console: Console, precision: str = "32-true"
) -> dict:
    out, timings = Path(out), {}

    def timed(name: str, step):
        started = time.perf_counter()
        console.rule(f"[bold]{name}")
        value = step()
        timings[name] = round(time.perf_counter() - started, 1)
        return value

    hllm_config, creator_config = demo_configs(out, limit=limit, precision=precision)
    creator = creator_config.creator
    timed("hllm train", lambda: fit(hllm_config, resume=True))
    hllm = timed("hllm load", lambda: load_run(out / "hllm"))
    report = timed(
        "build-data", lambda: build_data(hllm_config.data, creator.data, creator.teacher, out / "data")
    )
    console.print(f"{report['kept']} of {report['rows']} titles kept by the hallucination filter")
    timed("creator train", lambda: fit_creator(creator_config, resume=True, hllm=hllm))
    run = load_creator(out / "creator", hllm=hllm)
    items = sorted(set(run.rows.loc[run.rows["user_id"].isin(run.held_out), "item_id"]))[:INFER_ITEMS]
    claim_folder(out / "infer", {"run": str((out / "creator").resolve()), "items": items})
    inference = timed(
        "infer", lambda: (embed_shards(run, out / "infer"), infer(run, out / "infer", items=items))[1]
    )
    result = timed(
        "evaluate",
        lambda: evaluate_creator(run, out / "eval", limit=creator.eval.limit, seed=creator.eval.seed),
    )
    result |= {"infer": inference, "seconds": timings, "build_data": {k: report[k] for k in ("rows", "kept")}}
    write_json(out / "metrics.json", result)
    return result
