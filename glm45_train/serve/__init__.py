"""Serving exports with vLLM: the server process (server.py), the methods our engines add to vLLM's worker
(vllm_worker.py), `glm45-train serve`'s checks and flags (options.py) and its two modes (launch.py), and the
serving contract `serve --check` holds an export to (contract/)."""
