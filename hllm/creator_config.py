"""The `creator:` section of a run config: the HLLM-Creator's data, teacher and judge LLMs, Creative
LLM, losses, inference and evaluation knobs. Beside config.py (not inside `creator/`) because the
core's `RunConfig` holds it and the core never imports `creator/`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from hllm.config_fields import above_zero, at_least, in_range, positive, share


@dataclass
class LLMConfig:
    backend: Literal["local", "openai", "grounded"] = "local"
    """local: transformers generation in this process; openai: any OpenAI-compatible HTTP endpoint;
    grounded (teacher only): no LLM, titles assembled from the item's own text."""
    model: str = "smollm2-135m"
    """local: a preset, folder, .gguf file or hub id; openai: the model name the endpoint serves."""
    base_url: str | None = None
    """openai: endpoint such as http://127.0.0.1:8001/v1 (default: $OPENAI_BASE_URL)."""
    api_key_env: str = "OPENAI_API_KEY"
    """openai: environment variable holding the key (a local server accepts any)."""
    concurrency: int = positive(8)
    """openai: requests in flight at once."""
    timeout_s: float = above_zero(120.0)
    """openai: seconds before one request is abandoned (and retried)."""
    max_retries: int = at_least(0, 4)
    """openai: retries, with exponential back-off, of timeouts, 429 and 5xx answers."""
    batch_size: int = positive(8)
    """local: conversations generated together."""
    max_new_tokens: int = positive(64)
    """Longest answer, in tokens."""
    temperature: float = at_least(0, 0.0)
    """0 = greedy; a malformed answer's second try samples at 0.7."""
    attempts: int = positive(2)
    """Tries per row before a malformed answer is recorded as a failure."""


@dataclass
class CreatorDataConfig:
    history_items: int = positive(10)
    """Most recent history items shown to the teacher."""
    fact_chars: int = positive(400)
    """The item's selling points (every text field but the title) are cut to this many characters."""
    limit: int = at_least(0, 0)
    """Users to build rows for, drawn at random with `seed` (0 = every user)."""
    seed: int = 0
    """Seed of the user sample."""
    chunk_rows: int = positive(32)
    """Rows per written part: what a crash can lose at most."""
    verify: bool = False
    """Also ask the teacher whether each kept title states anything its item's text does not."""
    encoder: str = "minilm"
    """Grounded teacher: the frozen encoder (mean-pooled) that matches item phrases to a user's history."""
    polish: Literal["none", "local", "openai"] = "none"
    """Grounded teacher: an LLM backend (with the teacher's model settings) that rewords each title."""
    interest_run: str = ""
    """Grounded teacher: an HLLM run folder. A user's interest becomes that run's user embedding mapped
    into the encoder's space (ridge regression fit on the sampled users' history means; grounded-v3),
    so a title depends only on what a Creator built on that run reads. Empty: the history mean itself."""


@dataclass
class CreativeModelConfig:
    hllm_run: str = ""
    """Folder of a trained HLLM run (`hllm train`); its User LLM gives the user embeddings."""
    backbone: str = "smollm2-135m"
    """Creative LLM: any causal LM (preset, folder, .gguf file or hub id); tests use tiny-llama."""
    mode: Literal["full", "lora"] = "lora"
    """Fine-tune the creative LLM fully or through LoRA adapters."""
    lora_rank: int = positive(8)
    """LoRA rank (mode=lora)."""
    lora_alpha: int = positive(16)
    """LoRA alpha (mode=lora)."""
    user_embedding: Literal["last", "query"] = "last"
    """last: the User LLM's output at the user's last item; query: at a learned token appended after it."""
    train_hllm: bool = False
    """Train the HLLM side (User LLM, adaptor) jointly; by default it stays frozen."""
    max_fact_tokens: int = positive(96)
    """The item's selling points are cut to this many tokens in the prompt."""
    max_title_tokens: int = positive(48)
    """Original and target titles are cut to this many tokens."""
    max_profile_tokens: int = positive(48)
    """The interest profile (recon and align targets) is cut to this many tokens."""
    fact_selector: bool = False
    """Choose the facts a title adds with a bilinear selector over the item's own facts (embedded by
    creator.data.encoder), fitted to the grounded teacher's choices before the LM trains, and write
    them into the prompt ("Angle: ..."). Needs rows of the grounded backend and a frozen HLLM."""
    init_from: str = ""
    """A Creator run folder (`hllm creator train`) whose best weights start this run: a second stage,
    e.g. the contrast loss on a Creator that already writes sound titles."""


@dataclass
class CreativeLossConfig:
    creative: float = at_least(0, 1.0)
    """Weight of the causal LM loss on the target title (0 = off)."""
    recon: float = at_least(0, 0.5)
    """Weight of reconstructing the interest profile from the projected user embedding (0 = off)."""
    align: float = at_least(0, 0.1)
    """Weight of the symmetric InfoNCE between user embedding and profile encoding (0 = off)."""
    cls: float = at_least(0, 0.5)
    """Weight of the user-item matching BCE that scores (cluster, item) pairs at inference (0 = off)."""
    contrast: float = at_least(0, 0.0)
    """Weight of the contrast loss: given the row's user, its own title must be likelier than the
    grounded teacher's title for another user of the same item (rows with a `contrast_title` that
    differs; 0 = off). Without it nothing makes the Creative LLM read the user (BENCHMARKS.md)."""
    align_temperature: float = in_range(0.05, 0.01, 1.0)
    """Initial align temperature (learnable; its inverse is clamped to [1, 100])."""
    nce_threshold: float = 0.99
    """Align: a negative whose cosine with the positive exceeds this is a duplicate, masked."""
    cls_head: Literal["linear", "mixer"] = "mixer"
    """Matching head over [user, item]: an MLP on the concatenation, or an MLP-Mixer on the 2 tokens."""
    cls_dim: int = positive(256)
    """Width of the user and item towers."""
    cls_blocks: int = positive(2)
    """MLP-Mixer blocks (cls_head=mixer)."""
    cls_catalogue_negatives: int = at_least(0, 8)
    """Random catalogue items per row, besides the other rows' items, as cls negatives."""


@dataclass
class CreativeTrainConfig:
    rows: str = ""
    """rows.parquet of `hllm creator build-data` (or its folder); only kept rows are trained on."""
    holdout: float = share(0.2)
    """Share of users held out (all their rows) for validation and `hllm creator evaluate`."""
    seed: int = 0
    """Seed of the held-out user draw."""
    lm_lr: float | None = at_least(0, None)
    """Learning rate of the Creative LLM's own weights (LoRA or all); null: `train.lr`, as the
    projector and heads; 0: frozen, only the user projector and the heads learn."""


@dataclass
class CreativeInferConfig:
    clusters: int = positive(256)
    """k of the user k-means."""
    kmeans_iterations: int = positive(40)
    """k-means iterations per restart."""
    kmeans_restarts: int = positive(2)
    """k-means restarts; the lowest objective wins."""
    top_n: int = positive(8)
    """Clusters kept per item, by matching score."""
    threshold: float = in_range(0.5, 0.0, 1.0)
    """Matching probability a (cluster, item) pair needs to get a title."""
    items: list[str] = field(default_factory=list)
    """Item ids to write titles for; empty = the whole catalogue."""
    shard_users: int = positive(4096)
    """Users per embedding shard: what a crash can lose at most."""
    batch_size: int = positive(64)
    """Users per User LLM pass."""
    generate_batch: int = positive(8)
    """Titles generated together."""
    max_new_tokens: int = positive(40)
    """Longest generated title, in tokens."""
    temperature: float = at_least(0, 0.0)
    """0 = greedy (one deterministic title per pair); `generate --n` samples at 0.8 when 0."""
    devices: int = positive(1)
    """Processes for the embedding step (or launch with torchrun / fabric run)."""


@dataclass
class CreativeEvalConfig:
    limit: int = at_least(0, 0)
    """Held-out rows to evaluate (0 = all)."""
    gsb: bool = False
    """Also ask the judge LLM (creator.judge) for Good/Same/Bad against the original title."""
    seed: int = 0
    """Seed of the random-user ablation and of the other users the lift is measured against."""
    judge_encoder: str = "other"
    """A second judge the Creator never trained against: this frozen encoder (mean-pooled) scores a
    title against the user's history titles. other: smollm2-135m when the HLLM run reads minilm,
    else minilm; none: off."""
    bootstrap: int = positive(1000)
    """Resamples of the rows for the 95% interval of the personalisation lift."""


@dataclass
class CreatorConfig:
    data: CreatorDataConfig = field(default_factory=CreatorDataConfig)
    teacher: LLMConfig = field(default_factory=LLMConfig)
    """The LLM that profiles users and rewrites titles."""
    judge: LLMConfig = field(default_factory=LLMConfig)
    """The LLM that compares two titles for a user (Good/Same/Bad)."""
    model: CreativeModelConfig = field(default_factory=CreativeModelConfig)
    """The Creative LLM and where its user embeddings come from."""
    loss: CreativeLossConfig = field(default_factory=CreativeLossConfig)
    train: CreativeTrainConfig = field(default_factory=CreativeTrainConfig)
    """Creator training data; optimiser and schedule knobs are the run's `train.*`."""
    infer: CreativeInferConfig = field(default_factory=CreativeInferConfig)
    """Cluster-level inference (`hllm creator infer`) and generation settings."""
    eval: CreativeEvalConfig = field(default_factory=CreativeEvalConfig)
