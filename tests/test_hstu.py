"""HSTU: its relative position and time biases and its attention dropout are used (the reference
built them and left them out)."""

from __future__ import annotations

import torch

from hllm.models.hstu import RelativeBias, build_hstu

HISTORY = torch.tensor([[0, 0, 3, 4, 5, 6]])
TIMES = torch.tensor([[0, 0, 100.0, 5_000.0, 90_000.0, 90_060.0]], dtype=torch.float64)


def _users(model, times=None):
    return model.encode_users(HISTORY, model.encode_items(torch.arange(10)), times)


def test_relative_position_bias_changes_the_output_and_gets_gradients():
    torch.manual_seed(0)
    model = build_hstu(10, 6, width=16, dropout=0.0).eval()
    before = _users(model)
    with torch.no_grad():
        model.encoder.blocks[0].bias.position.copy_(torch.linspace(-3, 3, 6))
    assert not torch.allclose(_users(model), before, atol=1e-4)
    _users(model).sum().backward()
    assert model.encoder.blocks[0].bias.position.grad.abs().sum() > 0


def test_time_bias_is_used_only_with_timestamps_and_time_bias_on():
    torch.manual_seed(0)
    model = build_hstu(10, 6, width=16, dropout=0.0).eval()
    with torch.no_grad():
        for block in model.encoder.blocks:
            block.bias.time.copy_(torch.linspace(-3, 3, len(block.bias.time)))
    without = _users(model)
    with_times = _users(model, TIMES)
    assert not torch.allclose(with_times, without, atol=1e-4)
    assert not torch.allclose(_users(model, TIMES * 1000), with_times, atol=1e-4)  # other gaps, other buckets
    model.encoder.use_time = False
    torch.testing.assert_close(_users(model, TIMES), without)


def test_time_buckets_are_logarithmic_in_the_gap():
    bias = RelativeBias(4)
    with torch.no_grad():
        bias.position.zero_()
        bias.time.copy_(torch.arange(len(bias.time), dtype=torch.float32))
    times = torch.tensor([[0.0, 1.0, 10.0, 3600.0]], dtype=torch.float64)
    out = bias(torch.tensor([[3, 2, 1, 0]]), times)  # (1, 4, 4): bucket of |t_query - t_key|
    assert out[0, 3, 3] == 0  # gap 0 -> clamped to 1 second -> bucket 0
    assert out[0, 2, 1] == int(torch.log(torch.tensor(9.0)) / 0.301)  # 9 s
    assert out[0, 3, 0] == int(torch.log(torch.tensor(3600.0)) / 0.301)  # an hour


def test_attention_dropout_is_used_in_training_only():
    torch.manual_seed(0)
    model = build_hstu(10, 6, width=16, dropout=0.0, attention_dropout=0.5).train()
    assert not torch.allclose(_users(model), _users(model))
    model.eval()
    torch.testing.assert_close(_users(model), _users(model))
    quiet = build_hstu(10, 6, width=16, dropout=0.0, attention_dropout=0.0).train()
    torch.testing.assert_close(_users(quiet), _users(quiet))
