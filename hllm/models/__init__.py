"""Models: backbones, item and user encoders, HLLM, ID baselines and training losses."""
