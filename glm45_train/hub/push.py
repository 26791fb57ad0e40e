"""`push(dir, repo_id)`: publish a complete export to a ModelScope model repository with the modelscope SDK.

In this order, so that a refusal contacts nothing: the repository ID is checked (OWNER/NAME), the directory is
checked (export_check.py), the token is read from MODELSCOPE_API_TOKEN. Then the repository is created if it does
not exist (private unless asked otherwise) and the folder is uploaded: weights through the SDK's LFS path, small text
files inline in the commit. Rerunning after an interruption skips what was committed: the SDK's resume state lives
in the hidden `.push-resume/` inside the directory, one file per destination (the SDK's default, `.ms_upload_cache`,
is keyed by repository only: after a push to master, a push of the same files to another branch or hub would skip
them all). Hidden files (`.git`, editor and resume state) are not uploaded.

The token is a secret: it reaches the SDK in memory only (never a file, the command line or our output), and
every error we re-raise and every log line the SDK writes while we hold it has it replaced by `***` — servers echo
requests back, and the SDK logs their messages.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from glm45_train.errors import UserError
from glm45_train.hub.export_check import ExportKind, check_export
from glm45_train.hub.fetch import REPO_ID

TOKEN_VARIABLE = "MODELSCOPE_API_TOKEN"
HIDDEN = [".*", "*/.*"]  # the SDK's fnmatch patterns (`*` spans `/`): anything with a component starting with "."
SDK_LOGGERS = ("modelscope_hub", "modelscope", "")  # "" is the root: records that propagate end there
REDACTED = "***"
RESUME_DIR = ".push-resume"


class PushError(UserError, RuntimeError):
    """A push that cannot start (bad repository ID, no token) or that the hub refused (message scrubbed)."""


@dataclass(frozen=True)
class PushSummary:
    directory: Path
    kind: ExportKind
    repo_id: str
    url: str
    revision: str
    files: int
    bytes: int
    created: bool
    private: bool

    def format(self) -> str:
        visibility = "private" if self.private else "public"
        repo = f"new {visibility} repository" if self.created else "existing repository"
        return (
            f"pushed {self.kind.value} {self.directory}: {self.files} files, {self.bytes / 2**20:.1f} MiB "
            f"-> {self.url} ({repo}, revision {self.revision})"
        )


def push(
    directory: str | Path,
    repo_id: str,
    *,
    private: bool = True,
    commit_message: str | None = None,
    revision: str | None = None,
    endpoint: str | None = None,
    progress: bool = True,
) -> PushSummary:
    """Upload the complete export in `directory` to the ModelScope model repository `repo_id` (OWNER/NAME).

    `endpoint` defaults to the SDK's (https://modelscope.cn); `revision` to the repository's master branch.
    """
    directory = Path(directory)
    if not REPO_ID.match(repo_id):
        raise PushError(f"{repo_id!r}: not a repository ID; expected OWNER/NAME (letters, digits, '_', '-', '.')")
    kind = check_export(directory)
    files = upload_listing(directory)
    token = _read_token()
    from modelscope.hub.api import HubApi  # importing the SDK attaches the log handlers _token_scrubbed filters

    with _token_scrubbed(token, f"{repo_id}: push failed"):
        api = HubApi(endpoint=endpoint, token=token)
        created = not api.repo_exists(repo_id, repo_type="model", re_raise=True)
        if created:
            api.create_repo(repo_id, visibility="private" if private else "public", repo_type="model")
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(directory),
            repo_type="model",
            commit_message=commit_message or f"glm45-train push: {kind.value}",
            revision=revision,
            ignore_patterns=HIDDEN,
            tracker_path=_resume_state(directory, api.endpoint, repo_id, revision),
            disable_tqdm=not progress,
        )
        url = f"{api.endpoint.rstrip('/')}/models/{repo_id}"
    return PushSummary(
        directory=directory,
        kind=kind,
        repo_id=repo_id,
        url=url,
        revision=revision or "master",
        files=len(files),
        bytes=sum(path.stat().st_size for path in files),
        created=created,
        private=private,
    )


def upload_listing(directory: Path) -> list[Path]:
    """The files `push` uploads: every file under `directory` but hidden ones (the `HIDDEN` patterns)."""
    return sorted(
        path
        for path in directory.rglob("*")
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(directory).parts)
    )


def _resume_state(directory: Path, endpoint: str, repo_id: str, revision: str | None) -> Path:
    """Where the SDK records what it committed to this destination (its temporary files land beside it, hidden)."""
    destination = f"{endpoint.rstrip('/')}/models/{repo_id}@{revision or 'master'}"
    return directory / RESUME_DIR / f"{hashlib.sha256(destination.encode()).hexdigest()[:16]}.json"


def _read_token() -> str:
    token = os.environ.get(TOKEN_VARIABLE, "").strip()
    if not token:
        raise PushError(
            f"no ModelScope token: set {TOKEN_VARIABLE} to an access token with write permission "
            "(https://modelscope.cn/my/myaccesstoken)"
        )
    return token


def _scrub(text: str, secret: str) -> str:
    return text.replace(secret, REDACTED)


class _Redact(logging.Filter):
    """Replaces the secret in a log record's message (and traceback) before any handler formats it."""

    def __init__(self, secret: str) -> None:
        super().__init__()
        self.secret = secret

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a malformed call: leave it to the handler, which reports it
            return True
        if self.secret in message:
            record.msg, record.args = _scrub(message, self.secret), None
        if record.exc_info and not record.exc_text:
            record.exc_text = _scrub(logging.Formatter().formatException(record.exc_info), self.secret)
        return True


@contextlib.contextmanager
def _token_scrubbed(token: str, context: str) -> Iterator[None]:
    """SDK calls inside: their log lines scrubbed, any error re-raised as a one-line `PushError`, scrubbed."""
    redact = _Redact(token)
    handlers = [handler for name in SDK_LOGGERS for handler in logging.getLogger(name).handlers]
    for handler in handlers:
        handler.addFilter(redact)
    try:
        yield
    except Exception as err:  # the SDK's errors are many (HubError, requests, ValueError); all end here
        raise PushError(_scrub(f"{context} ({type(err).__name__}: {err})", token)) from None
    finally:
        for handler in handlers:
            handler.removeFilter(redact)
