"""The HF <-> mcore mapping: the declarative table (table.py over converters/<family>.yaml), the only module that
knows tensor layouts (transforms.py), and shard-name arithmetic (names.py). Pure: no I/O, no Megatron import;
used by conversion, LoRA export and RL weight sync alike.
"""
