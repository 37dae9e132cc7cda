"""`hllm creator ...`: the Creator data pipeline, the GSB judge and a local OpenAI-compatible server."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from hllm.cli_options import choice
from hllm.config import load_config
from hllm.errors import UserError

creator_app = typer.Typer(no_args_is_help=True, help="HLLM-Creator: personalised titles.")

Overrides = Annotated[
    list[str] | None, typer.Argument(help="Dotted overrides, e.g. creator.teacher.batch_size=4")
]
Config = Annotated[Path | None, typer.Option("--config", help="YAML to start from.")]
Backend = Annotated[
    str | None, typer.Option("--backend", help="local (transformers) or openai (HTTP endpoint).")
]
Model = Annotated[str | None, typer.Option("--model", help="local: preset/folder/.gguf; openai: model name.")]
BaseUrl = Annotated[str | None, typer.Option("--base-url", help="openai: e.g. http://127.0.0.1:8001/v1")]


def _llm_overrides(role: str, backend: str | None, model: str | None, base_url: str | None) -> list[str]:
    chosen = {"backend": backend, "model": model, "base_url": base_url}
    return [f"creator.{role}.{key}={value}" for key, value in chosen.items() if value is not None]


@creator_app.command("build-data")
def build_data_command(
    dataset: Annotated[str, typer.Argument(help="Dataset folder or file (as data.path).")],
    out: Annotated[Path, typer.Option("--out", help="Output folder (resumed when it exists).")],
    overrides: Overrides = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Users to sample (0 = all).")] = None,
    verify: Annotated[bool, typer.Option("--verify", help="Also ask the LLM verifier.")] = False,
    backend: Annotated[
        str | None,
        typer.Option(
            "--backend", help="grounded (the item's own text, no LLM), local (transformers) or openai (HTTP)."
        ),
    ] = None,
    polish: Annotated[
        str | None,
        typer.Option("--polish", help="grounded: reword each title with this LLM backend (local or openai)."),
    ] = None,
    model: Model = None,
    base_url: BaseUrl = None,
    config: Config = None,
) -> None:
    """Profile users, title items for them, filter hallucinations: DIR/rows.parquet + report.json."""
    from hllm.creator.data.teacher import build_data

    flags = _llm_overrides("teacher", backend, model, base_url)
    flags += [f"creator.data.limit={limit}"] if limit is not None else []
    flags += ["creator.data.verify=true"] if verify else []
    flags += [f"creator.data.polish={polish}"] if polish is not None else []
    run = load_config(config, [f"data.path={dataset}", *flags, *(overrides or [])])
    report = build_data(run.data, run.creator.data, run.creator.teacher, out)
    Console().print(_build_table(report, out))


def _build_table(report: dict, out: Path) -> Table:
    table = Table(title=f"Creator data: {out}", show_header=False)
    table.add_row("teacher", f"{report['backend']} / {report['model']}")
    table.add_row("rows asked", str(report["rows"]))
    for stage, errors in report["failed"].items():
        table.add_row(f"{stage} failed", ", ".join(f"{e} ({n})" for e, n in errors.items()) or "0")
    table.add_row("titles kept", f"[bold]{report['kept']}[/bold]")
    table.add_row("rejected, by reason", ", ".join(f"{k} {v}" for k, v in report["rejected"].items()) or "0")
    table.add_row("seconds", f"{report['seconds']:g}")
    return table


@creator_app.command("judge")
def judge_command(
    rows: Annotated[Path, typer.Argument(help="rows.parquet from `hllm creator build-data` (kept rows).")],
    out: Annotated[Path, typer.Option("--out", help="Output folder (resumed when it exists).")],
    overrides: Overrides = None,
    original: Annotated[
        str, typer.Option("--original", help="Column of the original title.")
    ] = "original_title",
    candidate: Annotated[
        str, typer.Option("--candidate", help="Column of the title to judge.")
    ] = "personalised_title",
    limit: Annotated[int, typer.Option("--limit", help="First N rows (0 = all).")] = 0,
    backend: Backend = None,
    model: Model = None,
    base_url: BaseUrl = None,
    config: Config = None,
) -> None:
    """Good/Same/Bad of CANDIDATE vs ORIGINAL per user, asked in both orders; Adv = (G - B) / total."""
    from hllm.creator.data.judge import judge_titles

    run = load_config(config, [*_llm_overrides("judge", backend, model, base_url), *(overrides or [])])
    report = judge_titles(
        rows,
        out,
        run.creator.judge,
        original=original,
        candidate=candidate,
        limit=limit,
        chunk_rows=run.creator.data.chunk_rows,
    )
    table = Table(title=f"GSB: {candidate} vs {original} ({report['backend']} / {report['model']})")
    for name in ("good", "same", "bad", "total"):
        table.add_column(name.capitalize(), justify="right")
    table.add_column("Adv", justify="right")
    table.add_row(*(str(report[name]) for name in ("good", "same", "bad", "total")), f"{report['adv']:+.1%}")
    Console().print(table)
    Console().print(
        f"position bias (same letter both orders): {report['position_bias']}; "
        f"malformed: {report['malformed']}; identical titles: {report['identical']}"
    )


@creator_app.command("serve-llm")
def serve_llm_command(
    model: Annotated[
        str, typer.Option("--model", help="Preset, folder, .gguf file or hub id.")
    ] = "smollm2-135m",
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port")] = 8001,
    api_key_env: Annotated[
        str | None, typer.Option("--api-key-env", help="Require the key held in this environment variable.")
    ] = None,
    overrides: Overrides = None,
) -> None:
    """An OpenAI-compatible chat endpoint over a local model (POST /v1/chat/completions)."""
    from hllm.creator.data.llm import LocalChat
    from hllm.creator.data.llm_server import run_llm_server

    run = load_config(None, [f"creator.teacher.model={model}", *(overrides or [])])
    key = os.environ.get(api_key_env) if api_key_env else None
    if api_key_env and not key:
        raise UserError(f"${api_key_env} is not set", where="--api-key-env")
    typer.echo(f"serving {model} at http://{host}:{port}/v1")
    run_llm_server(LocalChat(run.creator.teacher), host=host, port=port, api_key=key)


@creator_app.command("train")
def train_command(
    config: Annotated[Path, typer.Argument(help="YAML config (see configs/creator-demo.yaml).")],
    overrides: Overrides = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint.")] = False,
) -> None:
    """Train the Creative LLM on build-data rows (kept rows of the training users); writes runs/NAME/."""
    from hllm.creator.model.training import fit_creator

    result = fit_creator(load_config(config, overrides), resume=resume)
    table = Table(title="Creator training", show_header=False)
    for key in ("steps", "epochs", "train_rows", "held_out_users", "trainable_params", "seconds"):
        table.add_row(key, str(result[key]))
    if result["valid_history"] and result["valid_history"][-1]:
        last = result["valid_history"][-1]
        table.add_row("held-out loss", "  ".join(f"{k} {v:.4f}" for k, v in last.items() if k != "epoch"))
    if selector := result.get("fact_selector"):
        table.add_row("fact selector = teacher", "  ".join(f"{k} {v:.4f}" for k, v in selector.items()))
    Console().print(table)


@creator_app.command("generate")
def generate_command(
    run_dir: Annotated[Path, typer.Argument(help="A run folder written by hllm creator train.")],
    user: Annotated[str, typer.Option("--user", help="A user id of the dataset.")],
    item: Annotated[str, typer.Option("--item", help="An item id of the catalogue.")],
    n: Annotated[int, typer.Option("--n", help="Titles to sample.")] = 3,
) -> None:
    """Personalised titles of ITEM for USER, beside the original title and the user's recent items."""
    from hllm.creator.infer.generation import personalise
    from hllm.creator.model.training import load_creator

    if n < 1:
        raise UserError(f"must be at least 1, got {n}", where="--n")
    result = personalise(load_creator(run_dir), user, item, n=n)
    console = Console()
    console.print(f"[bold]user {user}[/], most recent items:")
    for title in result["recent_history"]:
        console.print(f"  - {title}")
    table = Table(title=f"item {item}")
    table.add_column("")
    table.add_column("title")
    table.add_column("filter")
    if "angle" in result:
        console.print(f"facts the selector chose for this user: {result['angle']}")
    table.add_row("original", result["original_title"], "")
    for number, title in enumerate(result["titles"], 1):
        table.add_row(f"for user {number}", title["title"], ", ".join(title["reasons"]) or "kept")
    console.print(table)


@creator_app.command("infer")
def infer_command(
    run_dir: Annotated[Path, typer.Argument(help="A run folder written by hllm creator train.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder (resumed when it exists).")],
    items: Annotated[
        str | None,
        typer.Option("--items", help="Item ids to title, ID,ID,... (default: creator.infer.items)."),
    ] = None,
) -> None:
    """Cluster-level titles: embed every user, k-means, top-N clusters per item, one title per pair.

    Several processes: torchrun --nproc_per_node 4 -m hllm creator infer RUN --out DIR
    (with creator.infer.devices=4 in the run's config.yaml)."""
    from hllm.creator.infer.infer import start_infer

    report = start_infer(run_dir, out, items=items.split(",") if items else None)
    if report:
        table = Table(title=f"Creator inference: {out}", show_header=False)
        for key, value in report.items():
            table.add_row(key.replace("_", " "), str(value))
        Console().print(table)


@creator_app.command("lookup")
def lookup_command(
    infer_dir: Annotated[Path, typer.Argument(help="An output folder of hllm creator infer.")],
    user: Annotated[str, typer.Option("--user", help="A user id.")],
    item: Annotated[str, typer.Option("--item", help="An item id.")],
) -> None:
    """The title to show USER for ITEM: its cluster's title, or the original when there is none."""
    from hllm.creator.infer.infer import lookup_title

    title, source = lookup_title(infer_dir, user, item)
    typer.echo(f"{title}\t({source})")


@creator_app.command("evaluate")
def evaluate_command(
    run_dir: Annotated[Path, typer.Argument(help="A run folder written by hllm creator train.")],
    overrides: Overrides = None,
    out: Annotated[Path | None, typer.Option("--out", help="Output folder (default RUN/eval).")] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Held-out rows (0 = all).")] = None,
    gsb: Annotated[bool, typer.Option("--gsb", help="Also ask the judge LLM for Good/Same/Bad.")] = False,
    backend: Backend = None,
    model: Model = None,
    base_url: BaseUrl = None,
) -> None:
    """Creator titles for held-out users vs the original: hallucination rate, HLLM-as-judge wins and
    personalisation lift, with the random-user and no-user ablations (and GSB with --gsb)."""
    from hllm.creator.evaluate import evaluate_creator
    from hllm.creator.model.training import load_creator

    run = load_creator(run_dir)
    flags = load_config(None, [*_llm_overrides("judge", backend, model, base_url), *(overrides or [])])
    settings = run.config.creator.eval
    ask = gsb or settings.gsb
    result = evaluate_creator(
        run,
        out or Path(run_dir) / "eval",
        judge=flags.creator.judge if ask else None,
        limit=settings.limit if limit is None else limit,
        seed=settings.seed,
    )
    Console().print(evaluation_table(result))


def evaluation_table(result: dict) -> Table:
    from hllm.creator.evaluate import VARIANTS

    table = Table(title=f"Creator titles vs original, {result['rows']} held-out rows")
    table.add_column("metric", no_wrap=True)
    for variant in VARIANTS:
        table.add_column(variant.replace("_", " "), justify="right")
    for key in result[VARIANTS[0]]:
        values = [result[variant][key] for variant in VARIANTS]
        table.add_row(key.replace("_", " "), *map(_figure, values))
    if agreement := result.get("selector_agrees_with_teacher"):
        table.add_row("selector's facts = teacher's", *(_figure(agreement[v]) for v in VARIANTS))
    return table


def _figure(value: object) -> str:
    if isinstance(value, float):
        return f"{value:+.4f}"
    if isinstance(value, list):  # an interval
        return "[" + ", ".join(f"{v:+.4f}" for v in value) + "]"
    return str(value)


@creator_app.command("demo")
def demo_command(
    out: Annotated[Path, typer.Option("--out", help="Demo folder (resumed when it exists).")] = Path(
        "runs/creator-demo"
    ),
    limit: Annotated[int, typer.Option("--limit", help="amazon-scientific users given titles.")] = 700,
    show: Annotated[int, typer.Option("--show", help="Held-out users printed side by side.")] = 5,
    precision: Annotated[
        str,
        typer.Option(
            "--precision",
            help="Creator training: 32-true or bf16-mixed (for CPUs with native bf16: avx512_bf16 or AMX).",
        ),
    ] = "32-true",
) -> None:
    """The whole Creator path on amazon-scientific: build data, train, cluster, generate, evaluate."""
    import pandas as pd

    from hllm.creator.demo import run_creator_demo

    console = Console()
    precision = choice(precision, "--precision", ("32-true", "bf16-mixed"))
    result = run_creator_demo(out, limit=limit, console=console, precision=precision)
    console.print(evaluation_table(result))
    examples = pd.read_parquet(out / "eval" / "generated.parquet").head(show)
    table = Table(title="held-out users: the same item, titled with their embedding and a random user's")
    for column in ("user: recent items", "original title", "their title", "a random user's title"):
        table.add_column(column)
    for row in examples.itertuples():
        recent = "\n".join(row.history.splitlines()[-3:])
        table.add_row(f"{row.user_id}:\n{recent}", row.original_title, row.full, row.random_user)
    console.print(table)
    seconds = result["seconds"]
    console.print(
        "seconds: "
        + ", ".join(f"{k} {v:g}" for k, v in seconds.items())
        + f"; total {sum(seconds.values()):.0f}"
    )
