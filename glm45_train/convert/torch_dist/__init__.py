"""Megatron torch_dist checkpoints of GLM-4.5: the sharded layout of a meta-built model (layout.py), chunks of full
tensors (chunks.py) written lazily (lazy_save.py, writer.py), read back one tensor at a time (reader.py) or through
Megatron's own load made safe (safe_load.py), and the Megatron-LM directory with our metadata (directory.py). Builds
on mapping/ and formats/.
"""
