"""speed.json's summary (the headline figures above every record) and the Markdown tables of
BENCHMARKS.md's Speed section, from the records `hllm bench speed` measured."""

from __future__ import annotations

import os
import platform
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # speed.py imports this module
    from hllm.bench.speed import SpeedSettings

LAYOUTS = ("packed", "padded_longest", "padded_max")


def summarise(records: list[dict], settings: SpeedSettings, command: str) -> dict:
    """speed.json: the headline figures (first backbone, fp32, largest cap) above every record."""
    peaks = {r["dtype"]: r["flops_per_s"] for r in records if r["kind"] == "peak"}
    counted = {(r["backbone"], r["mode"]): r["flops_per_step"] for r in records if "flops_per_step" in r}
    for r in records:
        flops = counted.get((r.get("backbone"), r.get("mode")))
        if r["kind"] == "train" and flops is not None and "fp32" in peaks:
            r["model_flops_per_step"] = flops  # checkpointing recomputes, but adds no model work
            r["mfu"] = flops / r["step_s"] / peaks["fp32"]
    headline = settings.backbones[0]
    headline_setting = (headline, "fp32", max(settings.caps))
    encode = {
        r["layout"]: r
        for r in records
        if r["kind"] == "encode" and (r["backbone"], r["dtype"], r["cap"]) == headline_setting
    }
    item_encoding = {}
    if encode:
        item_encoding = {f"{layout}_tokens_per_s": r["tokens_per_s"] for layout, r in encode.items()}
        item_encoding["padding_ratio"] = next(iter(encode.values()))["padding_ratio"]
        item_encoding |= {"backbone": headline, "dtype": "fp32", "cap": max(settings.caps)}
    train_step: dict[str, dict] = {}
    for r in records:
        if r["kind"] == "train" and r["backbone"] == headline:
            figures = {k: r[k] for k in ("sequences_per_s", "peak_rss_mb", "mfu") if k in r}
            entry = train_step.setdefault(r["mode"], {})
            if r["checkpointing"]:
                entry["checkpointing"] = figures
            else:
                entry |= figures
    return {
        "machine": machine(),
        "command": command,
        "settings": asdict(settings),
        "gemm_peak_flops_per_s": peaks,
        "item_encoding": item_encoding,
        "train_step": train_step,
        "records": records,
    }


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text().split() if cpuinfo.is_file() else []
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
    }


def speed_section(summary: dict) -> str:
    """The Markdown tables of speed.json, with the command and machine that produced them."""
    records = summary["records"]
    m = summary["machine"]
    peaks = summary["gemm_peak_flops_per_s"]
    size = summary["settings"]["gemm_size"]
    lines = [
        f"On {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), torch {m['torch']}, "
        f"avx512_bf16 {'yes' if m['avx512_bf16'] else 'no'}, from:",
        "",
        f"    {summary['command']}",
        "",
        f"Matmul peak (a {size}x{size} GEMM, same run): "
        + ", ".join(f"{dtype} {flops / 1e9:.0f} GFLOP/s" for dtype, flops in peaks.items())
        + ".",
        "",
        f"**Item encoding** (eval mode, random batches of {summary['settings']['batch_items']} catalogue "
        "items; tokens/s counts real tokens only; padding ratio = tokens padded to the batch's longest "
        "item / real tokens):",
        "",
        "| Item LLM | dtype | cap | padding ratio | packed tok/s | padded-longest tok/s | "
        "padded-max tok/s | packed / longest | packed items/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    encode: dict[tuple, dict[str, dict]] = {}
    for r in records:
        if r["kind"] == "encode":
            encode.setdefault((r["backbone"], r["dtype"], r["cap"]), {})[r["layout"]] = r
    for (backbone, dtype, cap), by_layout in encode.items():
        if set(by_layout) != set(LAYOUTS):
            continue
        packed, longest, most = (by_layout[layout] for layout in LAYOUTS)
        lines.append(
            f"| {backbone} | {dtype} | {cap} | {packed['padding_ratio']:.2f} | "
            f"{packed['tokens_per_s']:,.0f} | {longest['tokens_per_s']:,.0f} | {most['tokens_per_s']:,.0f} | "
            f"{packed['tokens_per_s'] / longest['tokens_per_s']:.2f}x | {packed['items_per_s']:.1f} |"
        )
    settings = summary["settings"]
    lines += [
        "",
        f"**Training step** (fp32, {settings['train_batch']} sequences, {settings['train_negatives']} "
        f"sampled negatives, cap {settings['train_cap']}, User LLM {settings['user_backbone']}; each "
        "setting in a fresh process; MFU = counted model FLOPs per second / fp32 matmul peak):",
        "",
        "| Item LLM | mode | checkpointing | sequences/s | step s | batch build ms | peak RSS MB | "
        "GFLOP/step | MFU |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        if r["kind"] == "train":
            flops = r.get("model_flops_per_step", float("nan"))
            lines.append(
                f"| {r['backbone']} | {r['mode']} | {'yes' if r['checkpointing'] else 'no'} | "
                f"{r['sequences_per_s']:.2f} | {r['step_s']:.2f} | {1000 * r['data_s']:.1f} | "
                f"{r['peak_rss_mb']:,.0f} | {flops / 1e9:,.1f} | {100 * r.get('mfu', float('nan')):.1f}% |"
            )
    lines += [
        "",
        "**Evaluation** (item table in chunks of the eval batch, then full-catalogue ranking of the "
        "validation users):",
        "",
        "| Item LLM | cap | items encoded | items/s | users ranked/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in records:
        if r["kind"] == "eval":
            users = f"{r['users_per_s']:,.0f}" if "users_per_s" in r else "(same User LLM)"
            lines.append(
                f"| {r['backbone']} | {r['cap']} | {r['items']:,} | {r['items_per_s']:,.1f} | {users} |"
            )
    return "\n".join(lines) + "\n"
