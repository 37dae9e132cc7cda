"""Data-parallel training is the single-process computation split over ranks: two `gloo` processes
on CPU give the loss and gradients of one process on the same global batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from hllm.config import load_config
from hllm.data.dataset import prepare_dataset
from hllm.models.build import build_model, cache_frozen_items
from hllm.train import make_batches, share_negatives
from tests.support import run_cli, tiny_overrides

ROWS_PER_RANK = 4
NEGATIVES = 8  # split evenly: every rank contributes the same number to the shared bank


def global_batch_step(fabric: L.Fabric, overrides: list[str], out: Path) -> None:
    """One forward/backward of this rank's share of global batch 0; rank 0 saves the loss averaged
    over ranks and the (DDP-synchronised) gradients to `out` (a file, not the launcher's return
    queue, whose pipe would block a worker returning more than 64 KB)."""
    config = load_config(None, overrides)
    data = prepare_dataset(config.data)
    model, item_tokens = build_model(config, data)  # seeded: the same weights in every process
    whole = make_batches(config, data, model, item_tokens)[0]  # 2 x ROWS_PER_RANK windows, NEGATIVES ids
    rank, world = fabric.global_rank, fabric.world_size
    rows = slice(rank * len(whole.items) // world, (rank + 1) * len(whole.items) // world)
    negatives = np.array_split(whole.negatives.numpy(), world)[rank]
    batch = make_batches(config, data, model, item_tokens).collate(whole.items[rows].numpy(), negatives)
    cache_frozen_items(model, item_tokens, batch_size=64, device="cpu")
    model.eval()  # no dropout: the processes must compute the same function
    share_negatives(model, fabric)
    model = fabric.setup_module(model)
    model.mark_forward_method("training_loss")
    loss = model.training_loss(batch.to(fabric.device))
    fabric.backward(loss)
    mean_loss = fabric.all_reduce(loss.detach(), reduce_op="mean")
    if fabric.global_rank == 0:
        params = model.module.named_parameters()
        grads = {name: p.grad.detach().numpy() for name, p in params if p.grad is not None}
        np.savez(out, loss=mean_loss.numpy(), **grads)
    if fabric.world_size > 1:
        # Leave together: a rank exiting while gloo's threads still run aborts ("terminate called").
        fabric.barrier()
        torch.distributed.destroy_process_group()


def saved(path: Path) -> tuple[float, dict[str, np.ndarray]]:
    with np.load(path) as arrays:
        return float(arrays["loss"]), {name: arrays[name] for name in arrays.files if name != "loss"}


@pytest.mark.parametrize("mode", ["finetune", "frozen"])
@pytest.mark.process
def test_two_process_ddp_matches_one_process(cycle_data, tmp_path, mode):
    overrides = tiny_overrides(
        cycle_data,
        tmp_path,
        train__batch_size=2 * ROWS_PER_RANK,
        train__num_negatives=NEGATIVES,
        model__item__mode=mode,
    )
    # Every cycle user has the same history length, so both ranks hold the same number of
    # positions and the mean of the two ranks' mean losses is the global mean.
    global_batch_step(L.Fabric(accelerator="cpu", devices=1), overrides, tmp_path / "single.npz")
    L.Fabric(accelerator="cpu", devices=2, strategy="ddp_spawn").launch(
        global_batch_step, overrides, tmp_path / "ddp.npz"
    )
    single_loss, single_grads = saved(tmp_path / "single.npz")
    ddp_loss, ddp_grads = saved(tmp_path / "ddp.npz")
    assert ddp_loss == pytest.approx(single_loss, rel=1e-5)
    assert ddp_grads.keys() == single_grads.keys() and len(ddp_grads) > 3
    for name, grad in single_grads.items():
        assert np.abs(grad).sum() > 0, name
        np.testing.assert_allclose(ddp_grads[name], grad, rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.process
def test_hllm_train_runs_as_two_ddp_processes(cycle_data, tmp_path):
    """The real command: Fabric starts the second process itself; both train, checkpoint, reload the
    best checkpoint and score it; one table is printed."""
    overrides = tiny_overrides(
        cycle_data, tmp_path, train__epochs=2, train__devices=2, train__strategy="ddp", train__num_workers=1
    )
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    done = subprocess.run(
        [sys.executable, "-m", "hllm", "train", str(config), *overrides],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parents[1],
    )
    # Every rank's last error line: the failing rank's is not the tail when another rank dies with it.
    errors = [line for line in done.stderr.splitlines() if "Error" in line]
    assert done.returncode == 0, "\n".join(errors) or done.stderr[-3000:]
    metrics = json.loads((tmp_path / "tiny" / "metrics.json").read_text())
    assert metrics["train"]["epochs"] == 2
    # What the two ranks scored together is what one process scores from the saved best checkpoint.
    code, out, err = run_cli("evaluate", tmp_path / "tiny", "--json", "--split", "test")
    assert code == 0, err
    assert json.loads(out)["test"] == pytest.approx(metrics["test"])
    assert done.stdout.count("┏") == 1  # one table, from rank 0
    logged = (tmp_path / "tiny" / "logs" / "metrics.csv").read_text()
    assert "train/data_wait" in logged
