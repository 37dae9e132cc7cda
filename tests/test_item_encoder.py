"""ItemEncoder: packed items match items run one at a time, attention stays inside each item."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hllm.data.text import ItemTokens, PackedItems, pack_items, tokenize_items
from hllm.errors import UserError
from hllm.models.backbone import Backbone, load_backbone
from hllm.models.item_encoder import ItemEncoder, padded_layout, row_layout

# fp32 on CPU: packed and one-at-a-time differ only by summation order (measured ~1e-6).
ATOL = 1e-5
TEXTS = [
    "Compress the following sentence into embedding: title: Toy Story; year: 1995",
    "a b",
    "love story of the king",
    "x",
    "star wars: a new hope (1977) action adventure sci-fi",
]


@pytest.fixture(scope="session")
def tiny_llama() -> Backbone:
    return load_backbone("tiny-llama")


@pytest.fixture(scope="session")
def tiny_bert() -> Backbone:
    return load_backbone("tiny-bert")


def tokens_of(backbone: Backbone) -> ItemTokens:
    return tokenize_items(TEXTS, backbone.tokenizer, max_tokens=64)


def one_at_a_time(encoder: ItemEncoder, item_tokens: ItemTokens, ids: list[int]) -> torch.Tensor:
    """Reference: each item alone through the plain model (no packing, no mask), pooled by hand."""
    rows = []
    for i in ids:
        input_ids = torch.from_numpy(
            item_tokens.ids[item_tokens.offsets[i] : item_tokens.offsets[i + 1]]
        ).long()
        embeds = encoder.model.get_input_embeddings()(input_ids)  # (t, D)
        if encoder.pooling == "token":
            embeds = torch.cat([embeds, encoder.item_token[None]])
        hidden = encoder.model(inputs_embeds=embeds[None]).last_hidden_state[0]  # (t, D)
        pooled = {"token": hidden[-1], "cls": hidden[0], "mean": hidden.mean(0)}
        rows.append(pooled[encoder.pooling])
    return torch.stack(rows)


@pytest.mark.parametrize(
    ("name", "pooling"),
    [("tiny_llama", "token"), ("tiny_llama", "mean"), ("tiny_bert", "mean"),
     ("tiny_bert", "cls"), ("tiny_bert", "token")],
)  # fmt: skip
def test_packed_encoding_matches_one_item_at_a_time(name, pooling, request):
    backbone = request.getfixturevalue(name)
    encoder = ItemEncoder(backbone, pooling=pooling).eval()
    item_tokens = tokens_of(backbone)
    ids = [0, 1, 2, 3, 4, 2]
    assert len(set(item_tokens.lengths.tolist())) >= 4  # items of different lengths
    with torch.no_grad():
        packed = encoder(pack_items(item_tokens, np.array(ids), appended_tokens=encoder.appended_tokens))
        expected = one_at_a_time(encoder, item_tokens, ids)
    assert packed.shape == (len(ids), backbone.hidden_size)
    torch.testing.assert_close(packed, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_bert"])
def test_attention_does_not_cross_items(name, request):
    backbone = request.getfixturevalue(name)
    encoder = ItemEncoder(backbone, pooling="mean").eval()
    packed = pack_items(tokens_of(backbone), np.array([0, 2, 4]))
    changed = packed.input_ids.clone()
    first, last = int(packed.lengths[0]), int(packed.lengths[:2].sum())
    changed[first + 1 : last] = torch.arange(100, 100 + last - first - 1)  # item 1's words
    with torch.no_grad():
        before = encoder(packed)
        after = encoder(PackedItems(changed, packed.position_ids, packed.lengths))
    torch.testing.assert_close(after[[0, 2]], before[[0, 2]], atol=1e-6, rtol=0)
    assert (after[1] - before[1]).abs().max() > 1e-3


@pytest.mark.parametrize("max_tokens", [1, 7, 20, 10_000])
def test_splitting_into_rows_gives_the_same_embeddings(tiny_llama, max_tokens):
    encoder = ItemEncoder(tiny_llama, pooling="token").eval()
    packed = pack_items(tokens_of(tiny_llama), np.array([4, 0, 1, 2, 3, 1, 0]), appended_tokens=1)
    with torch.no_grad():
        one_row = encoder(packed)
        encoder.max_tokens_per_row = max_tokens
        split = encoder(packed)
    torch.testing.assert_close(split, one_row, atol=1e-6, rtol=0)


def test_row_layout_packs_whole_items_first_fit_decreasing():
    layout = row_layout(torch.tensor([3, 2, 4, 6]), max_tokens=5)
    # Rows hold at most max(5, longest item = 6) tokens. Longest first: item 3 fills row 0, item 2
    # opens row 1, item 0 (3) does not fit its 2 free appended_tokens and opens row 2, item 1 (2) fills row 1.
    assert layout.shape == (3, 6)
    assert layout.row.tolist() == [2] * 3 + [1] * 2 + [1] * 4 + [0] * 6
    assert layout.column.tolist() == [0, 1, 2, 4, 5, 0, 1, 2, 3, 0, 1, 2, 3, 4, 5]
    assert layout.item.tolist() == [0] * 3 + [1] * 2 + [2] * 4 + [3] * 6


def test_padded_layout_puts_one_item_per_row():
    layout = padded_layout(torch.tensor([3, 1, 2]), width=4)
    assert layout.shape == (3, 4)
    assert layout.row.tolist() == [0, 0, 0, 1, 2, 2]
    assert layout.column.tolist() == [0, 1, 2, 0, 0, 1]
    assert padded_layout(torch.tensor([3, 5]), width=0).shape == (2, 5)  # to the longest item


@pytest.mark.parametrize("pad_width", [0, 40])
def test_padded_layout_gives_the_packed_embeddings(tiny_llama, pad_width):
    encoder = ItemEncoder(tiny_llama, pooling="token").eval()
    packed = pack_items(tokens_of(tiny_llama), np.array([4, 0, 1, 2, 3]), appended_tokens=1)
    with torch.no_grad():
        expected = encoder(packed)
        encoder.layout, encoder.pad_width = "padded", pad_width
        padded = encoder(packed)
    torch.testing.assert_close(padded, expected, atol=1e-6, rtol=0)


def test_gradients_reach_item_token_and_backbone():
    backbone = load_backbone("tiny-llama")  # fresh: this test writes gradients
    encoder = ItemEncoder(backbone, pooling="token").train()
    encoder(pack_items(tokens_of(backbone), np.array([0, 1, 2]), appended_tokens=1)).pow(2).sum().backward()
    assert encoder.item_token.grad.abs().sum() > 0
    assert backbone.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert backbone.model.get_input_embeddings().weight.grad.abs().sum() > 0


def test_gradient_checkpointing_keeps_gradients():
    backbone = load_backbone("tiny-bert")
    encoder = ItemEncoder(backbone, pooling="mean").train()
    packed = pack_items(tokens_of(backbone), np.array([0, 1, 2]))

    def gradient() -> torch.Tensor:
        encoder.zero_grad()
        with torch.random.fork_rng():
            torch.manual_seed(0)  # the same dropout masks in both runs
            encoder(packed).pow(2).sum().backward()
        return backbone.model.encoder.layer[0].attention.self.query.weight.grad.clone()

    plain = gradient()
    encoder.set_gradient_checkpointing(True)
    assert backbone.model.is_activation_checkpointing
    torch.testing.assert_close(gradient(), plain, atol=1e-6, rtol=0)
    encoder.set_gradient_checkpointing(False)
    assert not backbone.model.is_activation_checkpointing


def test_appended_tokens_follow_pooling(tiny_llama, tiny_bert):
    assert ItemEncoder(tiny_llama, pooling="token").appended_tokens == 1
    assert ItemEncoder(tiny_bert, pooling="mean").appended_tokens == 0
    assert ItemEncoder(tiny_bert, pooling="cls").appended_tokens == 0


def test_cls_pooling_needs_an_encoder(tiny_llama):
    with pytest.raises(UserError, match="cls"):
        ItemEncoder(tiny_llama, pooling="cls")


def test_empty_pack_gives_no_rows(tiny_bert):
    encoder = ItemEncoder(tiny_bert, pooling="mean").eval()
    empty = pack_items(tokens_of(tiny_bert), np.array([], dtype=np.int64))
    assert encoder(empty).shape == (0, tiny_bert.hidden_size)


@pytest.mark.parametrize(
    ("name", "pooling"),
    [("tiny_llama", "token"), ("tiny_llama", "mean"), ("tiny_bert", "mean"), ("tiny_bert", "cls")],
)
def test_top_layers_over_lower_states_give_the_full_encoding(name, pooling, request):
    backbone = request.getfixturevalue(name)  # two layers: the top one trains
    encoder = ItemEncoder(backbone, pooling=pooling, train_layers=1).eval()
    packed = pack_items(
        tokens_of(backbone), np.array([4, 0, 1, 2, 3]), appended_tokens=encoder.appended_tokens
    )
    with torch.no_grad():
        full = encoder(packed)
        states = encoder.lower_states(packed)
        top = encoder.forward_top(states, packed.lengths, packed.position_ids)
    assert encoder.frozen_layers == 1
    assert states.shape == (len(packed.input_ids), backbone.hidden_size)
    torch.testing.assert_close(top, full, atol=ATOL, rtol=0)
    assert not torch.allclose(states, encoder.model.get_input_embeddings()(packed.input_ids))  # a layer ran


def test_top_layer_training_freezes_everything_below():
    backbone = load_backbone("tiny-llama")  # fresh: this test changes requires_grad
    encoder = ItemEncoder(backbone, pooling="token", train_layers=1)
    trained = {name for name, param in encoder.named_parameters() if param.requires_grad}
    last = len(backbone.model.layers) - 1
    assert trained and all(name.startswith((f"model.layers.{last}.", "model.norm.")) for name in trained)
    assert "model.norm.weight" in trained


def test_top_layer_count_is_checked(tiny_bert):
    with pytest.raises(UserError, match="train_layers|layers"):
        ItemEncoder(tiny_bert, pooling="mean", train_layers=len(tiny_bert.model.encoder.layer) + 1)
