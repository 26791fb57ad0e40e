"""Inference on exported checkpoints: streaming chat through transformers."""
