#!/usr/bin/env bash
# Prepared GPU check (issue 18), under 8 minutes on one large GPU, from the repository root:
#   1. packed item encoding (flash-attention varlen when flash-attn is installed) equals padded, in bf16;
#   2. a short end-to-end fine-tune of SmolLM2-135M as the Item LLM on amazon-scientific with a
#      catalogue-scale negative bank (4096 sampled + the batch's items), printing the validation
#      metric and the Item LLM's training tokens/s.
#     scripts/gpu-check.sh
# A CPU rehearsal with tiny random models (what tests/test_gpu_check.py runs):
#     HLLM_GPU_CHECK_TINY=1 scripts/gpu-check.sh
# Settings: HLLM_GPU_CHECK_DATA (default ../shared/data/amazon-scientific), HLLM_GPU_CHECK_OUT
# (default runs/gpu-check, which must not hold an earlier check), HLLM_GPU_CHECK_STEPS (optimizer steps).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
data=${HLLM_GPU_CHECK_DATA:-../shared/data/amazon-scientific}
out=${HLLM_GPU_CHECK_OUT:-runs/gpu-check}
if [[ "${HLLM_GPU_CHECK_TINY:-0}" == 1 ]]; then
  item=tiny-llama user=tiny-llama steps=${HLLM_GPU_CHECK_STEPS:-3}
  settings=(train.accelerator=cpu train.batch_size=8 train.num_negatives=64 data.max_text_tokens=16)
else
  # About 130 steps make one epoch of amazon-scientific at batch 64; stopping inside it keeps the
  # validation pass out of the timed training.
  item=smollm2-135m user=small-llama steps=${HLLM_GPU_CHECK_STEPS:-120}
  settings=(train.accelerator=cuda train.batch_size=64 train.num_negatives=4096 data.max_text_tokens=64
    train.gradient_checkpointing=true)
fi
mkdir -p "$out"
"$python" scripts/gpu_check.py parity "$item" "$data" "$out/cache"
"$python" scripts/gpu_check.py finetune "$out" \
  "data.path=$data" "data.text_fields=[title,brand,categories,description]" "data.cache_dir=$out/cache" \
  "model.item.backbone=$item" model.item.mode=finetune model.item.pooling=token \
  "model.user.backbone=$user" model.user.dropout=0.2 \
  train.in_batch_negatives=true train.precision=bf16-mixed train.lr=1e-3 train.item_lr=5e-5 \
  train.epochs=1 "train.max_steps=$steps" train.log_every=10 eval.metric=ndcg@10 "${settings[@]}"
