"""Where a model comes from: a local directory, or a ModelScope model ID fetched into ModelScope's cache first."""

from __future__ import annotations

import re
from pathlib import Path

from glm45_train.errors import UserError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # OWNER/NAME, as ModelScope spells model IDs


class ModelSourceError(UserError, FileNotFoundError):
    """A model that is neither a local directory nor a ModelScope model ID that can be fetched."""


def resolve_model_dir(model: str) -> Path:
    """`model` as a local directory; a ModelScope ID (`ZhipuAI/GLM-4.5-Air`) is downloaded (or found) first."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelSourceError(f"{model}: not a directory")
    if not REPO_ID.match(model):
        raise ModelSourceError(f"{model}: no such directory, and not a ModelScope model ID (OWNER/NAME)")
    return _download(model)


def _download(model_id: str) -> Path:
    try:
        from modelscope import snapshot_download
    except ImportError:
        raise ModelSourceError(f"{model_id}: fetching model IDs needs the modelscope package") from None
    try:
        return Path(snapshot_download(model_id))
    except Exception as err:  # network, authentication and unknown-ID errors all end here
        raise ModelSourceError(
            f"{model_id}: not a local directory and not fetched from ModelScope "
            f"({type(err).__name__}: {err}); offline? pass a local directory instead"
        ) from None
