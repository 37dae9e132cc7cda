"""Bench records -> `report.md`: mean ± std tables per dataset and PNG plots (metrics, validation curves)."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from hllm.files import atomic_path, write_text  # noqa: E402

METRICS = ("recall@10", "ndcg@10", "recall@50", "ndcg@50", "mrr")
HEADLINE = ("recall@10", "ndcg@10")  # what the best HLLM is compared with the best ID baseline on
# The evaluator's target buckets (README: Protocols): new vs trained items, popularity by training
# count, history length. A bucket without users on a dataset is left out of its table and plot.
BUCKETS = ("new", "trained", "head", "torso", "tail", "hist_1_3", "hist_4_7", "hist_8_plus")
POPULARITY_BUCKETS = ("new", "head", "torso", "tail")


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def grouped(records: list[dict]) -> dict[str, dict[str, list[dict]]]:
    """dataset -> model -> records (one per seed), in first-seen order."""
    groups: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        groups[record["dataset"]][record["model"]].append(record)
    return groups


def results_table(models: dict[str, list[dict]], metric: str) -> str:
    header = f"| model | seeds | valid {metric} | " + " | ".join(METRICS) + " | train s (mean) |"
    lines = [header, "|" + "---|" * (len(METRICS) + 4)]
    for model, runs in models.items():
        cells = [mean_std([r["test"][m] for r in runs]) for m in METRICS]
        seconds = statistics.mean(r["train_seconds"] for r in runs)
        valid = mean_std([r["valid"][metric] for r in runs])
        lines.append(f"| {model} | {len(runs)} | {valid} | " + " | ".join(cells) + f" | {seconds:.0f} |")
    return "\n".join(lines)


def family(record: dict) -> str | None:
    """Which comparison a model's records enter: HLLM (reads item text; text+ID items included),
    the ID baselines, or none (popularity, and the diagnostic `hllm-id` that reads no text)."""
    kind = record["config"]["model"]["kind"]
    return {"hllm": "HLLM", "sasrec": "ID baseline", "hstu": "ID baseline"}.get(kind)


def text_only(record: dict) -> bool:
    """An HLLM whose items are their text alone (no item-ID table)."""
    model = record["config"]["model"]
    return family(record) == "HLLM" and not model.get("item", {}).get("id_embedding", False)


def best_lines(models: dict[str, list[dict]], metric: str) -> list[str]:
    """The best HLLM, the best text-only HLLM and the best ID baseline, each picked by mean
    validation `metric` over its seeds (never by test), and their test ratios to the baseline."""

    def best(admit: Callable[[dict], bool]) -> tuple[str, list[dict]] | None:
        candidates = [(model, runs) for model, runs in models.items() if admit(runs[0])]
        return max(candidates, key=lambda c: statistics.mean(r["valid"][metric] for r in c[1]), default=None)

    def ratios(ours: list[dict], theirs: list[dict]) -> list[float]:
        """Test recall@10 and ndcg@10 of `ours` over `theirs`, each a mean over seeds."""
        return [
            statistics.mean(r["test"][m] for r in ours) / statistics.mean(r["test"][m] for r in theirs)
            for m in HEADLINE
        ]

    hllm = best(lambda record: family(record) == "HLLM")
    baseline = best(lambda record: family(record) == "ID baseline")
    if hllm is None or baseline is None:
        return []
    gaps = [f"{m} {100 * (r - 1):+.0f}%" for m, r in zip(HEADLINE, ratios(hllm[1], baseline[1]))]
    lines = [
        f"Best of each family, chosen on mean valid {metric} (never on test): HLLM `{hllm[0]}`, "
        f"ID baseline `{baseline[0]}`; HLLM vs baseline on test: {', '.join(gaps)}."
    ]
    if (text := best(text_only)) is not None:
        recall, ndcg = ratios(text[1], baseline[1])
        lines.append(
            f"Best text-only HLLM (no item-ID table), chosen the same way: `{text[0]}`; on test "
            f"{recall:.2f}x the baseline's recall@10 and {ndcg:.2f}x its ndcg@10."
        )
    return [" ".join(lines), ""]


def tuning_lines(models: dict[str, list[dict]]) -> list[str]:
    """One line per tuned model: the setting every seed used, and how it was chosen."""
    lines = []
    for model, runs in models.items():
        if tuning := runs[0].get("tuning"):
            chosen = " ".join(tuning["chosen"]) or "recipe"
            trials = len(tuning["trials"])
            lines.append(f"- {model}: `{chosen}`, the best of {trials} settings on {tuning['selected_on']}")
    return ["Chosen on validation only (seed 0; every seed uses it):", "", *lines, ""] if lines else []


def trials_table(trials: list[dict], metric: str) -> list[str]:
    """Every tuning trial of one dataset (`tuning.json`), the losing settings included."""
    if not trials:
        return []
    lines = [f"| model | setting | valid {metric} | best epoch / run | train s |", "|---|---|---|---|---|"]
    for t in trials:
        history = t["valid_history"]
        best = max(history, key=lambda h: h[metric])["epoch"] if history else "-"
        setting = " ".join(t["overrides"]) or "recipe"
        lines.append(
            f"| {t['model']} | `{setting}` | {t['valid'][metric]:.4f} | {best} / {len(history)} | "
            f"{t['train_seconds']:.0f} |"
        )
    return ["Every tuning trial (seed 0):", "", *lines, ""]


def bucketed(models: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """The models whose every record carries bucket metrics (records written before the evaluator
    had buckets carry none: they are left out of the bucket table and plot, not shown as zeros)."""
    return {
        model: runs
        for model, runs in models.items()
        if all(any(key.endswith("/users") for key in r["test"]) for r in runs)
    }


def present_buckets(models: dict[str, list[dict]], names: tuple[str, ...] = BUCKETS) -> list[str]:
    """The buckets of `names` that hold test users in these records."""
    runs = [r for group in models.values() for r in group]
    return [b for b in names if any(r["test"].get(f"{b}/users", 0) > 0 for r in runs)]


def bucket_table(models: dict[str, list[dict]], metric: str = "recall@10") -> list[str]:
    """Test `metric` per target bucket per model (mean ± std over seeds), with each bucket's users."""
    models = bucketed(models)
    buckets = present_buckets(models)
    if not buckets:
        return []
    every_run = [r for group in models.values() for r in group]
    header = " | ".join(f"{b} ({max(r['test'].get(f'{b}/users', 0) for r in every_run):,})" for b in buckets)
    lines = [f"| model | {header} |", "|---|" + "---|" * len(buckets)]
    for model, runs in models.items():
        cells = [mean_std([r["test"].get(f"{b}/{metric}", 0.0) for r in runs]) for b in buckets]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return [f"Test {metric} per target bucket (users per bucket in brackets):", "", *lines, ""]


def plot_buckets(dataset: str, models: dict[str, list[dict]], path: Path) -> bool:
    """Test recall@10 per popularity bucket (and new items) per model; False when there are none."""
    models = bucketed(models)
    buckets = present_buckets(models, POPULARITY_BUCKETS)
    if not buckets:
        return False
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(buckets) * max(1, len(models)) / 3, 3.2))
    width = 0.8 / len(models)
    for offset, (model, runs) in enumerate(models.items()):
        means = [statistics.mean(r["test"].get(f"{b}/recall@10", 0.0) for r in runs) for b in buckets]
        ax.bar([i + offset * width for i in range(len(buckets))], means, width, label=model)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(buckets))], buckets)
    ax.set_ylabel("test recall@10")
    ax.set_title(f"{dataset}: recall@10 per target bucket")
    ax.legend(fontsize=7)
    _save(fig, path)
    return True


def plot_metrics(dataset: str, models: dict[str, list[dict]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(models), 3.2))
    width = 0.8 / 2
    for offset, metric in enumerate(("recall@10", "ndcg@10")):
        means = [statistics.mean(r["test"][metric] for r in runs) for runs in models.values()]
        errors = [
            statistics.stdev(r["test"][metric] for r in runs) if len(runs) > 1 else 0
            for runs in models.values()
        ]
        positions = [i + offset * width for i in range(len(models))]
        ax.bar(positions, means, width, yerr=errors, label=metric, capsize=3)
    ax.set_xticks([i + width / 2 for i in range(len(models))], list(models), rotation=20, ha="right")
    ax.set_title(f"{dataset}: test, full ranking")
    ax.legend()
    _save(fig, path)


def plot_curves(dataset: str, models: dict[str, list[dict]], metric: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for model, runs in models.items():
        history = runs[0]["valid_history"]
        if history:
            ax.plot([h["epoch"] for h in history], [h[metric] for h in history], marker="o", label=model)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"valid {metric}")
    ax.set_title(f"{dataset}: validation (seed 0)")
    if ax.get_lines():
        ax.legend(fontsize=7)
    _save(fig, path)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_report(records: list[dict], out: Path, *, metric: str = "ndcg@10") -> Path:
    """Tables and plots for every dataset in `records` (and the trials of `out/tuning.json`);
    returns the report's path."""
    tuning = out / "tuning.json"
    trials = json.loads(tuning.read_text()) if tuning.is_file() else []
    parts = [
        "# Benchmark report",
        "",
        "Test split, full ranking over every item, history masked; "
        "mean ± std over seeds. Protocol cards are in results.json.",
        "",
    ]
    for dataset, models in grouped(records).items():
        slug = Path(dataset).name
        plot_metrics(dataset, models, out / f"{slug}-metrics.png")
        plot_curves(dataset, models, metric, out / f"{slug}-valid.png")
        buckets = plot_buckets(dataset, models, out / f"{slug}-buckets.png")
        parts += [
            f"## {dataset}",
            "",
            results_table(models, metric),
            "",
            *best_lines(models, metric),
            *bucket_table(models),
            *tuning_lines(models),
            *trials_table([t for t in trials if t["dataset"] == dataset], metric),
            f"![test metrics]({slug}-metrics.png) ![validation]({slug}-valid.png)"
            + (f" ![buckets]({slug}-buckets.png)" if buckets else ""),
            "",
        ]
    write_text(out / "report.md", "\n".join(parts))
    return out / "report.md"


def write_markdown_section(path: Path, heading: str, body: str) -> None:
    """Replace (or append) the `heading` section of a Markdown file, leaving other sections alone."""
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmarks\n"
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == heading), None)
    if start is None:
        lines += ["", heading, "", body.rstrip()]
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines[start:end] = [heading, "", body.rstrip(), ""]
    write_text(path, "\n".join(lines).rstrip() + "\n")
