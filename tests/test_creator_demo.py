"""`hllm creator demo`'s settings (the run itself needs the pretrained weights: see BENCHMARKS.md)."""

from __future__ import annotations

from pathlib import Path

from hllm.creator.demo import demo_configs
from tests.support import assert_one_line_error, run_cli


def test_demo_writes_under_out_and_trains_the_creator_at_the_asked_precision(tmp_path):
    hllm_config, creator_config = demo_configs(tmp_path, limit=50, precision="bf16-mixed")
    assert creator_config.train.precision == "bf16-mixed"
    assert hllm_config.train.precision == "32-true"  # only the Creative LLM's training changes
    assert Path(creator_config.creator.model.hllm_run) == tmp_path / "hllm"
    assert Path(creator_config.creator.train.rows) == tmp_path / "data" / "rows.parquet"
    assert creator_config.creator.data.limit == 50
    assert creator_config.creator.teacher.backend == "grounded"
    # grounded-v3 from the demo's own HLLM run, which the fact selector learns to read
    assert Path(creator_config.creator.data.interest_run) == tmp_path / "hllm"
    assert creator_config.creator.model.fact_selector
    # every held-out user's rows are judged, and there are enough of them to resolve a small lift
    assert creator_config.creator.eval.limit == 0 and creator_config.creator.train.holdout == 0.43
    _, default = demo_configs(tmp_path, limit=50)
    assert default.train.precision == "32-true"


def test_an_unknown_precision_is_a_one_line_error(tmp_path):
    code, _, err = run_cli("creator", "demo", "--precision", "fp16", "--out", tmp_path)
    assert_one_line_error(code, err, "--precision", "32-true, bf16-mixed")
    assert not any(tmp_path.iterdir())  # refused before anything is written
