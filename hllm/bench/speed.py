"""`hllm bench speed`: what the Item LLM costs on real item text, measured on this machine.

- Item encoding: packed rows vs one item per row padded to the batch's longest item vs padded to
  the cap, in fp32 and bf16, per text cap, on random batches of catalogue items (as training draws
  them), with the padding ratio (padded-to-longest item_tokens / real item_tokens) that bounds what packing
  can gain.
- A training step per item-side mode, with and without gradient checkpointing: sequences/s, the
  time spent building the batch, peak RSS (each setting in a fresh process), and MFU: the step's
  FLOPs (counted by `torch.utils.flop_counter`) per second over the FLOP/s of a large GEMM in the
  same dtype, measured in the same run.
- Evaluation: catalogue items encoded per second and users ranked per second over all items.

Results go to OUT/speed.json (finished measurements are kept, so an interrupted run resumes) and
to the "## Speed" section of BENCHMARKS.md.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from hllm.bench.report import write_markdown_section
from hllm.bench.speed_report import LAYOUTS, speed_section, summarise
from hllm.config import load_config
from hllm.data.dataset import SequenceData, prepare_dataset
from hllm.data.text import ItemTokens, pack_items, tokenize_items
from hllm.evaluate import item_table, rank_users
from hllm.files import write_json
from hllm.models.backbone import load_backbone
from hllm.models.item_encoder import ItemEncoder

HEADING = "## Speed"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# CPU attention runs as one fused op that flop_counter has no formula for; count it like the fused
# GPU kernels (two matmuls forward, five backward), over the whole masked row as the kernel does.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward_flops,
}


@dataclass(frozen=True)
class SpeedSettings:
    dataset: str = "../shared/data/amazon-scientific"
    backbones: tuple[str, ...] = ("minilm", "smollm2-135m")
    caps: tuple[int, ...] = (64, 256, 512)
    dtypes: tuple[str, ...] = ("fp32", "bf16")
    modes: tuple[str, ...] = ("finetune", "lora", "frozen")
    batch_items: int = 32  # items per encoding batch
    seconds: float = 4.0  # per encoding (at least two batches) and matmul-peak measurement
    train_cap: int = 64  # the default data.max_text_tokens
    train_batch: int = 8  # sequences per training step
    train_negatives: int = 64
    train_steps: int = 3  # timed steps, after one warm-up step
    user_backbone: str = "small-llama"
    gemm_size: int = 2048  # the square matmul whose FLOP/s is the MFU peak
    fresh_process: bool = True  # each training setting in its own process, for its peak RSS


def quick_settings(dataset: str) -> SpeedSettings:
    """A smoke run on tiny random models: every code path, seconds of work."""
    return SpeedSettings(
        dataset=dataset,
        backbones=("tiny-bert",),
        caps=(16, 32),
        dtypes=("fp32", "bf16"),
        modes=("finetune", "frozen"),
        batch_items=8,
        seconds=0.05,
        train_cap=16,
        train_batch=4,
        train_negatives=8,
        train_steps=1,
        user_backbone="tiny-llama",
        gemm_size=256,  # a 2048 bf16 GEMM takes minutes on a CPU without native bf16
        fresh_process=False,  # a spawned process spends far longer importing than measuring
    )


def count_flops(run) -> int:
    """FLOPs of the matmuls and attention `run()` executes."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        run()
    return counter.get_total_flops()


def gemm_peak(dtype: torch.dtype, size: int, seconds: float) -> float:
    """FLOP/s of a large square matmul in `dtype`: the practical peak MFU is measured against."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    a @ b  # warm-up
    runs, start = 0, time.perf_counter()
    while runs < 3 or time.perf_counter() - start < seconds:
        a @ b
        runs += 1
    return 2 * size**3 * runs / (time.perf_counter() - start)


def random_batches(num_items: int, batch_items: int, count: int, seed: int) -> list[np.ndarray]:
    """`count` batches of distinct real item ids (1..num_items-1) drawn uniformly."""
    rng = np.random.default_rng(seed)
    return [rng.choice(np.arange(1, num_items), size=batch_items, replace=False) for _ in range(count)]


def padding_ratio(item_tokens: ItemTokens, batches: list[np.ndarray], appended_tokens: int) -> float:
    """Tokens of the batches padded to their longest item / their real tokens."""
    padded = real = 0
    for ids in batches:
        lengths = item_tokens.lengths[ids] + appended_tokens
        padded += int(lengths.max()) * len(ids)
        real += int(lengths.sum())
    return padded / real


@torch.no_grad()
def time_encoding(
    encoder: ItemEncoder, item_tokens: ItemTokens, batches: list[np.ndarray], seconds: float
) -> dict[str, float]:
    """Encode the batches in order (one warm-up) until `seconds` pass; real items and tokens/s."""
    encoder(pack_items(item_tokens, batches[0], appended_tokens=encoder.appended_tokens))
    items = real = 0
    start = time.perf_counter()
    for count, ids in enumerate(batches[1:], 1):
        packed = pack_items(item_tokens, ids, appended_tokens=encoder.appended_tokens)
        encoder(packed)
        items, real = items + len(ids), real + int(packed.lengths.sum())
        elapsed = time.perf_counter() - start
        if count >= 2 and elapsed >= seconds:
            break
    return {"items_per_s": items / elapsed, "tokens_per_s": real / elapsed, "batches": count}


def bench_encoding(settings: SpeedSettings, texts: list[str], backbone: str, done: set) -> list[dict]:
    """Every (dtype, cap, layout) of one backbone not in `done`."""
    records = []
    tokenized: dict[int, ItemTokens] = {}  # per cap: the tokens do not depend on the dtype
    for dtype in settings.dtypes:
        loaded = load_backbone(backbone, dtype=DTYPES[dtype])
        encoder = ItemEncoder(loaded, pooling="mean").eval()
        for cap in settings.caps:
            if cap not in tokenized:
                tokenized[cap] = tokenize_items(texts, loaded.tokenizer, cap)
            item_tokens = tokenized[cap]
            batches = random_batches(len(item_tokens), settings.batch_items, 64, seed=cap)
            ratio = padding_ratio(item_tokens, batches, encoder.appended_tokens)
            for layout in LAYOUTS:
                key = ("encode", backbone, dtype, cap, layout)
                if key in done:
                    continue
                encoder.layout = "packed" if layout == "packed" else "padded"
                encoder.pad_width = cap + encoder.appended_tokens if layout == "padded_max" else 0
                measured = time_encoding(encoder, item_tokens, batches, settings.seconds)
                records.append(
                    {
                        "kind": "encode",
                        "backbone": backbone,
                        "dtype": dtype,
                        "cap": cap,
                        "layout": layout,
                        "batch_items": settings.batch_items,
                        "padding_ratio": ratio,
                        **measured,
                    }
                )
                print(json.dumps(records[-1]), flush=True)
    return records


def _train_config(settings: SpeedSettings, backbone: str, mode: str, checkpointing: bool):
    return load_config(
        None,
        [
            f"data.path={settings.dataset}",
            f"data.max_text_tokens={settings.train_cap}",
            f"model.item.backbone={backbone}",
            f"model.item.mode={mode}",
            f"model.user.backbone={settings.user_backbone}",
            f"train.batch_size={settings.train_batch}",
            f"train.num_negatives={settings.train_negatives}",
            f"train.gradient_checkpointing={checkpointing}",
        ],
    )


def peak_rss_mb() -> float:
    """This process's peak resident memory. Not getrusage's ru_maxrss: Linux carries that across
    fork and exec, so a spawned child would report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def train_step_worker(settings: SpeedSettings, backbone: str, mode: str, checkpointing: bool) -> dict:
    """Time `train_steps` optimizer steps (after a warm-up) in this fresh process; count their FLOPs
    (without checkpointing: recomputation is not model work) and report the process's peak RSS."""
    from hllm.models.build import build_model
    from hllm.train import make_batches, make_optimizer

    torch.manual_seed(0)
    config = _train_config(settings, backbone, mode, checkpointing)
    data = prepare_dataset(config.data)
    model, item_tokens = build_model(config, data)
    if model.frozen_items:
        # The frozen step reads a cached catalogue table; its values do not change the step's cost,
        # so a random table of the right shape stands in for encoding the whole catalogue here.
        model.cache_items(torch.randn(data.num_items, model.item_encoder.hidden_size))
    batches = make_batches(config, data, model, item_tokens)
    optimizer = make_optimizer(model, config)
    model.train()

    def step(index: int) -> None:
        model.training_loss(batches[index]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(0)
    indices = range(1, 1 + settings.train_steps)
    data_s = step_s = 0.0
    for index in indices:
        start = time.perf_counter()
        batch = batches[index]
        loaded = time.perf_counter()
        model.training_loss(batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        data_s, step_s = data_s + loaded - start, step_s + time.perf_counter() - loaded
    result = {
        "step_s": step_s / len(indices),
        "data_s": data_s / len(indices),
        "sequences_per_s": settings.train_batch * len(indices) / step_s,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "peak_rss_mb": peak_rss_mb(),
    }
    if not checkpointing:
        flops = [count_flops(lambda i=i: model.training_loss(batches[i]).backward()) for i in indices]
        result["flops_per_step"] = sum(flops) / len(flops)
    return result


def bench_training(settings: SpeedSettings, backbone: str, done: set) -> list[dict]:
    records = []
    for mode in settings.modes:
        for checkpointing in (False, True):
            key = ("train", backbone, mode, checkpointing)
            if key in done or (mode == "frozen" and checkpointing):
                continue  # a frozen item side runs no Item LLM in the step: nothing to checkpoint
            args = (settings, backbone, mode, checkpointing)
            if settings.fresh_process:
                with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
                    measured = pool.submit(train_step_worker, *args).result()
            else:
                measured = train_step_worker(*args)
            records.append(
                {
                    "kind": "train",
                    "backbone": backbone,
                    "mode": mode,
                    "checkpointing": checkpointing,
                    "cap": settings.train_cap,
                    "batch": settings.train_batch,
                    "negatives": settings.train_negatives,
                    **measured,
                }
            )
            print(json.dumps(records[-1]), flush=True)
    return records


def bench_eval(settings: SpeedSettings, data: SequenceData, backbone: str, *, full: bool) -> dict:
    """Items encoded per second in evaluation order (the whole catalogue when `full`, else about
    `seconds` worth); with `full`, also users ranked per second against that table."""
    from hllm.models.build import build_model

    config = _train_config(settings, backbone, "finetune", False)
    model, item_tokens = build_model(config, data)
    model.eval()
    size = config.eval.item_batch_size
    count = data.num_items
    if not full:
        start = time.perf_counter()
        item_table(model, min(size, count), item_tokens, batch_size=size)  # how long one chunk takes
        per_chunk = time.perf_counter() - start
        count = min(count, size * max(1, round(settings.seconds / per_chunk)))
    start = time.perf_counter()
    table = item_table(model, count, item_tokens, batch_size=size)
    record = {"kind": "eval", "backbone": backbone, "cap": settings.train_cap, "items": count}
    record["items_per_s"] = count / (time.perf_counter() - start)
    if full:
        start = time.perf_counter()
        rank_users(model, data, table, "valid", batch_size=config.eval.batch_size, max_history=50)
        record["users_per_s"] = data.num_users / (time.perf_counter() - start)
        record["users"] = data.num_users
    print(json.dumps(record), flush=True)
    return record


def record_key(record: dict) -> tuple:
    match record["kind"]:
        case "peak":
            return ("peak", record["dtype"])
        case "encode":
            return ("encode", record["backbone"], record["dtype"], record["cap"], record["layout"])
        case "train":
            return ("train", record["backbone"], record["mode"], record["checkpointing"])
        case "eval":
            return ("eval", record["backbone"])
    raise ValueError(record["kind"])


def run_speed(settings: SpeedSettings, out: Path, *, report: Path | None, command: str) -> dict:
    """Measure what OUT/speed.json lacks, then rewrite it and the report section."""
    path = out / "speed.json"
    saved = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    records: list[dict] = saved.get("records", [])

    def keep(new: list[dict]) -> None:
        records.extend(new)
        write_json(path, summarise(records, settings, command))

    done = {record_key(r) for r in records}
    for dtype in settings.dtypes:
        if ("peak", dtype) not in done:
            peak = gemm_peak(DTYPES[dtype], settings.gemm_size, settings.seconds)
            keep([{"kind": "peak", "dtype": dtype, "flops_per_s": peak}])
    data = prepare_dataset(load_config(None, [f"data.path={settings.dataset}"]).data)
    texts = list(data.item_text)
    for number, backbone in enumerate(settings.backbones):
        keep(bench_encoding(settings, texts, backbone, done))
        keep(bench_training(settings, backbone, done))
        if ("eval", backbone) not in done:
            keep([bench_eval(settings, data, backbone, full=number == 0)])
    summary = summarise(records, settings, command)
    write_json(path, summary)
    if report is not None:
        write_markdown_section(report, HEADING, speed_section(summary))
    return summary
