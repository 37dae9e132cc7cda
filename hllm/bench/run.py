"""`hllm bench`: every (dataset, model, seed) trained by the one loop and scored by the one evaluator,
one record at a time into `results.json`, so an interrupted suite resumes where it stopped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from hllm.bench import recipes
from hllm.config import RunConfig, absolute_paths, config_to_dict, load_config
from hllm.data.dataset import prepare_dataset
from hllm.errors import UserError
from hllm.evaluate import evaluate_split, item_table, protocol_card
from hllm.files import append_json
from hllm.models.build import build_model, cache_frozen_items
from hllm.runs import config_hash
from hllm.train import fit

PROTOCOLS = {  # --protocol -> the data.* settings it adds to every run (README: Protocols)
    "leave-one-out": [],
    "new-items": ["data.cold_items=0.1"],
    "temporal": ["data.split=temporal"],
}
UNTRAINED = ("popularity", "text-knn")  # scored as built: nothing to fit, the same under every seed
QUICK = [
    "model.item.backbone=tiny-bert",
    "model.user.backbone=tiny-llama",
    "train.max_steps=3",
    "train.epochs=1",
    "data.max_text_tokens=16",
]


def dataset_name(given: str) -> str:
    """The name records are kept under: a standard dataset's name whether given by name or path."""
    if given in recipes.datasets():
        return given
    path = Path(given).resolve()
    return next((name for name, entry in recipes.datasets().items() if entry.folder == path), given)


def dataset_overrides(name: str) -> list[str]:
    """The `data.*` overrides of a standard dataset (configs/bench/datasets.yaml) or of a path."""
    if entry := recipes.datasets().get(name):
        return [f"data.path={entry.folder}", f"data.text_fields=[{','.join(entry.text_fields)}]"]
    if Path(name).exists():
        return [f"data.path={name}"]
    raise UserError(
        f"unknown dataset {name!r}: use {', '.join(recipes.datasets())} or a path", where="--datasets"
    )


def record_config(
    dataset: str, model: str, seed: int, out: Path, *, quick: bool, extra: list[str], tag: str = ""
) -> RunConfig:
    """The recipe `configs/bench/MODEL.yaml` on `dataset`, then `extra` (a grid setting, --set)."""
    name = f"{Path(dataset).name}-{model}{'-' + tag if tag else ''}-s{seed}"
    overrides = [
        *dataset_overrides(dataset),
        *(QUICK if quick else []),
        *extra,
        f"name={name}",
        f"out_dir={out / 'runs'}",
        f"train.seed={seed}",
    ]
    return load_config(recipes.recipe_path(model), overrides)


def run_record(config: RunConfig, dataset: str, model: str, seed: int) -> dict:
    """Train (or resume) one configuration and score it; UNTRAINED baselines are scored as built.
    The record keeps the config as the run keeps it (input paths absolute, see `absolute_paths`),
    the one its protocol card's hash is computed from."""
    config = absolute_paths(config)
    started = time.perf_counter()
    data = prepare_dataset(config.data)
    if config.model.kind in UNTRAINED:
        scorer, tokens = build_model(config, data)
        batch_size, store = config.eval.item_batch_size, Path(config.data.cache_dir)
        cache_frozen_items(scorer, tokens, batch_size=batch_size, device="cpu", store=store)
        table = item_table(scorer, data.num_items, tokens, batch_size=batch_size)
        result = {
            split: evaluate_split(config, scorer, data, tokens, split, table=table)
            for split in ("valid", "test")
        }
        result |= {
            "protocol": protocol_card(data, "test", model=model, config_hash=config_hash(config)),
            "train": {"valid_history": []},
        }
        params = sum(p.numel() for p in scorer.parameters())  # text-knn's frozen encoder; popularity 0
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
        **(
            {"last_item_text": result["train"]["last_item_text"]}
            if "last_item_text" in result["train"]
            else {}
        ),
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
    protocol: str = "leave-one-out",
    grid_size: int | None = None,
) -> list[dict]:
    """Run every missing record under `protocol` (see PROTOCOLS), appending each to
    `out/results.json` as soon as it is done (under a lock: two runs over other datasets or models
    may share `out`). `grid_size` tunes every model on the first settings of its grid only (the
    same number for every family, so the budgets stay equal; 1 = the recipe)."""
    results_path = out / "results.json"
    records = json.loads(results_path.read_text()) if results_path.exists() else []
    done = {(r["dataset"], r["model"], r["seed"]) for r in records}
    extra = [*PROTOCOLS[protocol], *(extra or [])]
    for model in models:
        recipes.recipe_path(model)  # an unknown model fails before anything trains
    for dataset in map(dataset_name, datasets):
        for model in models:
            runs = seeds if trains(model) else 1  # another seed of an UNTRAINED model repeats seed 0
            missing = [seed for seed in range(runs) if (dataset, model, seed) not in done]
            grid = recipes.grid_of(model) if missing else None
            grid = grid[:grid_size] if grid and grid_size else grid
            best = tune(dataset, model, grid, out, quick=quick, extra=extra) if grid else None
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
                append_json(results_path, record)
    return json.loads(results_path.read_text()) if results_path.exists() else []


def trains(model: str) -> bool:
    """Whether `model`'s recipe fits anything (its kind is not UNTRAINED)."""
    return load_config(recipes.recipe_path(model)).model.kind not in UNTRAINED


def tune(
    dataset: str, model: str, grid: list[list[str]], out: Path, *, quick: bool, extra: list[str]
) -> dict:
    """Every setting of `grid` trained with seed 0 (kept in `out/tuning.json`, resumable); returns
    the record of the best one on validation eval.metric, with a `tuning` summary."""
    path = out / "tuning.json"
    trials = json.loads(path.read_text()) if path.exists() else []
    for index, overrides in enumerate(grid):
        key = (dataset, model, overrides)
        if any((t["dataset"], t["model"], t["overrides"]) == key for t in trials):
            continue
        tag = f"t{index}"
        config = record_config(dataset, model, 0, out, quick=quick, extra=[*overrides, *extra], tag=tag)
        record = run_record(config, dataset, model, 0) | {"quick": quick, "overrides": overrides, "tag": tag}
        trials = append_json(path, record)
    mine = [t for t in trials if (t["dataset"], t["model"]) == (dataset, model) and t["overrides"] in grid]
    metric = mine[0]["config"]["eval"]["metric"]
    best = max(mine, key=lambda t: t["valid"][metric])
    summary = {
        "selected_on": f"valid {metric}",
        "grid_size": len(mine),
        "chosen": best["overrides"],
        "tag": best["tag"],
        "trials": {" ".join(t["overrides"]) or "recipe": round(t["valid"][metric], 4) for t in mine},
    }
    return {key: value for key, value in best.items() if key != "tag"} | {"tuning": summary}
