"""Where ml-100k's test gap between the best HLLM and the best ID model is (BENCHMARKS.md, "Where
ml-100k's test gap is"): seed 0 of each with the setting `hllm bench` chose, trained into OUT (or
reused from there), then per-user ranks from the one evaluator: a paired bootstrap of the
Recall@10 difference, users whose validation and test items share a timestamp against the rest,
target-popularity bands, and the last checkpoint instead of the best.

    python scripts/ml100k_gap.py /tmp/ml100k-gap      # about 8 min on one CPU thread
"""

from __future__ import annotations

import sys
from collections import defaultdict
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd

from hllm.bench.run import record_config
from hllm.evaluate import item_table, rank_users, training_counts
from hllm.runs import load_run
from hllm.train import fit

CHOSEN = {  # benchmarks/report.md, "Chosen on validation only" (ml-100k)
    "sasrec-ce": [],
    "hllm-minilm-frozen-id": ["model.user.backbone=small-llama-64"],
}
BANDS = [0, 20, 60, 150, np.inf]  # training interactions of the target
RESAMPLES = 5000


def ranks(out: Path, model: str, checkpoint: str) -> dict[str, np.ndarray]:
    """(U,) 1-based rank of every user's valid and test target (0: none) under `model`'s run."""
    config = record_config("ml-100k", model, 0, out, quick=False, extra=CHOSEN[model], tag="t")
    folder = out / "runs" / config.name
    if not (folder / "metrics.json").exists():  # written when a run finishes
        fit(config, resume=True)
    run = load_run(folder, checkpoint=checkpoint)
    table = item_table(run.model, run.data.num_items, run.item_tokens, batch_size=256)
    return {
        split: rank_users(
            run.model, run.data, table, split, batch_size=256, max_history=run.config.data.max_history
        ).numpy()
        for split in ("valid", "test")
    } | {"data": run.data}


def tie_order_consistency(data_file: Path, shuffle: bool) -> float:
    """Mean majority share of the order of each item pair rated in one second by one user (pairs
    seen at least 8 times), in the file's order or shuffled: how far that order carries a pattern."""
    frame = pd.read_csv(data_file, sep="\t")
    frame.columns = [column.split(":")[0] for column in frame.columns]
    frame = frame[frame.duplicated(["user_id", "timestamp"], keep=False)].copy()
    frame["order"] = np.random.default_rng(0).permutation(len(frame)) if shuffle else np.arange(len(frame))
    first = defaultdict(lambda: [0, 0])
    for _, group in frame.sort_values("order").groupby(["user_id", "timestamp"]):
        items = group["item_id"].to_numpy()
        for i, j in combinations(range(len(items)), 2):
            first[min(items[i], items[j]), max(items[i], items[j])][int(items[i] > items[j])] += 1
    return float(np.mean([max(pair) / sum(pair) for pair in first.values() if sum(pair) >= 8]))


def main(out: Path) -> None:
    id_model, hllm = (ranks(out, model, "best") for model in CHOSEN)
    data = id_model.pop("data")
    hllm.pop("data")
    rng = np.random.default_rng(0)
    for split in ("valid", "test"):
        scored = id_model[split] > 0
        a, b = hllm[split][scored] <= 10, id_model[split][scored] <= 10
        boot = [
            a[i].mean() - b[i].mean() for i in (rng.integers(0, len(a), len(a)) for _ in range(RESAMPLES))
        ]
        low, high = np.percentile(boot, [2.5, 97.5]) / b.mean()
        diff = a.mean() - b.mean()
        print(
            f"{split}: R@10 HLLM {a.mean():.4f} SASRec-CE {b.mean():.4f}, {diff / b.mean():+.1%} "
            f"(paired 95% interval {low:+.1%} to {high:+.1%}, {len(a)} users)"
        )
    tied = data.timestamps[data.target_positions("valid")] == data.timestamps[data.target_positions("test")]
    print(f"users whose valid and test items share a timestamp: {tied.mean():.1%}")
    data_file = Path(record_config("ml-100k", "sasrec-ce", 0, out, quick=False, extra=[]).data.path)
    data_file = next(data_file.glob("*.inter"))
    file_order, shuffled = (tie_order_consistency(data_file, shuffle) for shuffle in (False, True))
    print(f"order of co-rated pairs, mean majority share: file {file_order:.3f}, shuffled {shuffled:.3f}")
    for split in ("valid", "test"):
        for name, members in (("tied", tied), ("not tied", ~tied)):
            print(
                f"  {split} {name}: SASRec-CE {(id_model[split][members] <= 10).mean():.3f}, "
                f"HLLM {(hllm[split][members] <= 10).mean():.3f}"
            )
    counts = training_counts(data)
    for split in ("valid", "test"):
        scored = id_model[split] > 0
        target_counts = counts[data.items[data.target_positions(split)[scored]]]
        for low, high in zip(BANDS[:-1], BANDS[1:], strict=True):
            band = (target_counts > low) & (target_counts <= high)
            print(
                f"  {split} targets with ({low}, {high}] training interactions ({band.mean():.1%}): "
                f"SASRec-CE {(id_model[split][scored][band] <= 10).mean():.3f}, "
                f"HLLM {(hllm[split][scored][band] <= 10).mean():.3f}"
            )
    last_id, last_hllm = (ranks(out, model, "last") for model in CHOSEN)
    print(
        f"last checkpoints, test R@10: SASRec-CE {(last_id['test'][last_id['test'] > 0] <= 10).mean():.4f}, "
        f"HLLM {(last_hllm['test'][last_hllm['test'] > 0] <= 10).mean():.4f}"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
