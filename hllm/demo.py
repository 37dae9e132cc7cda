"""`hllm demo`: bundled ml-100k -> train a small HLLM (pretrained MiniLM Item LLM) -> compare with
popularity under the same evaluator -> show recommendations for one user. Offline, minutes on a CPU.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from hllm.config import load_config
from hllm.data.batches import training_items
from hllm.data.dataset import prepare_dataset
from hllm.evaluate import evaluate_split, item_table, recommend_items
from hllm.files import write_json
from hllm.models.popularity import Popularity
from hllm.runs import Run, load_run, run_folder
from hllm.train import fit

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
SHOWN_METRICS = ("recall@10", "ndcg@10", "recall@50", "ndcg@50", "mrr")


def comparison_table(hllm: dict, popularity: dict) -> Table:
    table = Table(title="ml-100k test split, full ranking, history masked")
    for column in ("metric", "HLLM", "popularity"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for name in SHOWN_METRICS:
        table.add_row(name, f"{hllm[name]:.4f}", f"{popularity[name]:.4f}")
    ratio = hllm["recall@10"] / max(popularity["recall@10"], 1e-12)
    table.caption = f"HLLM / popularity recall@10 = {ratio:.2f}x"
    return table


def run_demo(
    config_path: Path = DEMO_CONFIG,
    overrides: list[str] | None = None,
    console: Console | None = None,
) -> dict:
    console = console or Console()
    config = load_config(config_path, overrides)
    bundled = Path(config_path).resolve().parent.parent / config.data.path
    if not Path(config.data.path).exists() and bundled.exists():  # run from outside the checkout
        config.data.path = str(bundled)
    data = prepare_dataset(config.data)
    console.print(
        f"[bold]dataset[/] {data.name}: {data.num_users} users, {data.num_items - 1} items, "
        f"{len(data.items)} interactions"
    )
    result = fit(config, resume=True)
    popularity = Popularity(training_items(data), data.num_items)
    result["popularity"] = evaluate_split(config, popularity, data, None, "test")
    write_json(run_folder(config) / "metrics.json", result)
    console.print(comparison_table(result["test"], result["popularity"]))
    show_recommendations(load_run(run_folder(config)), user="1", console=console)
    console.print(
        f"train time {result['train']['seconds']:.0f} s; "
        f"run folder {run_folder(config)} (try: hllm recommend {run_folder(config)} --user 1)"
    )
    return result


def show_recommendations(
    run: Run,
    *,
    user: str | None = None,
    items: list[str] | None = None,
    k: int = 10,
    console: Console,
) -> None:
    """Print the top-k items for a dataset user (their whole sequence) or a given history."""
    if user is not None:
        history = run.data.sequence(run.data.user_index(user)).tolist()
        who = f"user {user}"
    else:
        history = [run.data.item_index(raw.strip()) for raw in items or []]
        who = "the given history"
    table = item_table(
        run.model, run.data.num_items, run.item_tokens, batch_size=run.config.eval.item_batch_size
    )
    ids, scores = recommend_items(run.model, table, history, k=k, max_history=run.config.data.max_history)
    recent = "; ".join(run.data.item_titles[i] for i in history[-5:])
    console.print(f"{who}: {len(history)} items, the most recent: {recent}")
    out = Table(title=f"top {k} for {who}")
    for column, justify in (
        ("#", "right"),
        ("item", "left"),
        ("title", "left"),
        ("score", "right"),
    ):
        out.add_column(column, justify=justify)
    for rank, (item, score) in enumerate(zip(ids, scores), 1):
        out.add_row(str(rank), str(run.data.item_ids[item]), run.data.item_titles[item], f"{score:.3f}")
    console.print(out)
