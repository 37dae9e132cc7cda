"""Models: item and user encoders, HLLM, ID baselines (SASRec, HSTU) and training losses."""
