"""`push`: complete exports reach the hub byte for byte, broken ones contact nothing, the token never leaks.

The hub is a local HTTP server (`FakeModelScope`) speaking the part of ModelScope's protocol the modelscope SDK uses
to push a model: repository lookup (OpenAPI, then legacy), creation, the git-LFS batch API handing out upload URLs
that point back at the server, the blob PUTs, and commits (small files inline, base64; LFS files by sha256). It
records every request. The SDK is the real one, pointed at the server with `endpoint=`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import shutil
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from glm45_train.cli.main import main as cli
from glm45_train.errors import UserError
from glm45_train.hub.export_check import ExportKind, check_export
from glm45_train.hub.push import TOKEN_VARIABLE, push, upload_listing

TOKEN = "ms-test-0123456789abcdef-secret"
REPO = "alice/glm45-tiny"


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class FakeModelScope:
    """The hub: repositories (id -> path -> bytes), stored LFS blobs, every request received."""

    port: int = 0
    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)
    visibility: dict[str, int] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    commits: list[tuple[str, str, list[str]]] = field(default_factory=list)  # repository, revision, paths
    requests: list[Recorded] = field(default_factory=list)
    create_error: str | None = None  # a message to refuse repository creation with
    lfs_batch_error: str | None = None  # a message to refuse the first LFS batch request with
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handle(self, request: Recorded) -> tuple[int, object]:
        with self.lock:
            self.requests.append(request)
            path = request.path.split("?")[0]
            if request.method == "GET" and (match := re.fullmatch(r"/(?:openapi|api)/v1/models/([^/]+/[^/]+)", path)):
                return self._lookup(match[1], openapi=path.startswith("/openapi"))
            if request.method == "POST" and path == "/api/v1/models":
                return self._create(json.loads(request.body))
            if match := re.fullmatch(r"/api/v1/repos/models/([^/]+/[^/]+)/info/lfs/objects/batch", path):
                if self.lfs_batch_error is not None:
                    message, self.lfs_batch_error = self.lfs_batch_error, None
                    return 403, {"Code": 403, "Message": message, "Success": False}
                return self._lfs_batch(json.loads(request.body)["objects"])
            if request.method == "PUT" and (match := re.fullmatch(r"/lfs/([0-9a-f]{64})", path)):
                self.blobs[match[1]] = request.body
                return 200, {}
            if match := re.fullmatch(r"/api/v1/repos/models/([^/]+/[^/]+)/commit/([^/]+)", path):
                return self._commit(match[1], match[2], json.loads(request.body)["actions"])
            return 404, {"Code": 404, "Message": f"no route {request.method} {path}", "Success": False}

    def _lookup(self, repo_id: str, openapi: bool) -> tuple[int, object]:
        if repo_id not in self.repos:
            return 404, {"success": False, "message": "not found"} if openapi else {"Code": 404, "Message": "nope"}
        owner, name = repo_id.split("/")
        if openapi:
            return 200, {"success": True, "data": {"id": repo_id, "private": self.visibility[repo_id] == 1}}
        return 200, {"Code": 200, "Data": {"Path": owner, "Name": name}, "Success": True}

    def _create(self, body: dict) -> tuple[int, object]:
        repo_id = f"{body['Path']}/{body['Name']}"
        if self.create_error is not None:
            return 403, {"Code": 403, "Message": self.create_error, "Success": False}
        if repo_id in self.repos:
            return 409, {"Code": 409, "Message": "repo already exists", "Success": False}
        self.repos[repo_id], self.visibility[repo_id] = {}, body["Visibility"]
        return 200, {"Code": 200, "Data": {"Path": body["Path"], "Name": body["Name"]}, "Success": True}

    def _lfs_batch(self, objects: list[dict]) -> tuple[int, object]:
        answer = [
            {"oid": obj["oid"], "size": obj["size"], "actions": {"upload": {"href": self._url(f"/lfs/{obj['oid']}")}}}
            for obj in objects
            if obj["oid"] not in self.blobs
        ]
        return 200, {"Code": 200, "Data": {"objects": answer}, "Success": True}

    def _commit(self, repo_id: str, revision: str, actions: list[dict]) -> tuple[int, object]:
        files = self.repos[repo_id]
        self.commits.append((repo_id, revision, [action["path"] for action in actions]))
        for action in actions:
            if action["type"] == "lfs":
                files[action["path"]] = self.blobs[action["sha256"]]
            else:
                files[action["path"]] = base64.b64decode(action["content"])
        return 200, {"Code": 200, "Data": {"CommitId": "c0ffee"}, "Success": True}

    def _url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def _handler(hub: FakeModelScope) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status, payload = hub.handle(Recorded(self.command, self.path, dict(self.headers), body))
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = _serve

        def log_message(self, *args) -> None:  # quiet: the requests are recorded instead
            pass

    return Handler


@pytest.fixture
def hub():
    fake = FakeModelScope()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    fake.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield fake
    server.shutdown()
    server.server_close()


@pytest.fixture
def env(monkeypatch, tmp_path):
    """The token in the environment; the SDK's config and cache under tmp_path (where the test looks for leaks);
    the SDK's log handlers writing to this test's stderr (they keep the stream of the test that imported the SDK)."""
    import modelscope.hub.api  # noqa: F401  (attaches the SDK's log handlers)

    monkeypatch.setenv(TOKEN_VARIABLE, TOKEN)
    monkeypatch.setenv("MODELSCOPE_HOME", str(tmp_path / "modelscope-home"))
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "modelscope-cache"))
    monkeypatch.delenv("MODELSCOPE_ENDPOINT", raising=False)
    for name in ("modelscope_hub", "modelscope"):
        for handler in logging.getLogger(name).handlers:
            if type(handler) is logging.StreamHandler:  # not pytest's own capture handlers (subclasses)
                monkeypatch.setattr(handler, "stream", CurrentStderr())


class CurrentStderr:
    """Whatever sys.stderr is when written to (pytest replaces it per test phase)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


@pytest.fixture
def export(tiny_air, tmp_path) -> Path:
    """A private copy of the tiny Air checkpoint (a complete HF export), to push or to damage."""
    return Path(shutil.copytree(tiny_air, tmp_path / "export"))


@pytest.fixture
def adapter(tmp_path) -> Path:
    """A minimal valid HF-PEFT adapter directory, as `export --adapter-only` lays it out."""
    directory = tmp_path / "adapter"
    directory.mkdir()
    module = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {f"{module}.lora_A.weight": torch.randn(4, 64), f"{module}.lora_B.weight": torch.zeros(128, 4)}
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "base_model_name_or_path": "ZhipuAI/GLM-4.5-Air", "r": 4, "lora_alpha": 8}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def push_to(hub: FakeModelScope, directory: Path, **kwargs):
    return push(directory, REPO, endpoint=f"http://127.0.0.1:{hub.port}", progress=False, **kwargs)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_push_uploads_every_file_byte_for_byte_and_never_shows_the_token(hub, env, export, tmp_path, capfd):
    summary = push_to(hub, export)
    print(summary.format())

    expected = {path.relative_to(export).as_posix(): sha256(path.read_bytes()) for path in upload_listing(export)}
    assert {path: sha256(data) for path, data in hub.repos[REPO].items()} == expected
    assert any(name.endswith(".safetensors") for name in expected) and "tokenizer.json" in expected
    assert hub.visibility[REPO] == 1  # private unless asked
    assert summary.created and summary.files == len(expected) and summary.kind is ExportKind.HF_CHECKPOINT
    assert summary.url == f"http://127.0.0.1:{hub.port}/models/{REPO}"

    api_calls = [r for r in hub.requests if r.path.startswith("/api/")]
    assert api_calls and all(r.headers.get("Authorization") == f"Bearer {TOKEN}" for r in api_calls)
    assert any(f"m_session_id={TOKEN}" in r.headers.get("Cookie", "") for r in hub.requests)
    out, err = capfd.readouterr()
    assert REPO in out and TOKEN not in out + err
    leaks = [path for path in tmp_path.rglob("*") if path.is_file() and TOKEN.encode() in path.read_bytes()]
    assert leaks == []

    hub.commits.clear()  # again: the repository is found (and stays private), the files are known to be there
    assert not push_to(hub, export).created and hub.visibility[REPO] == 1
    assert hub.commits == []
    push_to(hub, export, revision="v2")  # but another branch gets every file
    assert sorted(path for _, revision, paths in hub.commits for path in paths if revision == "v2") == sorted(expected)


def test_push_of_an_adapter_through_the_cli(hub, env, adapter, capsys):
    code = cli(["push", str(adapter), "--repo-id", REPO, "--endpoint", f"http://127.0.0.1:{hub.port}", "--public"])
    assert code == 0, capsys.readouterr().err
    assert set(hub.repos[REPO]) == {"adapter_config.json", "adapter_model.safetensors"}
    assert hub.repos[REPO]["adapter_model.safetensors"] == (adapter / "adapter_model.safetensors").read_bytes()
    assert hub.visibility[REPO] == 5
    assert "PEFT adapter" in capsys.readouterr().out


def shard_of(directory: Path, tensor: str) -> Path:
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    return directory / index["weight_map"][tensor]


def truncate_a_shard(export: Path) -> str:
    shard = shard_of(export, "lm_head.weight")
    shard.write_bytes(shard.read_bytes()[:-1])
    return shard.name


def remove_a_shard(export: Path) -> str:
    shard = shard_of(export, "model.embed_tokens.weight")
    shard.unlink()
    return shard.name


def grow_a_shard(export: Path) -> str:
    shard = shard_of(export, "lm_head.weight")
    shard.write_bytes(shard.read_bytes() + b"\0")
    return shard.name


def remove_the_tokenizer(export: Path) -> str:
    (export / "tokenizer.json").unlink()
    return "tokenizer.json"


def leave_a_partial_shard(export: Path) -> str:
    (export / ".shard-00002.safetensors.partial").write_bytes(b"half")
    return ".shard-00002.safetensors.partial"


def unindex_a_tensor(export: Path) -> str:
    index_path = export / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["model.layers.1.mlp.experts.0.up_proj.weight"]  # its shard holds more tensors
    index_path.write_text(json.dumps(index))
    return "model.layers.1.mlp.experts.0.up_proj.weight"


def remove_the_chat_template(export: Path) -> str:
    (export / "chat_template.jinja").unlink()  # and the copy in tokenizer_config.json
    config = json.loads((export / "tokenizer_config.json").read_text())
    (export / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "chat_template"}))
    return "no chat template"


@pytest.mark.parametrize(
    "damage",
    [
        truncate_a_shard,
        remove_a_shard,
        grow_a_shard,
        remove_the_tokenizer,
        leave_a_partial_shard,
        unindex_a_tensor,
        remove_the_chat_template,
    ],
)
def test_a_broken_checkpoint_is_refused_before_any_request(hub, env, export, damage):
    culprit = damage(export)
    with pytest.raises(UserError, match=re.escape(culprit)):
        push_to(hub, export)
    assert hub.requests == []


def test_a_broken_adapter_is_refused_before_any_request(hub, env, adapter):
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(UserError, match=re.escape("adapter_model.safetensors: missing")):
        push_to(hub, adapter)
    assert hub.requests == []


def test_a_directory_that_is_no_export_is_refused(hub, env, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match=re.escape("neither an HF checkpoint nor a PEFT adapter: missing config.json")):
        push_to(hub, tmp_path)
    assert hub.requests == []


def test_the_checker_accepts_both_kinds(export, adapter):
    assert check_export(export) is ExportKind.HF_CHECKPOINT
    assert check_export(adapter) is ExportKind.PEFT_ADAPTER


def test_missing_token_is_a_clear_error_and_contacts_nothing(hub, env, export, monkeypatch, capsys):
    monkeypatch.delenv(TOKEN_VARIABLE)
    code = cli(["push", str(export), "--repo-id", REPO, "--endpoint", f"http://127.0.0.1:{hub.port}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and TOKEN_VARIABLE in err, err
    assert hub.requests == []


def test_a_bad_repo_id_is_refused(hub, env, export):
    with pytest.raises(UserError, match="OWNER/NAME"):
        push(export, "just-a-name", endpoint=f"http://127.0.0.1:{hub.port}")
    assert hub.requests == []


def test_an_sdk_error_carrying_the_token_is_reraised_scrubbed(hub, env, export, capfd):
    hub.create_error = f"token {TOKEN} may not create repositories"
    with pytest.raises(UserError) as raised:
        push_to(hub, export)
    message = str(raised.value)
    assert TOKEN not in message and "token *** may not create repositories" in message and REPO in message
    assert raised.value.__cause__ is None and raised.value.__suppress_context__
    out, err = capfd.readouterr()
    assert TOKEN not in out + err


def test_sdk_log_lines_carrying_the_token_are_scrubbed(hub, env, export, capfd):
    hub.lfs_batch_error = f"token {TOKEN} is rate limited"  # the SDK logs it, then negotiates per file
    push_to(hub, export)
    assert set(hub.repos[REPO]) == {path.relative_to(export).as_posix() for path in upload_listing(export)}
    out, err = capfd.readouterr()
    assert "token *** is rate limited" in err and TOKEN not in out + err
