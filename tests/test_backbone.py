"""load_backbone: presets, local folders, bad specs; slow tests load the real MiniLM and SmolLM2."""

from __future__ import annotations

import time

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel

from hllm.data.text import pack_items, tokenize_items
from hllm.errors import UserError
from hllm.models.backbone import load_backbone, set_dropout
from hllm.models.item_encoder import ItemEncoder

SENTENCES = [
    "Compress the following sentence into embedding: title: Toy Story; year: 1995",
    "A lab notebook with 100 pages of graph paper.",
]


@pytest.mark.parametrize(
    ("spec", "width", "is_decoder", "has_tokenizer"),
    [("tiny-llama", 32, True, True), ("tiny-bert", 32, False, True),
     ("small-llama", 384, True, False), ("small-llama-576", 576, True, False)],
)  # fmt: skip
def test_preset_widths_and_kinds(spec, width, is_decoder, has_tokenizer):
    backbone = load_backbone(spec)
    assert backbone.hidden_size == backbone.model.config.hidden_size == width
    assert backbone.is_decoder is is_decoder
    assert (backbone.tokenizer is not None) is has_tokenizer
    assert backbone.name == spec
    assert not hasattr(backbone.model, "lm_head")  # base model only


def test_tiny_presets_are_reproducible_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    first = load_backbone("tiny-llama").model.state_dict()
    assert torch.equal(torch.rand(3), expected_draw)
    second = load_backbone("tiny-llama").model.state_dict()
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_tiny_tokenizers_read_any_text():
    llama, bert = load_backbone("tiny-llama").tokenizer, load_backbone("tiny-bert").tokenizer
    assert llama.pad_token_id == bert.pad_token_id == 0
    ids = llama("Toy Story 1995 Zyzzyva ∑")["input_ids"]
    assert ids[0] == llama.bos_token_id and ids[-1] == llama.unk_token_id
    assert llama.convert_ids_to_tokens(ids[3:9]) == ["1", "9", "9", "5", "z", "##y"]
    ids = bert("toy story")["input_ids"]
    assert ids[0] == bert.cls_token_id and ids[-1] == bert.sep_token_id and len(ids) == 4


@pytest.mark.parametrize("spec", ["minillm", "tiny_llama", "small-llama-abc"])
def test_unknown_preset_names_the_spec_and_the_presets(spec):
    with pytest.raises(UserError, match="not a preset") as error:
        load_backbone(spec)
    assert repr(spec) in str(error.value) and "tiny-bert" in str(error.value)


def test_missing_local_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not a preset"):
        load_backbone(str(tmp_path / "no-such-model"))


def test_hub_id_offline_is_a_user_error(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="could not be found locally or on the hub") as error:
        load_backbone("nobody/no-such-model")
    assert "'nobody/no-such-model'" in str(error.value) and "minilm" in str(error.value)
    assert "\n" not in str(error.value)


def test_small_llama_width_must_fit_64_wide_heads():
    with pytest.raises(UserError, match="multiple of 64"):
        load_backbone("small-llama-100")


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-bert"])
def test_local_folder_loads_weights_tokenizer_and_kind(tmp_path, preset):
    saved = load_backbone(preset)
    saved.model.save_pretrained(tmp_path)
    saved.tokenizer.save_pretrained(tmp_path)
    loaded = load_backbone(str(tmp_path))
    assert type(loaded.model) is type(saved.model) and loaded.is_decoder is saved.is_decoder
    assert loaded.tokenizer("toy story")["input_ids"] == saved.tokenizer("toy story")["input_ids"]
    state = saved.model.state_dict()
    assert all(torch.equal(value, state[key]) for key, value in loaded.model.state_dict().items())
    random = load_backbone(str(tmp_path), pretrained=False)
    weight = random.model.get_input_embeddings().weight
    assert not torch.equal(weight, saved.model.get_input_embeddings().weight)


def test_folder_without_tokenizer_loads_with_none(tmp_path):
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    BertModel(config).save_pretrained(tmp_path)
    backbone = load_backbone(str(tmp_path))
    assert backbone.tokenizer is None and not backbone.is_decoder


def test_checkpoint_that_misses_weights_is_a_user_error(tmp_path):
    load_backbone("tiny-bert").model.save_pretrained(tmp_path)
    config = BertConfig.from_pretrained(tmp_path)
    config.num_hidden_layers = 3  # the checkpoint only holds 2 layers
    config.save_pretrained(tmp_path)
    with pytest.raises(UserError, match="lacks"):
        load_backbone(str(tmp_path))


def test_checkpoint_without_pooler_weights_loads_with_a_frozen_pooler(tmp_path):
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    BertModel(config, add_pooling_layer=False).save_pretrained(tmp_path)
    backbone = load_backbone(str(tmp_path))
    assert not any(p.requires_grad for p in backbone.model.pooler.parameters())


def test_unreadable_folder_is_a_user_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="could not be loaded from its folder"):
        load_backbone(str(tmp_path))


@pytest.mark.slow
def test_minilm_packed_mean_pooling_matches_one_sentence_at_a_time():
    backbone = load_backbone("minilm")
    assert backbone.hidden_size == 384 and not backbone.is_decoder
    encoder = ItemEncoder(backbone, pooling="mean").eval()
    item_tokens = tokenize_items(SENTENCES, backbone.tokenizer, max_tokens=64)
    with torch.no_grad():
        packed = encoder(pack_items(item_tokens, np.arange(2)))
        alone = [backbone.model(**backbone.tokenizer(text, return_tensors="pt")) for text in SENTENCES]
    expected = torch.stack([out.last_hidden_state[0].mean(0) for out in alone])
    torch.testing.assert_close(packed, expected, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_smollm2_converts_once_and_encodes(tmp_path, monkeypatch):
    monkeypatch.setenv("HLLM_CACHE", str(tmp_path))
    backbone = load_backbone("smollm2-135m")  # dequantises the GGUF into the cache
    start = time.perf_counter()
    cached = load_backbone("smollm2-135m")
    assert time.perf_counter() - start < 10  # read from the cache, not converted again
    assert sorted(path.name for path in tmp_path.iterdir()) == ["smollm2-135m"]  # no temp left
    assert backbone.hidden_size == cached.hidden_size == 576 and backbone.is_decoder
    encoder = ItemEncoder(cached, pooling="token").eval()
    item_tokens = tokenize_items(SENTENCES, cached.tokenizer, max_tokens=64)
    with torch.no_grad():
        embeddings = encoder(pack_items(item_tokens, np.arange(2), appended_tokens=1))
    assert embeddings.shape == (2, 576) and torch.isfinite(embeddings).all()


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
def test_set_dropout_makes_training_forward_passes_deterministic(name):
    backbone = load_backbone(name)
    set_dropout(backbone.model, 0.5)
    backbone.model.config._attn_implementation = "eager"  # dropout on attention probabilities too
    ids = torch.tensor([[2, 5, 6, 7, 8, 9]])
    backbone.model.train()
    noisy = [backbone.model(input_ids=ids).last_hidden_state for _ in range(2)]
    assert not torch.allclose(*noisy)
    set_dropout(backbone.model, 0.0)
    quiet = [backbone.model(input_ids=ids).last_hidden_state for _ in range(2)]
    torch.testing.assert_close(*quiet, atol=0, rtol=0)
