"""`hllm bench`: the model suite (the default command) and its sub-benchmarks (serve, replay, speed).
Each command makes one call into the bench modules, imported when it runs."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from hllm.cli_options import Overrides, choice, names, numbers
from hllm.config import ItemConfig
from hllm.config_fields import choices
from hllm.serve_config import ServeConfig

bench_app = typer.Typer(
    invoke_without_command=True, help="Benchmarks: the model suite (default) and its sub-benchmarks."
)


@bench_app.callback()
def bench(
    ctx: typer.Context,
    datasets: Annotated[
        str, typer.Option(help="Comma-separated names (ml-100k, amazon-scientific, ...) or paths.")
    ] = "ml-100k",
    models: Annotated[
        str, typer.Option(help="Comma-separated recipe names: configs/bench/NAME.yaml.")
    ] = "popularity,hllm-minilm-frozen",
    seeds: Annotated[
        int,
        typer.Option(
            help="Seeds per (dataset, model); one for popularity and text-knn, which train nothing."
        ),
    ] = 3,
    protocol: Annotated[
        str,
        typer.Option(
            help="leave-one-out, new-items (data.cold_items=0.1) or temporal (data.split=temporal)."
        ),
    ] = "leave-one-out",
    out: Annotated[
        Path | None,
        typer.Option(
            help="Folder for results.json, report.md, plots and runs [benchmarks, or benchmarks/PROTOCOL]."
        ),
    ] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Smoke run: tiny models, 3 steps.")] = False,
    grid_size: Annotated[
        int | None,
        typer.Option(
            min=1, help="Tune every model on the first N settings of its grid (1 = the recipe) [all]."
        ),
    ] = None,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Extra a.b=value for every run.")
    ] = None,
) -> None:
    """Train and score every (dataset, model, seed) not yet in OUT/results.json; write the report."""
    if ctx.invoked_subcommand is not None:
        return
    from hllm.bench.report import write_report
    from hllm.bench.run import PROTOCOLS, run_bench

    choice(protocol, "--protocol", tuple(PROTOCOLS))
    out = out or (Path("benchmarks") if protocol == "leave-one-out" else Path("benchmarks") / protocol)
    records = run_bench(
        datasets.split(","),
        models.split(","),
        seeds,
        out,
        quick=quick,
        extra=overrides,
        protocol=protocol,
        grid_size=grid_size,
    )
    typer.echo(f"{len(records)} records in {out / 'results.json'}; report: {write_report(records, out)}")


@bench_app.command("serve")
def bench_serve(
    artifact: Annotated[Path, typer.Argument(help="An artifact written by hllm export.")],
    overrides: Overrides = None,
    beside: Annotated[
        list[Path] | None,
        typer.Option(help="Another artifact served beside the first, every size and variant; repeatable."),
    ] = None,
    sizes: Annotated[
        str, typer.Option(help="Catalogue sizes (real + synthetic items).")
    ] = "10000,100000,1000000",
    kinds: Annotated[str, typer.Option(help="Index kinds: exact, hnsw, hnsw-sq8, ivf, pq.")] = "exact,ivf",
    clients: Annotated[str, typer.Option(help="Concurrent HTTP clients per level.")] = "1,8,16",
    seconds: Annotated[float, typer.Option(help="Measured seconds per level.")] = 10.0,
    out: Annotated[Path, typer.Option(help="Scratch catalogues and serve.json.")] = Path("benchmarks/serve"),
    report: Annotated[Path, typer.Option(help="Markdown file whose Serving section is rewritten.")] = Path(
        "BENCHMARKS.md"
    ),
    variant: Annotated[
        list[str] | None,
        typer.Option(
            help="Compare servers: serve.* overrides of one, space-separated; repeat the option. A first "
            "word NAME: limits it to the artifact in folder NAME."
        ),
    ] = None,
    rounds: Annotated[int, typer.Option(help="Turns per level when comparing variants.")] = 1,
) -> None:
    """Load-test the real server on 127.0.0.1: latency percentiles and throughput per catalogue size."""
    from hllm.bench.serve import bench_serve as run

    command = " ".join(["hllm", *sys.argv[1:]])
    kwargs = dict(
        kinds=list(names(kinds, "--kinds", allowed=choices(ServeConfig, "index"))),
        clients=list(numbers(clients, "--clients")),
        seconds=seconds,
        report=report,
        variants=[v.split() for v in variant or [""]],
        rounds=rounds,
    )
    sizes_list = list(numbers(sizes, "--sizes"))
    records = run(
        [artifact, *(beside or [])],
        out,
        sizes=sizes_list,
        **kwargs,
        overrides=overrides or [],
        command=command,
    )
    typer.echo(f"{len(records)} measurements in {out / 'serve.json'}; table in {report}")


@bench_app.command("replay")
def bench_replay(
    run: Annotated[Path, typer.Argument(help="A run folder trained with data.cold_items > 0.")],
    out: Annotated[Path, typer.Option(help="New folder: artifact, served copies, replay.json.")] = Path(
        "benchmarks/new-items/replay"
    ),
    kinds: Annotated[str, typer.Option(help="Index kinds: exact, hnsw, hnsw-sq8, ivf, pq.")] = "exact,hnsw",
) -> None:
    """Online equals offline: serve RUN without its new items, add them via POST /items, replay the
    test users via POST /recommend, compare with the offline metrics."""
    from hllm.bench.replay import replay_run

    indexes = names(kinds, "--kinds", allowed=choices(ServeConfig, "index"))
    result = replay_run(run, out, indexes=indexes)
    diffs = ", ".join(f"{kind} {result[kind]['max_abs_diff']:.2e}" for kind in indexes)
    typer.echo(f"max |served - offline| over recall/ndcg: {diffs}; details in {out / 'replay.json'}")


@bench_app.command("speed")
def bench_speed(
    dataset: Annotated[str, typer.Option(help="Dataset whose item text is encoded.")] = (
        "../shared/data/amazon-scientific"
    ),
    backbones: Annotated[str, typer.Option(help="Item LLMs (the first is speed.json's headline).")] = (
        "minilm,smollm2-135m"
    ),
    caps: Annotated[str, typer.Option(help="Item text caps in tokens.")] = "64,256,512",
    dtypes: Annotated[str, typer.Option(help="Encoding dtypes: fp32, bf16.")] = "fp32,bf16",
    modes: Annotated[str, typer.Option(help="Item-side modes of the training step.")] = (
        "finetune,lora,frozen"
    ),
    seconds: Annotated[float, typer.Option(help="Seconds per encoding measurement.")] = 4.0,
    train_steps: Annotated[int, typer.Option(help="Timed training steps per setting.")] = 3,
    out: Annotated[Path, typer.Option(help="Folder of speed.json (finished rows are kept).")] = Path(
        "benchmarks"
    ),
    report: Annotated[Path, typer.Option(help="Markdown file whose Speed section is rewritten.")] = Path(
        "BENCHMARKS.md"
    ),
    quick: Annotated[bool, typer.Option("--quick", help="Smoke run on tiny random models.")] = False,
) -> None:
    """Item encoding (packed vs padded), training step (per mode, MFU) and evaluation throughput."""
    from hllm.bench.speed import DTYPES, SpeedSettings, quick_settings, run_speed

    settings = SpeedSettings(
        dataset=dataset,
        backbones=names(backbones, "--backbones"),
        caps=numbers(caps, "--caps"),
        dtypes=names(dtypes, "--dtypes", allowed=tuple(DTYPES)),
        modes=names(modes, "--modes", allowed=choices(ItemConfig, "mode")),
        seconds=seconds,
        train_steps=train_steps,
    )
    if quick:
        settings = quick_settings(dataset)
    command = " ".join(["hllm", *sys.argv[1:]])
    summary = run_speed(settings, out, report=report, command=command)
    typer.echo(f"{len(summary['records'])} measurements in {out / 'speed.json'}; tables in {report}")
