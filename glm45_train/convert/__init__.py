"""HF <-> Megatron-Core checkpoint conversion, one sub-package per stage; a stage imports only those below it.

    mapping/     the declarative table (converters/<family>.yaml), tensor transforms, shard-name arithmetic
    torch_dist/  Megatron torch_dist checkpoints: meta-model sharded layout, lazy writer, tensor-at-a-time reader
    sources.py   full mcore tensors on demand (HF through the table, or torch_dist); `load_weights`
    to_mcore.py  `hf_to_mcore`;  to_hf.py `mcore_to_hf`;  load.py `load_mcore`
    precision/   the check against transformers (logits, per layer, MTP by formula)

File formats (safetensors, O_DIRECT, FP8, DCP records) live below, in `glm45_train/formats/`. This file imports
nothing, so `import glm45_train.convert.mapping` does not pull in the writers.
"""
