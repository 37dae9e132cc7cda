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

from hllm.bench.run import record_config
from hllm.data.dataset import SequenceData
from hllm.evaluate import item_table, rank_users, training_counts
from hllm.runs import load_run
from hllm.train import fit

CHOSEN = {  # benchmarks/report.md, "Chosen on validation only" (ml-100k)
    "sasrec-ce": [],
    "hllm-minilm-frozen-id": ["model.user.backbone=small-llama-64"],
}
BANDS = [0, 20, 60, 150, np.inf]  # training interactions of the target
RESAMPLES = 5000


def ranks(out: Path, model: str, checkpoint: str) -> tuple[dict[str, np.ndarray], SequenceData]:
    """(U,) 1-based rank of every user's valid and test target (0: none) under `model`'s run, and
    the run's data."""
    config = record_config("ml-100k", model, 0, out, quick=False, extra=CHOSEN[model], tag="t")
    folder = out / "runs" / config.name
    if not (folder / "metrics.json").exists():  # written when a run finishes
        fit(config, resume=True)
    run = load_run(folder, checkpoint=checkpoint)
    table = item_table(run.model, run.data.num_items, run.item_tokens, batch_size=256)
    by_split = {
        split: rank_users(
            run.model, run.data, table, split, batch_size=256, max_history=run.config.data.max_history
        ).numpy()
        for split in ("valid", "test")
    }
    return by_split, run.data


def tie_order_consistency(data: SequenceData, shuffle: bool) -> float:
    """Mean majority share of the order of each item pair rated in one second by one user (pairs
    seen at least 8 times), in the file's order (which the dataset keeps inside a second) or
    shuffled inside each second: how far that order carries a pattern."""
    rng = np.random.default_rng(0)
    first = defaultdict(lambda: [0, 0])
    for user in range(data.num_users):
        items, times = data.sequence(user), data.timestamps[data.offsets[user] : data.offsets[user + 1]]
        for second in np.split(items, np.flatnonzero(times[1:] != times[:-1]) + 1):
            for a, b in combinations(rng.permutation(second) if shuffle else second, 2):
                first[min(a, b), max(a, b)][int(a > b)] += 1
    return float(np.mean([max(pair) / sum(pair) for pair in first.values() if sum(pair) >= 8]))


def main(out: Path) -> None:
    (id_model, data), (hllm, _) = (ranks(out, model, "best") for model in CHOSEN)
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
    file_order, shuffled = (tie_order_consistency(data, shuffle) for shuffle in (False, True))
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
    (last_id, _), (last_hllm, _) = (ranks(out, model, "last") for model in CHOSEN)
    print(
        f"last checkpoints, test R@10: SASRec-CE {(last_id['test'][last_id['test'] > 0] <= 10).mean():.4f}, "
        f"HLLM {(last_hllm['test'][last_hllm['test'] > 0] <= 10).mean():.4f}"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
