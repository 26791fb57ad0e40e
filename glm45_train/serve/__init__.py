"""Serving exports with vLLM: the server process (server.py), the methods our engines add to vLLM's worker
(vllm_worker.py), and the serving contract `glm45-train serve --check` holds an export to (contract.py)."""
