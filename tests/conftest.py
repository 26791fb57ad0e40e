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
