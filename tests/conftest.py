"""Shared fixtures: one tiny model per preset per session, one single-process Megatron world."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """Both tiny presets, written once per session (read-only for tests: copy before modifying)."""
    from glm45_train.model.tiny import make_tiny

    root = tmp_path_factory.mktemp("tiny")
    return {preset: make_tiny(root / preset, preset=preset, seed=0) for preset in ("air", "glm45")}


@pytest.fixture(scope="session")
def tiny_air(tiny_dirs) -> Path:
    return tiny_dirs["air"]


@pytest.fixture(scope="session")
def tiny_glm45(tiny_dirs) -> Path:
    return tiny_dirs["glm45"]


@pytest.fixture(scope="session")
def megatron_world():
    """A world of one process (gloo) with Megatron's parallel state at TP=PP=EP=1."""
    from glm45_train.runtime import distributed

    distributed.initialize()
    yield
    distributed.shutdown()


# --- data fixtures (owned by the data side: tokenizer, renderer, prepare) ---


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """The tiny GLM-4.5 tokenizer (tokenizer.json, tokenizer_config.json, chat_template.jinja)."""
    from glm45_train.model.tokenizer import write_tokenizer

    directory = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer(directory)
    return directory


@pytest.fixture(scope="session")
def hf_tokenizer(tiny_tokenizer_dir):
    """transformers' view of the tiny tokenizer: the reference for apply_chat_template comparisons."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def chat_tokenizer(tiny_tokenizer_dir):
    """The fast tokenizer our renderer uses."""
    from glm45_train.data.chat import load_chat_tokenizer

    return load_chat_tokenizer(tiny_tokenizer_dir)


# --- end of data fixtures ---


# --- conversion fixtures (owned by the conversion side: export, torch_dist I/O) ---


@pytest.fixture(scope="session")
def mcore_dirs(tiny_dirs, tmp_path_factory, megatron_world) -> dict[str, Path]:
    """Each tiny preset converted once to a Megatron checkpoint (bf16, TP=PP=EP=1). Read-only for tests."""
    from glm45_train.convert.to_mcore import hf_to_mcore

    root = tmp_path_factory.mktemp("mcore")
    return {preset: hf_to_mcore(path, root / preset).output_dir for preset, path in tiny_dirs.items()}


# --- end of conversion fixtures ---
