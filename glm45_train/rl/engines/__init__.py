"""Rollout engines: hf.py (transformers on the live weights; CPU or GPU) and sglang.py (SGLang, GPUs)."""
