"""The `hllm` command: each command loads the config and makes one library call.

A `UserError` becomes one line on stderr and exit code 2; `--debug` re-raises it with its traceback.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.table import Table

from hllm.bench.commands import bench_app
from hllm.cli_options import Overrides, choice
from hllm.config import dump_config, load_config
from hllm.config_fields import choices
from hllm.creator.commands import creator_app
from hllm.data.dataset import prepare_dataset
from hllm.errors import UserError
from hllm.serve_config import ServeConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)
config_app = typer.Typer(no_args_is_help=True, help="Inspect configurations.")
app.add_typer(config_app, name="config")
app.add_typer(bench_app, name="bench")
app.add_typer(creator_app, name="creator")


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False) -> None:
    """HLLM recommenders: prepare data, train, evaluate, recommend."""


@config_app.command("show")
def config_show(config: Path, overrides: Overrides = None) -> None:
    """Print the resolved config (defaults < CONFIG < overrides) as YAML."""
    typer.echo(dump_config(load_config(config, overrides)), nl=False)


@app.command("prepare")
def prepare(
    path: Annotated[str, typer.Argument(help="Interaction file or dataset folder (data.path).")],
    overrides: Overrides = None,
    fmt: Annotated[
        str | None, typer.Option("--format", help="auto, csv, parquet, recbole, lcrec or hllm.")
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML to start from.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the stats as JSON.")] = False,
    tokenizer: Annotated[
        str | None,
        typer.Option(
            "--tokenizer", help="Tokenizer (a preset such as minilm, or a path): report token lengths."
        ),
    ] = None,
) -> None:
    """Read, check and cache a dataset; print its statistics."""
    choices = [f"data.format={fmt}"] if fmt else []
    data_config = replace(load_config(config, [*choices, *(overrides or [])]).data, path=path)
    data = prepare_dataset(data_config, tokenizer=_load_tokenizer(tokenizer) if tokenizer else None)
    if as_json:
        typer.echo(json.dumps(data.stats))
    else:
        Console().print(_stats_table(data.stats))


def _load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer  # slow import, only when asked for

    from hllm.models.backbone import PRESETS, load_backbone

    if name_or_path in PRESETS:  # the Item LLM presets: minilm, smollm2-135m, tiny-bert, ...
        return load_backbone(name_or_path).tokenizer
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        message = f"cannot load a tokenizer: {str(err).splitlines()[0]}"
        raise UserError(message, where="--tokenizer") from None


def _stats_table(stats: dict) -> Table:
    table = Table(title=f"{stats['dataset']} ({stats['format']})", show_header=False)
    rows = [
        ("users", stats["users"]),
        ("items", stats["items"]),
        ("interactions", stats["interactions"]),
        ("density", f"{stats['density']:.5f}"),
        ("dropped users", stats["dropped_users"]),
        ("dropped interactions (no item text)", stats["dropped_interactions_missing_text"]),
        ("duplicates removed", stats["duplicates_removed"]),
        ("dropped by k-core / short users", stats["dropped_interactions_filter"]),
        ("timestamps", "yes" if stats["has_time"] else "no (file order)"),
        ("text fields", ", ".join(stats["text_fields"]) or "-"),
    ]
    for key, label in (
        ("seq_len", "sequence length"),
        ("text_words", "text words"),
        ("text_tokens", "text tokens"),
    ):
        if stats.get(key):
            rows.append((label, "  ".join(f"{k} {v:g}" for k, v in stats[key].items())))
    rows.append(("cache", stats["cache"]))
    for label, value in rows:
        table.add_row(label, f"{value:,}" if isinstance(value, int) else str(value))
    return table


@app.command("train")
def train(
    config: Annotated[Path, typer.Argument(help="YAML config (see configs/).")],
    overrides: Overrides = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint.")] = False,
) -> None:
    """Train a model; writes runs/NAME/ (config, checkpoints, logs, metrics.json)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    from hllm.train import fit

    result = fit(load_config(config, overrides), resume=resume)
    if rank_zero_only.rank == 0:  # with several processes, one table
        Console().print(_metrics_table({"valid": result["valid"], "test": result["test"]}))


@app.command("evaluate")
def evaluate_run(
    run_dir: Annotated[Path, typer.Argument(help="A run folder written by hllm train.")],
    split: Annotated[str, typer.Option("--split", help="valid, test or both.")] = "both",
    as_json: Annotated[bool, typer.Option("--json", help="Print {valid: {...}, test: {...}}.")] = False,
) -> None:
    """Score a trained run on the whole catalogue (best checkpoint)."""
    from hllm.evaluate import evaluate_split, item_table
    from hllm.runs import load_run

    splits = {"both": ["valid", "test"], "valid": ["valid"], "test": ["test"]}.get(split)
    if splits is None:
        raise UserError(f"unknown split {split!r}; use valid, test or both", where="--split")
    run = load_run(run_dir)
    table = item_table(
        run.model, run.data.num_items, run.item_tokens, batch_size=run.config.eval.item_batch_size
    )
    result = {
        name: evaluate_split(run.config, run.model, run.data, run.item_tokens, name, table=table)
        for name in splits
    }
    if as_json:
        typer.echo(json.dumps(result))
    else:
        Console().print(_metrics_table(result))


@app.command("recommend")
def recommend(
    run_dir: Annotated[
        Path | None,
        typer.Argument(help="A run folder (not with --server); with --all-users/--users also an artifact."),
    ] = None,
    user: Annotated[str | None, typer.Option("--user", help="A user id of the dataset.")] = None,
    items: Annotated[
        str | None, typer.Option("--items", help="A history of item ids, oldest first: A,B,C.")
    ] = None,
    k: Annotated[int, typer.Option("-k", help="How many items.")] = 10,
    server: Annotated[
        str | None, typer.Option("--server", help="Ask a running hllm serve, e.g. http://127.0.0.1:8000.")
    ] = None,
    all_users: Annotated[
        bool, typer.Option("--all-users", help="Every user of the dataset, to --out.")
    ] = False,
    users: Annotated[
        Path | None, typer.Option("--users", help="A file of user ids, one a line, to --out.")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Folder of Parquet shards (resumable).")] = None,
    index: Annotated[
        str | None, typer.Option("--index", help="Artifact index (default: serve.index).")
    ] = None,
    shard_users: Annotated[int, typer.Option("--shard-users", help="Users per Parquet shard.")] = 10_000,
    settings: Annotated[
        list[str] | None,
        typer.Option(
            "--set", help="An artifact's serve.* setting, e.g. serve.hnsw_ef_search=512; repeatable."
        ),
    ] = None,
) -> None:
    """Top-k items for a user of the dataset or for a given history, with titles and scores; or, with
    --all-users/--users and --out, for many users in batch (one process per shard under torchrun)."""
    if all_users or users is not None:
        from hllm.serving.batch import recommend_all

        if run_dir is None or out is None or all_users == (users is not None) or server or user or items:
            raise UserError(
                "batch: give RUN_OR_ARTIFACT --out DIR and one of --all-users or --users FILE", "recommend"
            )
        summary = recommend_all(
            run_dir, out, k=k, users_file=users, index=index, shard_users=shard_users, overrides=settings
        )
        typer.echo(json.dumps(summary))
        return
    if server is not None:
        from hllm.serving.app import recommend_remote

        if items is None or run_dir is not None or user is not None:
            raise UserError("with --server give --items ID,ID,... only (no RUN_DIR, no --user)", "recommend")
        history = [raw.strip() for raw in items.split(",")]
        typer.echo(json.dumps(recommend_remote(server, history, k), indent=2))
        return
    from hllm.demo import show_recommendations
    from hllm.runs import load_run

    if run_dir is None:
        raise UserError("give a RUN_DIR, or --server URL", where="recommend")
    if (user is None) == (items is None):
        raise UserError("give exactly one of --user ID or --items ID,ID,...", where="recommend")
    show_recommendations(
        load_run(run_dir),
        user=user,
        items=items.split(",") if items else None,
        k=k,
        console=Console(),
    )


@app.command("export")
def export(
    run_dir: Annotated[Path, typer.Argument(help="A run folder written by hllm train.")],
    out_dir: Annotated[Path, typer.Argument(help="New folder for the serving artifact.")],
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="best or last.")] = "best",
    creator: Annotated[
        Path | None,
        typer.Option("--creator", help="An output folder of hllm creator infer: serve its titles."),
    ] = None,
) -> None:
    """Write a self-contained serving artifact (weights, item table, ids, texts, manifest)."""
    from hllm.serving.export import export_run

    written = export_run(run_dir, out_dir, checkpoint=checkpoint, creator=creator)
    typer.echo(f"artifact written to {written}")


@app.command("index")
def index(
    artifact: Annotated[Path, typer.Argument(help="An artifact written by hllm export.")],
    overrides: Overrides = None,
    kind: Annotated[str, typer.Option("--kind", help="exact, hnsw, hnsw-sq8, ivf or pq.")] = "hnsw",
) -> None:
    """Build (and save) the artifact's index; report its recall@10 against exact search."""
    from hllm.serving.export import load_artifact
    from hllm.serving.index import index_artifact

    kind = choice(kind, "--kind", choices(ServeConfig, "index"))
    typer.echo(json.dumps(index_artifact(load_artifact(artifact, overrides), kind)))


@app.command("serve")
def serve(
    artifact: Annotated[Path, typer.Argument(help="An artifact written by hllm export.")],
    overrides: Overrides = None,
    host: Annotated[str | None, typer.Option("--host", help="Default: serve.host.")] = None,
    port: Annotated[int | None, typer.Option("--port", help="Default: serve.port.")] = None,
) -> None:
    """Serve recommendations over HTTP (docs at /docs); serve.* overrides pick the index."""
    from hllm.serving.app import run_server
    from hllm.serving.export import load_artifact

    loaded = load_artifact(artifact, overrides)
    run_server(loaded, host=host or loaded.config.serve.host, port=port or loaded.config.serve.port)


@app.command("demo")
def demo(overrides: Overrides = None) -> None:
    """Prepare bundled ml-100k, train a small HLLM, compare with popularity, recommend."""
    from hllm.demo import run_demo

    run_demo(overrides=overrides)


def _metrics_table(result: dict[str, dict]) -> Table:
    """One row per metric, one column per split (narrow enough for any terminal)."""
    table = Table(title="full-ranking metrics (history masked)")
    table.add_column("metric")
    for split in result:
        table.add_column(split, justify="right")
    for name in next(iter(result.values())):
        if "/" in name:  # a bucket's metric (new/recall@10): buckets differ across splits
            continue
        values = [result[split][name] for split in result]
        table.add_row(name, *(f"{v:.4f}" if isinstance(v, float) else str(v) for v in values))
    table.caption = "per-bucket metrics (new/, tail/, hist_1_3/, ...): --json"
    return table


def main() -> None:
    debug = "--debug" in sys.argv
    try:
        app(standalone_mode=False)
    except UserError as err:
        if debug:
            raise
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
    except click.exceptions.ClickException as err:  # usage errors: click's message, exit 2
        err.show()
        sys.exit(err.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)
