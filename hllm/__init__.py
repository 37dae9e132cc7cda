"""hllm: HLLM and HLLM-Creator recommenders (ByteDance papers), for real data, offline or at scale."""

__version__ = "0.1.0"
