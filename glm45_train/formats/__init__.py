"""File formats and byte-moving machinery, knowing nothing of GLM-4.5: the lowest layer beside `config/`.

safetensors_format.py (one file: header + raw bytes), hf_io.py (sharded HF checkpoints: index, shards, streaming
writer, atomic finish), direct_io.py (O_DIRECT reads/appends, buffered fallback), fp8.py (FP8 checkpoints
dequantised as read; quantised as written by make-tiny), dcp_records.py (the records inside PyTorch-DCP `.distcp`
files), buffers.py (buffer pool, byte budget, workers, read-ahead), progress.py (progress protocol, summaries),
safe_pickle.py (the allow-list every checkpoint pickle is read through) and dcp_reader.py (DCP's reader on it).
`model/` (make-tiny) and `convert/` both build on it; it imports neither.
"""
