"""Where a /recommend request's time goes, phase by phase, on one thread (BENCHMARKS.md, issue 21).

    python scripts/profile_request.py CATALOGUE [serve.* overrides]

CATALOGUE is an artifact, e.g. one `hllm bench serve` scaled to 1M items (its saved indexes are read,
missing ones built). One micro-batch of 8 of its held-out histories goes through each phase the server
runs: validating the request bodies, resolving ids and gathering vectors, the User LLM pass (fp32 and
int8) and each index's search. Each phase runs `--repeats` times, interleaved
so that every phase sees the same background load; the medians are printed as a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import replace

import faiss
import torch

from hllm.bench.serve import settings_text
from hllm.config import load_config
from hllm.serving.app import Catalogue, RecommendRequest, _int8_user_llm, _resolve
from hllm.serving.export import encode_histories, load_artifact
from hllm.serving.index import ItemIndex, open_index, search, settings_of

BATCH = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("catalogue")
    parser.add_argument("overrides", nargs="*", help="serve.* settings, e.g. serve.pq_rerank=50")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--kinds", default="hnsw,pq")
    args = parser.parse_intermixed_args()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    artifact = load_artifact(args.catalogue, args.overrides, verify=False)
    bodies = [json.dumps({"history": h, "k": 10}) for h in artifact.histories[:BATCH]]
    catalogue = Catalogue(artifact, ItemIndex(open_index(artifact, {"kind": "exact"}, save=False)))
    window = artifact.config.data.max_history

    def gather() -> list:
        """Each history's item vectors (L, D), cut to the window, as the server reads them."""
        return [catalogue.vectors(_resolve(catalogue, h)[0][-window:]) for h in artifact.histories[:BATCH]]

    vectors = gather()
    int8 = replace(artifact, model=copy.deepcopy(artifact.model))  # the fp32 model is kept beside it
    _int8_user_llm(int8.model)
    queries = encode_histories(artifact, vectors)
    phases: dict[str, Callable[[], object]] = {
        f"parse + validate {BATCH} bodies": lambda: [RecommendRequest.model_validate_json(b) for b in bodies],
        "resolve ids + gather vectors": gather,
        f"User LLM fp32, B={BATCH}": lambda: encode_histories(artifact, vectors),
        f"User LLM int8, B={BATCH}": lambda: encode_histories(int8, vectors),
    }
    for kind in args.kinds.split(","):
        serve = load_config(artifact.folder / "config.yaml", [*args.overrides, f"serve.index={kind}"]).serve
        settings = settings_of(serve)
        index = open_index(artifact, settings)
        # k = 10 + a 50-item history filtered out, as served
        phase = f"{kind} search {settings_text(settings)}, B={BATCH}, k=60 (10 kept)"
        phases[phase] = lambda index=index: search(index, queries, 60, kept=10)
    times: dict[str, list[float]] = {name: [] for name in phases}
    for _ in range(args.repeats):
        for name, phase in phases.items():
            start = time.perf_counter()
            phase()
            times[name].append(time.perf_counter() - start)
    print(f"| phase ({BATCH} requests, {artifact.embeddings.shape[0] - 1:,} items, one thread) | ms |")
    print("|---|---:|")
    for name, measured in times.items():
        print(f"| {name} | {1000 * statistics.median(measured):.2f} |")


if __name__ == "__main__":
    main()
