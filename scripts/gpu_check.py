"""The steps of scripts/gpu-check.sh (run that, not this): packed item encoding against padded, and a
short end-to-end fine-tune of an Item LLM with a catalogue-scale negative bank, with its tokens/s.

    python scripts/gpu_check.py parity BACKBONE DATA CACHE_DIR
    python scripts/gpu_check.py finetune OUT_DIR OVERRIDE...
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hllm.config import load_config
from hllm.data.dataset import prepare_dataset
from hllm.data.text import pack_items, tokenize_items
from hllm.models.backbone import load_backbone
from hllm.models.build import build_model
from hllm.models.item_encoder import ItemEncoder
from hllm.train import fit, make_batches

PARITY_ITEMS = 256  # catalogue items encoded both ways
MIN_COSINE = 0.999  # bf16: packed and padded differ by rounding only
DATA_FIELDS = "data.text_fields=[title,brand,categories,description]"


def parity(backbone_spec: str, data_path: str, cache_dir: str) -> None:
    """Encode the same items packed (flash-attention varlen on a GPU with flash-attn, one block-masked
    row otherwise) and padded, in bf16; print their agreement and the packed tokens/s; fail below
    MIN_COSINE."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backbone = load_backbone(backbone_spec)
    attention = backbone.model.config._attn_implementation
    print(f"parity: {backbone_spec} on {device}, attention {attention}, bf16 autocast")
    config = load_config(None, [f"data.path={data_path}", DATA_FIELDS, f"data.cache_dir={cache_dir}"])
    data = prepare_dataset(config.data)
    tokens = tokenize_items(list(data.item_text[1 : PARITY_ITEMS + 1]), backbone.tokenizer, 64)
    encoder = ItemEncoder(backbone, pooling="token").to(device).eval()
    packed = pack_items(tokens, np.arange(len(tokens)), appended_tokens=encoder.appended_tokens).to(device)
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        encoder(packed)  # warm-up
        _sync(device)
        started = time.perf_counter()
        fast = encoder(packed).float()
        _sync(device)
        seconds = time.perf_counter() - started
        encoder.layout = "padded"
        padded = encoder(packed).float()
    cosine = torch.nn.functional.cosine_similarity(fast, padded, dim=-1)
    print(
        f"parity: {len(tokens)} items, {len(packed.input_ids)} tokens; packed vs padded cosine "
        f"min {cosine.min():.5f} mean {cosine.mean():.5f}, max |diff| {(fast - padded).abs().max():.4f}; "
        f"packed {len(packed.input_ids) / seconds:,.0f} tokens/s"
    )
    if cosine.min() < MIN_COSINE:
        sys.exit(f"parity FAILED: packed and padded item embeddings differ (cosine < {MIN_COSINE})")


def finetune(out_dir: str, overrides: list[str]) -> None:
    """Train as `overrides` say, then print the validation metrics and the Item LLM's training tokens/s."""
    config = load_config(None, [f"out_dir={out_dir}", "name=finetune", *overrides])
    result = fit(config)
    seconds, steps = result["train"]["seconds"], result["train"]["steps"]
    data = prepare_dataset(config.data)
    model, tokens = build_model(config, data)
    batches = make_batches(config, data, model, tokens)
    per_step = config.train.accumulate
    trained = sum(len(batches[i].text.input_ids) for i in range(min(steps * per_step, len(batches))))
    metric = config.eval.metric
    summary = {
        "valid": {metric: result["valid"][metric], "recall@10": result["valid"].get("recall@10")},
        "steps": steps,
        "train_seconds": seconds,
        "item_tokens_per_s": round(trained / seconds),
        "negatives_per_step": config.train.num_negatives,
    }
    print("finetune:", json.dumps(summary))
    (Path(out_dir) / "gpu-check.json").write_text(json.dumps(summary, indent=1) + "\n")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    match sys.argv[1:]:
        case ["parity", backbone, data_path, cache_dir]:
            parity(backbone, data_path, cache_dir)
        case ["finetune", out_dir, *overrides]:
            finetune(out_dir, overrides)
        case _:
            sys.exit(__doc__)
