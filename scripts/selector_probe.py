"""Can a user embedding predict the grounded teacher's choice of fact? A probe with no LLM.

    python scripts/selector_probe.py HLLM_RUN ROWS.parquet [--fact-chars 200]

For each kept row of a `hllm creator build-data` file (grounded backend) the candidates are "no
fact" (the original title) and each fact the teacher could have added; the label is the fact it
chose first. A softmax over the candidates, scored by their encoder embeddings (the teacher's own
encoder) with a per-kind bias, is trained on 80% of the users and tested on the rest, without the
user and with a low-rank bilinear term between the user and each candidate. The user is the HLLM
run's embedding (what the Creator reads) and, for comparison, the history mean the v2 teacher reads.
A Creative LLM cannot pick facts by user better than such a probe learns to from the same rows.

Prints one JSON object: rows, the share with no fact, and test accuracy per probe.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from hllm.creator.data.grounded import PhraseEncoder, _facts_of, _records, _user_vectors, common_categories
from hllm.creator.data.teacher import read_catalogue
from hllm.creator.evaluate import hllm_user_embeddings
from hllm.models.backbone import load_backbone
from hllm.runs import load_run

KINDS = {"none": 0, "brand": 1, "category": 2, "description": 3}
RANK, WEIGHT_DECAY, STEPS, TEST_SHARE = 16, 1e-3, 300, 0.2


def candidates(rows: pd.DataFrame, items: dict, fact_chars: int, common: set[str], encoder) -> tuple:
    """(R, K, D) candidate embeddings, (R, K) mask and kind ids, (R,) the chosen candidate."""
    per_row, labels = [], []
    for row in rows.itertuples():
        facts = _facts_of(items, row.item_id, fact_chars, common)
        texts = [f.text for f in facts]
        labels.append(texts.index(row.facts[0]) + 1 if len(row.facts) else 0)
        per_row.append(([row.original_title, *texts], ["none", *(f.kind for f in facts)]))
    phrases = sorted({t for texts, _ in per_row for t in texts})
    embedded = dict(zip(phrases, encoder.encode(phrases), strict=True))
    width, most = encoder.width, max(len(texts) for texts, _ in per_row)
    vectors, mask = torch.zeros(len(rows), most, width), torch.zeros(len(rows), most, dtype=torch.bool)
    kinds = torch.zeros(len(rows), most, dtype=torch.long)
    for i, (texts, row_kinds) in enumerate(per_row):
        vectors[i, : len(texts)] = torch.from_numpy(np.stack([embedded[t] for t in texts]))
        mask[i, : len(texts)] = True
        kinds[i, : len(texts)] = torch.tensor([KINDS[k] for k in row_kinds])
    return vectors, mask, kinds, torch.tensor(labels)


def probe_accuracy(vectors, mask, kinds, labels, users: torch.Tensor | None, train: torch.Tensor) -> float:
    """Test accuracy of the softmax probe (with a bilinear user term when `users` is given)."""
    torch.manual_seed(0)
    width = vectors.shape[-1]
    item = torch.zeros(width, requires_grad=True)
    bias = torch.zeros(len(KINDS), requires_grad=True)
    params = [item, bias]
    if users is not None:
        left = (torch.randn(users.shape[1], RANK) * 0.01).requires_grad_()
        right = (torch.randn(RANK, width) * 0.01).requires_grad_()
        params += [left, right]
    optimizer = torch.optim.Adam(params, lr=1e-2, weight_decay=WEIGHT_DECAY)

    def scores(rows: torch.Tensor) -> torch.Tensor:
        value = vectors[rows] @ item + bias[kinds[rows]]
        if users is not None:
            value = value + torch.einsum("nr,nkr->nk", users[rows] @ left, vectors[rows] @ right.T)
        return value.masked_fill(~mask[rows], -1e9)

    for _ in range(STEPS):
        loss = F.cross_entropy(scores(train), labels[train])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return float((scores(~train).argmax(-1) == labels[~train]).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("hllm_run", help="the HLLM run whose user embedding the Creator reads")
    parser.add_argument("rows", help="rows.parquet of `hllm creator build-data --backend grounded`")
    parser.add_argument("--fact-chars", type=int, default=200, help="as creator.data.fact_chars")
    args = parser.parse_args()
    torch.set_num_threads(1)
    hllm = load_run(args.hllm_run)
    rows = pd.read_parquet(args.rows)
    rows = rows[rows["kept"]].reset_index(drop=True)
    catalogue = read_catalogue(hllm.config.data)
    items, common = _records(catalogue), common_categories(catalogue["categories"])
    encoder = PhraseEncoder(load_backbone("minilm"))
    vectors, mask, kinds, labels = candidates(rows, items, args.fact_chars, common, encoder)
    users = rows["user_id"].unique()
    tested = np.random.default_rng(0).choice(users, int(len(users) * TEST_SHARE), replace=False)
    train = torch.as_tensor(~rows["user_id"].isin(set(tested)).to_numpy())
    embedded = torch.from_numpy(hllm_user_embeddings(hllm, rows))
    history = [[i for i in ids if i in items] for ids in rows["history_item_ids"]]
    means = torch.from_numpy(_user_vectors(history, items, encoder))
    result = {
        "rows": len(rows),
        "test_rows": int((~train).sum()),
        "no_fact": float((labels == 0).float().mean()),
    }
    result["accuracy"] = {
        name: probe_accuracy(vectors, mask, kinds, labels, None if u is None else u - u.mean(0), train)
        for name, u in (("no_user", None), ("hllm_user", embedded), ("history_mean", means))
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
