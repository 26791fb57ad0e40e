"""Supervised fine-tuning (LoRA or full) of GLM-4.5 on Megatron-Core: setup, loop, checkpoints, metrics."""
