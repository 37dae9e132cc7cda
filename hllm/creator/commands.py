"""`hllm creator ...`: the Creator data pipeline, the GSB judge and a local OpenAI-compatible server."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

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
    backend: Backend = None,
    model: Model = None,
    base_url: BaseUrl = None,
    config: Config = None,
) -> None:
    """Profile users, rewrite titles for them, filter hallucinations: DIR/rows.parquet + report.json."""
    from hllm.creator.teacher import build_data

    flags = _llm_overrides("teacher", backend, model, base_url)
    flags += [f"creator.data.limit={limit}"] if limit is not None else []
    flags += ["creator.data.verify=true"] if verify else []
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
    from hllm.creator.judge import judge_titles

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
    from hllm.creator.llm import LocalChat
    from hllm.creator.llm_server import run_llm_server

    run = load_config(None, [f"creator.teacher.model={model}", *(overrides or [])])
    key = os.environ.get(api_key_env) if api_key_env else None
    if api_key_env and not key:
        raise UserError(f"${api_key_env} is not set", where="--api-key-env")
    typer.echo(f"serving {model} at http://{host}:{port}/v1")
    run_llm_server(LocalChat(run.creator.teacher), host=host, port=port, api_key=key)
