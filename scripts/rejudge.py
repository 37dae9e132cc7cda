"""Judge the titles of an `hllm creator evaluate` folder again with other text judges, without
generating them again (generation is most of an evaluation's time).

    python scripts/rejudge.py CREATOR_RUN EVAL_DIR [--judges tfidf,other]

Each row's user and the other held-out user it is compared with are those of the evaluation (the
same seed), so the figures sit beside its metrics.json. Prints one JSON object: per judge, per
variant, the personalisation lift with its 95% bootstrap interval, wins and mean gain.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import torch

from hllm.creator.evaluate import judge_variants, other_rows, second_judge
from hllm.creator.infer.generation import ItemFacts
from hllm.creator.model.dataset import row_histories
from hllm.runs import load_run, run_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="the Creator run folder that was evaluated")
    parser.add_argument("eval_dir", help="the folder `hllm creator evaluate` wrote (generated.parquet)")
    parser.add_argument("--judges", default="tfidf,other", help="second_judge specs, comma-separated")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = run_config(Path(args.run))
    hllm = load_run(config.creator.model.hllm_run)
    generated = pd.read_parquet(Path(args.eval_dir) / "generated.parquet")
    catalogue = ItemFacts.read(hllm.config.data, config.creator.data.fact_chars)
    histories = row_histories(hllm, generated)
    settings = config.creator.eval
    others = torch.as_tensor(other_rows(len(generated), settings.seed + 1))
    result = {"rows": len(generated)}
    for spec in (spec for spec in args.judges.split(",") if spec):
        judge = second_judge(spec, hllm, catalogue)
        if judge is not None:
            scores = judge_variants(
                judge, histories, generated, others, resamples=settings.bootstrap, seed=settings.seed
            )
            result[judge.name] = scores
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
