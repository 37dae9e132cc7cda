"""`hllm bench serve`: the real server on 127.0.0.1, driven over HTTP at several concurrency levels.

Per catalogue size (real items + synthetic ones) and index kind (or variant: a variant may choose its
own index and settings): p50/p95/p99 and throughput of
POST /recommend for the artifact's real held-out histories -> the "Serving" section of BENCHMARKS.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import aiohttp
import httpx
import numpy as np
import pandas as pd

from hllm.bench.report import write_markdown_section
from hllm.config import load_config
from hllm.errors import UserError
from hllm.files import write_json
from hllm.serve_config import ServeConfig
from hllm.serving.export import load_artifact, read_manifest, write_catalogue, write_manifest
from hllm.serving.index import index_artifact, settings_of

HEADING = "## Serving"
STARTUP_S = 600  # a 1M-item artifact is hashed, loaded and indexed before /health answers
CHUNK = 100_000
OVERLAP_HISTORIES = 1000  # held-out histories each variant's top-10 is compared on


def scale_artifact(source: Path, folder: Path, items: int, *, seed: int = 0) -> Path:
    """A copy of `source` whose catalogue is padded to `items` with synthetic embeddings (kept, and
    reused with its saved index by the next run with the same source, size and seed).

    Synthetic items are drawn from a Gaussian with the real embeddings' mean and covariance, then
    normalised: they spread like the real ones. (Mixing a few real items plus noise instead makes
    hundreds of near-copies of each real item, ties no real catalogue has, and no approximate
    index tells such ties apart.)
    """
    manifest = read_manifest(source)
    origin = {"source": manifest["files"]["embeddings.npy"]["sha256"], "items": items, "seed": seed}
    # Made by an earlier run: reuse it and its saved index (load_artifact verifies its files next).
    made = (folder / "manifest.json").is_file() and read_manifest(folder, verify=False).get("scaled_from")
    if made == origin:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("added.npz", "index-*", "manifest.json"))
    real = np.load(source / "embeddings.npy")
    frame = pd.read_parquet(source / "items.parquet")
    extra = items + 1 - len(real)
    if extra < 0:
        raise UserError(f"the artifact already has {len(real) - 1} items, more than {items}", where="--sizes")
    rng = np.random.default_rng(seed)
    mean, covariance = real[1:].mean(0), np.cov(real[1:].T)
    factor = np.linalg.cholesky(covariance + 1e-6 * np.eye(len(covariance))).astype(np.float32)  # (D, D)
    parts = [real]
    for first in range(0, extra, CHUNK):
        rows = (
            mean
            + rng.standard_normal((min(CHUNK, extra - first), real.shape[1]), dtype=np.float32) @ factor.T
        )
        parts.append(rows / np.linalg.norm(rows, axis=1, keepdims=True))
    synthetic = [f"synthetic-{i}" for i in range(extra)]
    write_catalogue(
        folder,
        [*frame["id"], *synthetic],
        [*frame["title"], *synthetic],
        [*frame["text"], *([""] * extra)],
        np.concatenate(parts),
    )
    kept = {key: manifest[key] for key in ("run", "dataset", "model")}
    write_manifest(folder, kept | {"synthetic_items": extra, "scaled_from": origin})
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(
    folder: Path, kind: str, *, overrides: list[str] = (), timeout: float = STARTUP_S
) -> tuple[subprocess.Popen, str]:
    """`hllm serve` in a subprocess on a free port; returns once /health answers (or fails)."""
    process, url = launch_server(folder, kind, overrides=overrides)
    wait_healthy(process, url, folder, timeout)
    return process, url


def launch_server(folder: Path, kind: str, *, overrides: list[str] = ()) -> tuple[subprocess.Popen, str]:
    """`hllm serve` in a subprocess on a free port, without waiting for it (see `wait_healthy`)."""
    port = free_port()
    command = [sys.executable, "-m", "hllm", "serve", str(folder), f"serve.index={kind}", *overrides]
    command += ["--port", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return process, f"http://127.0.0.1:{port}"


def wait_healthy(process: subprocess.Popen, url: str, folder: Path, timeout: float = STARTUP_S) -> None:
    """Return once the server answers /health; kill it and raise if it exits or the timeout passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise UserError(f"the server exited: {process.stderr.read().strip()[-500:]}", where=str(folder))
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)  # not listening yet: poll again until the deadline
    process.kill()
    raise UserError(f"the server did not answer /health within {timeout:.0f} s", where=str(folder))


def stop_server(process: subprocess.Popen) -> None:
    """Stop a server of `start_server`: terminate, and kill it if it has not exited in 30 s."""
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


async def drive(url: str, histories: list[list[str]], *, clients: int, seconds: float) -> dict:
    """`clients` concurrent loops of POST /recommend (k=10) for `seconds`, after a 1 s warm-up:
    their latencies (s), errors and elapsed time.

    aiohttp, not httpx: the generator shares the server's cores, and httpx's client costs about
    1.2 ms of CPU per request here against aiohttp's 0.2 ms (BENCHMARKS.md)."""
    latencies: list[float] = []
    errors = 0

    async def client(offset: int, http: aiohttp.ClientSession, until: float) -> None:
        nonlocal errors
        i = offset
        while time.perf_counter() < until:
            body = {"history": histories[i % len(histories)], "k": 10}
            start = time.perf_counter()
            async with http.post(f"{url}/recommend", json=body) as response:
                await response.read()
            latencies.append(time.perf_counter() - start)
            errors += response.status != 200
            i += clients

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as http:
        warm_up = time.perf_counter() + 1.0  # open the connections, fill caches
        await asyncio.gather(*(client(c, http, warm_up) for c in range(clients)))
        latencies.clear()
        errors = 0
        started = time.perf_counter()
        await asyncio.gather(*(client(c, http, started + seconds) for c in range(clients)))
        elapsed = time.perf_counter() - started
    return {"latencies": latencies, "errors": errors, "elapsed": elapsed}


def summarise(runs: list[dict], clients: int) -> dict:
    """Percentiles (ms) and throughput over one or more `drive` results."""
    latencies = np.concatenate([run["latencies"] for run in runs]) * 1000
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": sum(run["errors"] for run in runs),
        "rps": len(latencies) / sum(run["elapsed"] for run in runs),
        "p50_ms": p50,
        "p95_ms": p95,
        "p99_ms": p99,
    }


def compare(
    servers: dict[tuple[str, str], tuple[str, list[list[str]]]], *, clients: int, seconds: float, rounds: int
) -> dict[tuple[str, str], dict]:
    """Each server (url, the histories it is asked for) in turn for seconds / rounds, `rounds` times:
    on a shared machine every server sees the same background load, which back-to-back runs would not."""
    runs: dict[tuple[str, str], list[dict]] = {name: [] for name in servers}
    for _ in range(rounds):
        for name, (url, histories) in servers.items():
            runs[name].append(asyncio.run(drive(url, histories, clients=clients, seconds=seconds / rounds)))
    return {name: summarise(done, clients) for name, done in runs.items()}


def top_items(url: str, histories: list[list[str]], k: int = 10) -> list[list[str]]:
    """The served top-k ids for each history, one request at a time."""
    with httpx.Client(timeout=60) as http:
        return [
            [hit["id"] for hit in http.post(f"{url}/recommend", json={"history": h, "k": k}).json()["items"]]
            for h in histories
        ]


def overlap_at_10(first: list[list[str]], other: list[list[str]]) -> float:
    """Mean share of one top-10 found in the other, per history."""
    return float(np.mean([len(set(a) & set(b)) / max(len(a), 1) for a, b in zip(first, other)]))


def bench_serve(
    artifacts: list[Path],
    out: Path,
    *,
    sizes: list[int],
    kinds: list[str],
    clients: list[int],
    seconds: float,
    report: Path | None = None,
    overrides: list[str] = (),
    variants: list[list[str]] = ([],),
    rounds: int = 1,
    agreement: int = OVERLAP_HISTORIES,
    command: str = "hllm bench serve",
) -> list[dict]:
    """Every (size, kind, clients, artifact, variant) against the real server, added to
    out/serve.json (a rerun with the same settings replaces its rows) and to the `report` section.

    `overrides` are serve.* settings for the recall check and every server; each variant adds its
    own (an index of its own too: `serve.index=pq`) and gets its own server per artifact (or only for
    the artifact its first word names: `NAME: serve.index=pq`), all up at once and driven in turn
    (`rounds` times per level), each artifact with its own held-out histories. With several
    variants, each one's top-10 is compared with the first variant's of the same artifact over
    `agreement` held-out histories (overlap@10: does int8 or a shorter window rank like fp32?).
    """
    names = [Path(a).name for a in artifacts]
    if len(set(names)) < len(names):
        raise UserError(f"artifacts need distinct folder names, got {names}", where="ARTIFACTS")
    for variant in variants:
        if (only := _only_for(variant)) is not None and only not in names:
            raise UserError(f"variant {' '.join(variant)!r} names no artifact of {names}", where="--variant")
    histories = {name: load_artifact(a, verify=False).histories for name, a in zip(names, artifacts)}
    path = out / "serve.json"
    records = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
    for size in sizes:
        folders = {
            name: scale_artifact(Path(a), out / f"catalogue-{size}-{name}", size)
            for name, a in zip(names, artifacts)
        }
        for kind in kinds:
            setups, servers = {}, {}
            try:
                for name, folder in folders.items():
                    mine = [v for v in variants if _only_for(v) in (None, name)]
                    setups |= index_variants(folder, name, kind, list(overrides), mine)
                    for variant in mine:
                        servers[name, " ".join(variant)] = launch_server(
                            folder, kind, overrides=[*overrides, *_settings(variant)]
                        )
                for (name, _), (process, url) in servers.items():  # they start side by side
                    wait_healthy(process, url, folders[name])
                overlaps = agreement_of(servers, histories, agreement) if len(variants) > 1 else {}
                for level in clients:
                    targets = {key: (url, histories[key[0]]) for key, (_, url) in servers.items()}
                    results = compare(targets, clients=level, seconds=seconds, rounds=rounds)
                    for (name, variant), result in results.items():
                        serve, built = setups[name, variant]
                        settings = {k: v for k, v in settings_of(serve).items() if k != "kind"}
                        row = {"items": size, "index": serve.index, "settings": settings, "artifact": name}
                        row |= {"variant": variant, **result, "overlap@10": overlaps.get((name, variant))}
                        row |= {"precision": serve.precision, "history_window": serve.history_window}
                        row["last_position_only"] = serve.last_position_only
                        row |= {key: built[key] for key in ("recall@10", "build_s", "saved_index_read")}
                        row["command"] = command
                        same = ("items", "index", "settings", "precision", "variant", "clients", "artifact")
                        records = [r for r in records if any(r.get(key) != row[key] for key in same)] + [row]
                        write_json(path, records)
                        print(json.dumps(row), flush=True)
            finally:
                for process, _ in servers.values():
                    stop_server(process)
    if report is not None:
        write_markdown_section(report, HEADING, serving_section(records))
    return records


def _only_for(variant: list[str]) -> str | None:
    """The artifact a variant is limited to (its first word `NAME:`), or None: every artifact."""
    return variant[0][:-1] if variant and variant[0].endswith(":") else None


def _settings(variant: list[str]) -> list[str]:
    """A variant's serve.* overrides, without its `NAME:` limit."""
    return variant[1:] if _only_for(variant) is not None else variant


def index_variants(
    folder: Path, name: str, kind: str, overrides: list[str], variants: list[list[str]]
) -> dict[tuple[str, str], tuple[ServeConfig, dict]]:
    """Each variant's serve settings and its index's build report (recall@10 against exact search):
    a variant may choose its own index (`serve.index=pq`) or build settings; each distinct index is
    built and saved once, for its servers to read."""
    loaded = load_artifact(folder, overrides)
    reports, setups = {}, {}
    for variant in variants:
        serve = load_config(
            folder / "config.yaml", [*overrides, f"serve.index={kind}", *_settings(variant)]
        ).serve
        key = json.dumps(settings_of(serve), sort_keys=True)
        if key not in reports:
            configured = replace(loaded, config=replace(loaded.config, serve=serve))
            reports[key] = index_artifact(configured, serve.index)
        setups[name, " ".join(variant)] = serve, reports[key]
    return setups


def agreement_of(
    servers: dict[tuple[str, str], tuple[subprocess.Popen, str]],
    histories: dict[str, list[list[str]]],
    count: int,
) -> dict[tuple[str, str], float]:
    """overlap@10 of every variant with the first variant of the same artifact, over its first
    `count` held-out histories (the first variant's own is 1 by definition)."""
    tops = {key: top_items(url, histories[key[0]][:count]) for key, (_, url) in servers.items()}
    firsts = {}
    for name, variant in tops:
        firsts.setdefault(name, variant)
    return {(name, v): overlap_at_10(tops[name, firsts[name]], top) for (name, v), top in tops.items()}


def settings_text(settings: dict) -> str:
    """An index's build and query settings, short: `m=32 ef_construction=128` (the kind left out)."""
    return " ".join(f"{key.split('_', 1)[1]}={value}" for key, value in settings.items() if key != "kind")


def serving_section(records: list[dict]) -> str:
    """The Markdown table of serving benchmarks, with the commands and machine that produced them."""
    rows = [
        "| items | artifact | index | recall@10 | clients | requests | req/s | p50 ms | p95 ms | p99 ms "
        "| errors | overlap@10 |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    order = {"exact": 0, "hnsw": 1, "hnsw-sq8": 2, "ivf": 3, "pq": 4}

    def place(r: dict) -> tuple:
        settings = str(r.get("settings")), r.get("precision", "fp32"), r.get("variant", "")
        return r["items"], r.get("artifact", ""), order[r["index"]], *settings, r["clients"]

    for r in sorted(records, key=place):
        index = " ".join(filter(None, [r["index"], settings_text(r.get("settings", {}))]))
        index += " bf16" if r.get("precision") == "bf16" else ""
        index += f" ({r['variant']})" if r.get("variant") else ""
        overlap = "" if r.get("overlap@10") is None else f"{r['overlap@10']:.3f}"
        rows.append(
            f"| {r['items']:,} | {r.get('artifact', '')} | {index} | {r['recall@10']:.3f} | {r['clients']} | "
            f"{r['requests']} | {r['rps']:.1f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['p99_ms']:.1f} | "
            f"{r['errors']} | {overlap} |"
        )
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    commands = [f"    {c}" for c in dict.fromkeys(r.get("command", "hllm bench serve") for r in records)]
    note = "overlap@10: a variant's top-10 against the first variant's of its artifact (held-out histories)."
    return "\n".join([f"On {machine}, from:", "", *commands, "", *rows, "", note, ""])
