"""The precision check: transformers' GLM-4.5 vs our Megatron-Core model (check.py), with transformers' modules
filled from checkpoint files for the layerwise and MTP checks (hf_reference.py). The top of convert/.
"""
