"""UserEncoder: padding side does not matter, padded histories stay finite, attention is causal."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

from hllm.errors import UserError
from hllm.models.backbone import Backbone, load_backbone
from hllm.models.user_encoder import UserEncoder

ATOL = 1e-5  # fp32 on CPU
LENGTHS = [5, 2, 1, 3]  # real items per history, padded to L = 5


@pytest.fixture(scope="session")
def tiny_llama() -> Backbone:
    return load_backbone("tiny-llama")


@pytest.fixture(scope="session")
def bert_decoder(tmp_path_factory) -> Backbone:
    """A causal BERT: absolute position embeddings, so positions must really come from the mask."""
    config = BertConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, is_decoder=True, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("bert-decoder")
    BertModel(config).save_pretrained(folder)
    return load_backbone(str(folder))


def padded(items: torch.Tensor, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Histories (B, L, D) holding LENGTHS[b] real items, zero-padded on `side`, and their mask."""
    batch, length, _ = items.shape
    embeddings, mask = torch.zeros_like(items), torch.zeros(batch, length, dtype=torch.bool)
    for b, n in enumerate(LENGTHS):
        span = slice(0, n) if side == "right" else slice(length - n, length)
        embeddings[b, span], mask[b, span] = items[b, :n], True
    return embeddings, mask


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", ["tiny_llama", "bert_decoder"])
def test_left_and_right_padding_agree_at_real_positions(name, mode, request):
    backbone = request.getfixturevalue(name)
    encoder = getattr(UserEncoder(backbone), mode)()
    items = torch.randn(len(LENGTHS), 5, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        left = encoder(*padded(items, "left"))
        right = encoder(*padded(items, "right"))
        last_left = encoder.last_state(*padded(items, "left"))
        last_right = encoder.last_state(*padded(items, "right"))
    for b, n in enumerate(LENGTHS):
        torch.testing.assert_close(left[b, 5 - n :], right[b, :n], atol=ATOL, rtol=0)
        torch.testing.assert_close(last_left[b], right[b, n - 1], atol=ATOL, rtol=0)
    torch.testing.assert_close(last_left, last_right, atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_short_padded_histories_stay_finite(mode):
    backbone = load_backbone("tiny-llama")  # fresh: this test writes gradients
    encoder = getattr(UserEncoder(backbone), mode)()
    mask = torch.tensor([[0, 0, 0, 1], [0, 0, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    embeddings = torch.randn(4, 4, backbone.hidden_size, requires_grad=True)
    outputs = encoder(embeddings, mask)
    outputs.pow(2).sum().backward()
    assert torch.isfinite(outputs).all() and torch.isfinite(embeddings.grad).all()
    assert (outputs[~mask] == 0).all()  # padded positions are exact zeros
    assert torch.isfinite(encoder.last_state(embeddings, mask)).all()
    weight = backbone.model.layers[0].self_attn.q_proj.weight
    assert torch.isfinite(weight.grad).all() and weight.grad.abs().sum() > 0


def test_unpadded_output_is_the_decoder_last_hidden_state(tiny_llama):
    encoder = UserEncoder(tiny_llama).eval()
    embeddings = torch.randn(2, 4, tiny_llama.hidden_size)
    with torch.no_grad():
        expected = tiny_llama.model(inputs_embeds=embeddings).last_hidden_state
        outputs = encoder(embeddings, torch.ones(2, 4, dtype=torch.bool))
    torch.testing.assert_close(outputs, expected, atol=ATOL, rtol=0)


def test_output_at_j_ignores_later_items(tiny_llama):
    encoder = UserEncoder(tiny_llama).eval()
    embeddings = torch.randn(1, 5, tiny_llama.hidden_size)
    changed = embeddings.clone()
    changed[0, 3:] = torch.randn(2, tiny_llama.hidden_size)
    mask = torch.ones(1, 5, dtype=torch.bool)
    with torch.no_grad():
        before, after = encoder(embeddings, mask), encoder(changed, mask)
    torch.testing.assert_close(after[0, :3], before[0, :3], atol=1e-6, rtol=0)
    assert (after[0, 3:] - before[0, 3:]).abs().max() > 1e-3


def test_token_table_is_frozen():
    encoder = UserEncoder(load_backbone("tiny-llama"))
    assert not encoder.model.get_input_embeddings().weight.requires_grad


def test_encoder_backbone_is_rejected():
    with pytest.raises(UserError, match="causal decoder"):
        UserEncoder(load_backbone("tiny-bert"))


def test_dropout_acts_in_training_only():
    plain = UserEncoder(load_backbone("tiny-llama")).eval()
    dropped = UserEncoder(load_backbone("tiny-llama"), dropout=0.5)  # same seeded weights
    assert dropped.model.layers[0].self_attn.attention_dropout == 0.5
    embeddings = torch.randn(2, 4, plain.model.config.hidden_size)
    mask = torch.ones(2, 4, dtype=torch.bool)
    with torch.no_grad():
        first, second = dropped.train()(embeddings, mask), dropped(embeddings, mask)
        assert (first - second).abs().max() > 1e-3
        evaluated = dropped.eval()(embeddings, mask)
        torch.testing.assert_close(evaluated, plain(embeddings, mask), atol=ATOL, rtol=0)


@pytest.mark.parametrize("kv_heads", [4, 2])  # 2: grouped-query attention, as in SmolLM2
def test_last_state_shortcut_equals_the_whole_pass(kv_heads):
    """Inference computes the final layer at the last position only; the answer must not change."""
    config = LlamaConfig(
        vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=kv_heads, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    encoder = UserEncoder(Backbone(LlamaModel(config), None, True, 32, "llama")).eval()
    assert encoder.last_position_only
    items = torch.randn(len(LENGTHS), 5, 32, generator=torch.Generator().manual_seed(1))
    embeddings, mask = padded(items, "left")
    with torch.no_grad():
        whole = encoder(embeddings, mask)[:, -1]  # (B, D) the full pass at the last column
        shortcut = encoder.last_state(embeddings, mask)
        right_padded = encoder.last_state(*padded(items, "right"))  # rows end early: no shortcut
    torch.testing.assert_close(shortcut, whole, atol=ATOL, rtol=0)
    torch.testing.assert_close(right_padded, whole, atol=ATOL, rtol=0)
    assert (whole - whole.roll(1, 0)).abs().max() > 1e-3  # rows differ: the comparison means something
