"""Every knob, as nested dataclasses merged defaults < YAML < dotted overrides (OmegaConf does the merge).

The orchestration layer (cli, train.fit, bench) sees `RunConfig`; constructors below it take plain arguments.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from hllm.config_fields import above_zero, at_least, check_ranges, in_range, positive, share
from hllm.creator_config import CreatorConfig
from hllm.errors import UserError
from hllm.serve_config import ServeConfig

DEFAULT_PROMPT = "Compress the following sentence into embedding: "


@dataclass
class DataConfig:
    path: str = "data/ml-100k"
    """Interaction file or dataset folder (CSV/TSV/Parquet, RecBole, LC-Rec JSON, HLLM layout)."""
    format: Literal["auto", "csv", "parquet", "recbole", "lcrec", "hllm"] = "auto"
    """Input format; `auto` detects it from the path."""
    item_path: str | None = None
    """Item table (id + text columns) for csv/parquet/hllm inputs; found beside `path` when unset."""
    name: str | None = None
    """Dataset name in reports; defaults to the file or folder name."""
    user_column: str = "user_id"
    """Column holding the user id."""
    item_column: str = "item_id"
    """Column holding the item id (in the interactions and the item table)."""
    time_column: str | None = "timestamp"
    """Optional time column; when absent (or null) file order is the chronology."""
    text_fields: list[str] = field(default_factory=list)
    """Item fields that make the item text, in order; empty = every text column of the item table."""
    prompt: str = DEFAULT_PROMPT
    """Text put before the item's fields."""
    field_separator: str = "; "
    """Separator between `key: value` fields (the reference used none)."""
    max_text_tokens: int = positive(64)
    """Item text is truncated to this many tokens (head kept)."""
    duplicates: Literal["keep", "first", "last"] = "keep"
    """Repeated (user, item) pairs: keep all, keep the first, or keep the last occurrence."""
    kcore: int = at_least(0, 0)
    """Iterative k-core: drop users and items with fewer than k interactions until stable (0 = off)."""
    max_history: int = positive(50)
    """Most recent items a model reads as history (training windows and evaluation)."""
    missing_text: Literal["drop", "error", "keep"] = "drop"
    """Interactions whose item has no row in the item table: drop and count, fail, or keep with no text."""
    split: Literal["leave-one-out", "temporal"] = "leave-one-out"
    """leave-one-out: each user's last two items are validation and test; temporal: a global time cut
    (data.temporal_cut), train before it, validation and test on each user's first two after it."""
    temporal_cut: float = share(0.9)
    """split=temporal: the cut is this quantile of all interaction times."""
    cold_items: float = share(0.0)
    """New-item protocol: this fraction of the catalogue is never trained on (0 = off)."""
    cold_seed: int = 0
    """Seed of the draw of new items (data.cold_items), apart from train.seed so that training seeds
    share one set of new items."""
    cache_dir: str = ".hllm_cache"
    """Where processed datasets are cached, keyed by input contents and these settings."""


@dataclass
class ItemConfig:
    backbone: str = "minilm"
    """Item LLM: a preset (minilm, smollm2-135m, tiny-bert, tiny-llama, ...), local path or hub id."""
    pretrained: bool = True
    """Load pretrained weights; False builds the same architecture randomly initialised."""
    pooling: Literal["token", "cls", "mean"] = "mean"
    """token: learned [ITEM] embedding appended after the text; cls/mean: encoder pooling."""
    mode: Literal["finetune", "lora", "frozen"] = "finetune"
    """finetune end to end, LoRA adapters only, or frozen (embeddings computed once)."""
    lora_rank: int = positive(8)
    """LoRA rank (mode=lora)."""
    lora_alpha: int = positive(16)
    """LoRA alpha (mode=lora)."""
    train_layers: int = at_least(0, 0)
    """mode=finetune: train only the top this many transformer layers (0, or the depth: all). The
    token states of the frozen layers below are computed once, so a step runs only the top layers."""
    dropout: float | None = share(0.0)
    """Dropout of the Item LLM while it trains (hidden and attention); None keeps the checkpoint's.
    0 as in the paper's LLaMA-family Item LLMs: MiniLM's 0.1 costs a fifth of a fine-tuning step on
    CPU (sampling masks, and attention dropout forces the unfused attention path)."""
    standardize: bool = False
    """mode=frozen (and text-knn, whose Item LLM is always frozen): standardise the Item LLM's
    outputs per dimension (mean and std over the catalogue less the protocol's new items, fixed when
    training starts, kept with the weights) before the adaptor (text-knn: before the cosine). A
    decoder's hidden states share one dominant direction (SmolLM2-135M's mean-pooled outputs on
    amazon-office: mean pairwise cosine 0.96, 0.01 once centred; MiniLM's 0.72)."""
    id_embedding: bool = False
    """Text+ID items: add a learned ID row (zero at the start, in the User LLM's width, no weight
    decay) to each trained item's text embedding; items without a trained row (new, or added to a
    served catalogue) keep their text alone."""
    id_dropout: float = share(0.5)
    """With id_embedding: while training, each item occurrence drops its ID row with this
    probability, so the text path alone stays a good model."""


@dataclass
class UserConfig:
    backbone: str = "small-llama"
    """User LLM: a decoder preset, local path or hub id; reads item embeddings as inputs_embeds."""
    pretrained: bool = False
    """Load pretrained weights (presets without weights are always random)."""
    dropout: float = share(0.0)
    """Dropout on the item embeddings the User LLM reads and on its attention weights, as SASRec
    regularises sparse data (0 = none, as the reference)."""


@dataclass
class IdModelConfig:
    hidden_size: int = positive(64)
    """Width of the item-id embeddings and of every block."""
    layers: int = positive(2)
    """Attention blocks."""
    heads: int = positive(1)
    """Attention heads (hidden_size must divide by it)."""
    dropout: float | None = share(None)
    """Embedding and residual dropout; unset: 0.2 on dense data (mean history >= 20), else 0.5."""
    attention_dropout: float | None = share(None)
    """Dropout on the attention weights; unset: the same as dropout."""
    loss: Literal["auto", "bce", "sampled", "full"] = "auto"
    """bce: one sampled negative per position (original SASRec); sampled: softmax over the shared
    bank of train.num_negatives; full: softmax over the whole catalogue; auto: full up to 200k items."""
    time_bias: bool = True
    """HSTU: add the time-gap attention bias when the data has timestamps."""


@dataclass
class ModelConfig:
    kind: Literal["hllm", "hllm-id", "popularity", "sasrec", "hstu", "text-knn"] = "hllm"
    """Which model to train. hllm-id: HLLM's User LLM and recipe over a learned item-ID table (in
    the User LLM's width) instead of the Item LLM, a diagnostic that ignores model.item. text-knn:
    untrained, cosine between model.item's pooled text embeddings and the user's last items."""
    item: ItemConfig = field(default_factory=ItemConfig)
    user: UserConfig = field(default_factory=UserConfig)
    id: IdModelConfig = field(default_factory=IdModelConfig)
    """Item-id baselines (kind sasrec or hstu); their maximum length is data.max_history."""
    adaptor: Literal["auto", "none", "linear", "mlp"] = "auto"
    """Item LLM -> User LLM map; auto: a residual MLP when the item side is frozen, else a linear
    map when the widths differ, else none."""
    temperature: float = in_range(0.07, 0.01, 1.0)
    """Initial InfoNCE temperature (learnable; its inverse is clamped to [1, 100])."""
    nce_threshold: float = 0.99
    """Negatives whose cosine with the target exceeds this are treated as false negatives."""
    last_item_text: float = in_range(0.0, 0.0, 10.0)
    """kind=hllm: add this weight times the cosine between the candidate's and the user's most
    recent item's Item LLM outputs (standardised if model.item.standardize) to every ranking score:
    evaluation, export, serving (0 = off). Training does not see it: it adds the signal text-knn
    ranks by to the trained model (BENCHMARKS.md, "A last-item text term")."""
    last_item_text_choices: list[float] = in_range([], 0.0, 10.0)
    """When given, the weight above is chosen among these after training, on validation
    eval.metric with the best checkpoint; the run's config.yaml then holds the choice (so export and
    serving use it) and metrics.json the whole sweep (train.last_item_text)."""
    last_item_text_decay: float = in_range(0.0, 0.0, 1.0)
    """The term's user side: 0 = the most recent item; d > 0 = the sum over the history's items
    weighted d^age (age 0 = the most recent), so the items just before the last add to it."""
    last_item_text_decay_choices: list[float] = in_range([], 0.0, 1.0)
    """When given, the decay above is chosen among these after the weight (at the chosen weight),
    the same way."""


@dataclass
class TrainConfig:
    epochs: int = positive(5)
    """Passes over the training windows."""
    max_steps: int = at_least(-1, -1)
    """Stop after this many optimizer steps (-1 = no limit)."""
    batch_size: int = positive(16)
    """Sequences per step and process."""
    accumulate: int = positive(1)
    """Gradient accumulation steps per optimizer step."""
    lr: float = above_zero(1e-4)
    """Peak learning rate (AdamW)."""
    item_lr: float | None = above_zero(None)
    """Peak learning rate of the Item LLM's trained weights (unset: train.lr)."""
    weight_decay: float = at_least(0, 0.01)
    """AdamW weight decay, never applied to norms, biases, embeddings or the temperature."""
    warmup: float = in_range(0.1, 0.0, 1.0)
    """Fraction of steps with a linear warm-up before the cosine decay."""
    grad_clip: float = at_least(0, 1.0)
    """Gradient-norm clipping (0 = off)."""
    precision: Literal["32-true", "bf16-mixed", "bf16-true", "16-mixed"] = "32-true"
    """Fabric precision."""
    num_negatives: int = at_least(0, 512)
    """Size of the negative bank shared by every position of a step (per process)."""
    negatives: Literal["sampled", "catalogue", "memory"] = "sampled"
    """sampled bank; the whole catalogue (item side frozen, or hllm-id); or memory: the whole
    catalogue, targets included, from a memory of every item's output refreshed every
    train.memory_refresh steps, fresh outputs feeding the User LLM's inputs only
    (model.item.train_layers > 0)."""
    memory_refresh: int = positive(50)
    """negatives=memory: steps between recomputations of every item's output."""
    in_batch_negatives: bool = False
    """Add the batch's other items (already encoded, so free) to the sampled bank; with several
    processes they stay local to each process."""
    exclude_own_items: bool = True
    """Never draw a batch user's own items as negatives."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    seed: int = 2020
    """Seed for weights, sampling and shuffling."""
    deterministic: bool = True
    """Deterministic kernels, so one seed trains the same weights on one machine and thread count."""
    patience: int = positive(5)
    """Early stopping: epochs without improvement of eval.metric before stopping."""
    checkpoint_every: int = at_least(0, 0)
    """Also checkpoint every this many optimizer steps (0 = only at the end of each epoch)."""
    log_every: int = positive(10)
    """Steps between CSV log rows."""
    num_workers: int = at_least(0, 0)
    """Processes building training batches ahead of the model (0 = in the training process);
    the time the model waits for batches is logged as train/data_wait."""
    accelerator: str = "auto"
    """Fabric accelerator (auto, cpu, cuda, ...)."""
    devices: int = positive(1)
    """Processes (GPUs) per node."""
    num_nodes: int = positive(1)
    """Machines (torchrun --nnodes, or SLURM nodes)."""
    strategy: str = "auto"
    """Fabric strategy: auto, ddp, ddp_spawn, fsdp (GPU), deepspeed (`pip install deepspeed`).
    With several processes, negatives are all-gathered (with gradient) into one shared bank."""
    logger: Literal["csv", "tensorboard"] = "csv"
    """Where training metrics go: `logs/metrics.csv`, or TensorBoard event files in `tensorboard/`
    (`pip install tensorboard`; view with `tensorboard --logdir runs/NAME/tensorboard`)."""


@dataclass
class EvalConfig:
    ks: list[int] = positive([5, 10, 50, 200])
    """Cut-offs for Recall@k and NDCG@k."""
    metric: str = "ndcg@200"
    """Validation metric that selects the checkpoint and drives early stopping."""
    batch_size: int = positive(256)
    """Users scored per chunk."""
    item_batch_size: int = positive(256)
    """Items encoded per chunk when building the item-embedding table."""


@dataclass
class RunConfig:
    name: str = "run"
    """Run name; the run folder is `out_dir/name`."""
    out_dir: str = "runs"
    """Parent folder of run folders."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    creator: CreatorConfig = field(default_factory=CreatorConfig)

    def __post_init__(self) -> None:
        """Each field's range (declared with it), then the rules that span several fields."""
        check_ranges(self)
        item = self.model.item
        if item.train_layers and item.mode != "finetune":
            raise UserError("top-layer training needs model.item.mode=finetune", "model.item.train_layers")
        if self.train.negatives == "catalogue" and item.mode != "frozen" and self.model.kind != "hllm-id":
            raise UserError(
                "the whole catalogue can be the negative bank only when model.item.mode=frozen "
                "(or train.negatives=memory with model.item.train_layers > 0)",
                where="train.negatives",
            )
        if item.standardize and item.mode != "frozen" and self.model.kind == "hllm":
            raise UserError("standardised item outputs need model.item.mode=frozen", "model.item.standardize")
        text_term = (
            self.model.last_item_text,
            self.model.last_item_text_choices,
            self.model.last_item_text_decay,
            self.model.last_item_text_decay_choices,
        )
        if any(text_term) and self.model.kind != "hllm":
            raise UserError("the last-item text term needs model.kind=hllm", "model.last_item_text")
        if self.train.negatives == "memory" and not (item.train_layers and self.model.kind == "hllm"):
            raise UserError(
                "a memory of item outputs needs model.kind=hllm and model.item.train_layers > 0",
                where="train.negatives",
            )
        if self.eval.metric.split("@")[0] not in ("recall", "ndcg", "mrr"):
            raise UserError(
                f"unknown metric {self.eval.metric!r}; use recall@k, ndcg@k or mrr", "eval.metric"
            )


def absolute_paths(config: RunConfig) -> RunConfig:
    """A copy whose input paths (the data, its cache, a Creator's HLLM run and rows) are absolute,
    as a run folder's config.yaml keeps them, so the run works from any directory."""

    def absolute(path: str | None) -> str | None:
        return str(Path(path).expanduser().resolve()) if path else path  # "" and None: unset

    data, creator = config.data, config.creator
    return replace(
        config,
        data=replace(
            data,
            path=absolute(data.path),
            item_path=absolute(data.item_path),
            cache_dir=absolute(data.cache_dir),
        ),
        creator=replace(
            creator,
            model=replace(creator.model, hllm_run=absolute(creator.model.hllm_run)),
            train=replace(creator.train, rows=absolute(creator.train.rows)),
        ),
    )


def check_data_moved(config: RunConfig, config_file: Path) -> None:
    """A trained run's data must still be where its config.yaml says; if not, say what to fix."""
    for key, path in (("data.path", config.data.path), ("data.item_path", config.data.item_path)):
        if path and not Path(path).exists():
            message = (
                f"the run's {key} {path} no longer exists; set {key} in this file to where the data is now"
            )
            raise UserError(message, where=str(config_file))


def _valid_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(cls):
        key = f"{prefix}{f.name}"
        keys.append(key)
        default = f.default_factory() if callable(f.default_factory) else f.default
        if is_dataclass(default):
            keys += _valid_keys(type(default), key + ".")
    return keys


def _as_user_error(err: OmegaConfBaseException, source: str) -> UserError:
    key = getattr(err, "full_key", None) or "?"
    if isinstance(err, ConfigKeyError):
        close = difflib.get_close_matches(key, _valid_keys(RunConfig), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return UserError(f"unknown config key {key!r} in {source}{hint}", where=key)
    return UserError(f"{str(err).splitlines()[0]} (from {source})", where=key)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError("config file not found", where=str(path))
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UserError(f"not valid YAML: {str(err).splitlines()[0]}", where=str(path)) from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UserError("a config file must hold a mapping of keys", where=str(path))
    return loaded


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults < YAML file < `a.b=value` overrides, checked against the dataclasses."""
    merged = OmegaConf.structured(RunConfig)
    layers: list[tuple[str, Any]] = []
    if path is not None:
        layers.append((str(path), _read_yaml(Path(path))))
    if overrides:
        bad = [item for item in overrides if "=" not in item]
        if bad:
            raise UserError(f"an override looks like key=value, got {bad[0]!r}", where=bad[0])
        layers.append(("the command line", OmegaConf.from_dotlist(list(overrides))))
    for source, layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as err:
            raise _as_user_error(err, source) from None
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def config_to_dict(config: RunConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)  # type: ignore[return-value]


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False, allow_unicode=True)
