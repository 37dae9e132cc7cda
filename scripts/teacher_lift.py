"""How much the Creator's training titles personalise, judged as `hllm creator evaluate` judges the
Creator's own titles (the HLLM judge and second judges), with no Creator trained. A Creator cannot
personalise more than the titles it learns from.

    python scripts/teacher_lift.py HLLM_RUN ROWS.parquet [--judges other,tfidf] [--fact-chars 200]

Prints one JSON object: rows judged (the kept ones), the share whose title changed, and per judge
the personalisation lift with its 95% bootstrap interval, wins and mean gain over the original.
"""

from __future__ import annotations

import argparse
import json

import pandas as pd

from hllm.creator.evaluate import teacher_lift
from hllm.runs import load_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("hllm_run", help="the HLLM run folder that judges (and embeds the users)")
    parser.add_argument("rows", help="rows.parquet of `hllm creator build-data`")
    parser.add_argument("--judges", default="other,tfidf", help="second judges, comma-separated")
    parser.add_argument("--fact-chars", type=int, default=200, help="as creator.data.fact_chars")
    args = parser.parse_args()
    rows = pd.read_parquet(args.rows)
    judges = [spec for spec in args.judges.split(",") if spec]
    print(
        json.dumps(teacher_lift(load_run(args.hllm_run), rows, judges, fact_chars=args.fact_chars), indent=1)
    )


if __name__ == "__main__":
    main()
