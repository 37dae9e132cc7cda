"""HLLM-Creator: personalised titles."""
