"""Training data: sources -> the GLM-4.5 chat renderer (text, ids, loss mask) -> packing -> the prepared dataset."""
