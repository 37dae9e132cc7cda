"""The `serve:` section of a run config: the item index, the HTTP server and the User LLM pass of
`hllm serve`. Its own module because config.py had outgrown 400 lines; `RunConfig` holds it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from hllm.config_fields import at_least, in_range, positive


@dataclass
class ServeConfig:
    index: Literal["exact", "hnsw", "hnsw-sq8", "ivf", "pq"] = "exact"
    """Nearest-item search: exact inner product, or approximate HNSW / IVF / PQ for large catalogues
    (hnsw-sq8: the HNSW graph walked over 8-bit copies of the vectors, its candidates re-ranked exactly,
    about 30% faster searches at 1M items; PQ: every item scanned as 4-bit codes, the best candidates
    re-ranked exactly; builds in seconds)."""
    hnsw_m: int = positive(32)
    """HNSW links per node (more: better recall, more memory, slower build)."""
    hnsw_ef_construction: int = positive(128)
    """HNSW search width while building."""
    hnsw_ef_search: int = positive(512)
    """HNSW search width per query (more: better recall, slower; set per query, no rebuild)."""
    ivf_lists: int = at_least(0, 0)
    """IVF clusters; 0 = sqrt(items), capped at 65536."""
    ivf_probes: int = positive(32)
    """IVF clusters visited per query (more: better recall, slower; set per query, no rebuild)."""
    pq_codes: int = at_least(0, 0)
    """4-bit PQ codes per item (0 = one per two dimensions); must divide the embedding width."""
    pq_rerank: int = positive(50)
    """PQ candidates re-ranked on exact vectors per item asked for (more: better recall, slower; set
    per query, no rebuild)."""
    host: str = "127.0.0.1"
    """Address `hllm serve` listens on."""
    port: int = in_range(8000, 1, 65535)
    """Port `hllm serve` listens on."""
    max_k: int = positive(1000)
    """Largest k a request may ask for."""
    max_body_bytes: int = positive(1_000_000)
    """Larger request bodies are refused with 413."""
    torch_threads: int = at_least(0, 0)
    """Torch threads of the server's model passes (0 = torch's default, one per core)."""
    max_batch: int = positive(64)
    """Most waiting /recommend requests answered by one User LLM pass and one index search."""
    write_key_env: str = "HLLM_WRITE_KEY"
    """Environment variable holding the key that write routes (POST /items) require as
    `Authorization: Bearer KEY`; while it is unset or empty, writes are open and `hllm serve` listens
    on loopback only."""
    precision: Literal["fp32", "bf16", "int8"] = "fp32"
    """The User LLM pass of /recommend: bf16 autocast is ~1.4x faster on CPUs with AVX512-BF16 or AMX
    (cosine to fp32 > 0.99999), slower on CPUs without; int8 = dynamic int8 weights of its linear
    layers (see BENCHMARKS.md for speed and overlap@10); item embeddings stay fp32."""
    history_window: int = at_least(0, 0)
    """Most recent history items the User LLM reads per request (0 = data.max_history, as trained);
    its cost is linear in this."""
    last_position_only: bool = True
    """The User LLM's final layer runs at each history's last position only, the one a request reads
    (Llama User LLMs; the same answers, about 45% less compute with 2 layers); false runs the whole
    pass, as before this setting existed (for comparisons)."""
