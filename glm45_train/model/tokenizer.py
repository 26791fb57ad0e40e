"""The tiny GLM-4.5 tokenizer, built locally and deterministically.

Notable:
- Same shape as the released tokenizer: a byte-level BPE behind the GLM/cl100k split regex, then the 36
  GLM-4.5 added tokens in release order (ids 151329…151364 there; here they follow the small BPE
  vocabulary).
- The BPE is trained on `assets/tiny_tokenizer_corpus.txt` (English, Chinese, code, JSON), single pass,
  fixed settings: the same files come out on every run, which the tests check byte for byte.
- The first 18 added tokens are special (skipped by `decode(skip_special_tokens=True)`), as in the release's
  `extra_special_tokens`; the chat-structure tokens (`<think>`, `<tool_call>`, `/nothink`, …) are added but
  not special, so decoded text keeps them.
- `tokenizer_config.json` carries the chat template and `chat_template.jinja` sits beside it, as in the
  release.
- Generation stops on any of `STOP_TOKENS`: GLM-4.5 has no end-of-turn token.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|begin_of_audio|>",
    "<|end_of_audio|>",
    "<|begin_of_transcription|>",
    "<|end_of_transcription|>",
    "<|code_prefix|>",
    "<|code_middle|>",
    "<|code_suffix|>",
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<arg_key>",
    "</arg_key>",
    "<arg_value>",
    "</arg_value>",
    "/nothink",
    "<|begin_of_box|>",
    "<|end_of_box|>",
    "<|image|>",
    "<|video|>",
)
# The release lists these as `extra_special_tokens`; the rest are plain added tokens.
SKIPPED_ON_DECODE: tuple[str, ...] = SPECIAL_TOKENS[:18]
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|endoftext|>"
STOP_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|user|>", "<|observation|>")
RELEASE_FIRST_SPECIAL_ID = 151329

BPE_VOCAB_SIZE = 1536  # byte alphabet + merges, before the added tokens
# The split regex of the GLM-4 / GLM-4.5 tokenizers (cl100k style): words, 1–3 digits, punctuation, newlines.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
MODEL_MAX_LENGTH = 131072


def chat_template_text() -> str:
    """The official GLM-4.5 chat template shipped in `glm45_train/assets/chat_template.jinja`."""
    return resources.files("glm45_train").joinpath("assets/chat_template.jinja").read_text(encoding="utf-8")


def _training_corpus() -> list[str]:
    text = resources.files("glm45_train").joinpath("assets/tiny_tokenizer_corpus.txt").read_text(encoding="utf-8")
    return text.splitlines(keepends=True)


def build_tokenizer() -> Tokenizer:
    """Train the tiny byte-level BPE and add the GLM-4.5 tokens after its vocabulary."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_corpus(), trainer)
    added = [
        AddedToken(token, special=token in SKIPPED_ON_DECODE, normalized=False, single_word=False)
        for token in SPECIAL_TOKENS
    ]
    tokenizer.add_tokens(added)
    first_id = tokenizer.get_vocab_size(with_added_tokens=False)
    if [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] != list(range(first_id, first_id + len(SPECIAL_TOKENS))):
        raise RuntimeError("GLM-4.5 added tokens did not get consecutive ids after the BPE vocabulary")
    return tokenizer


def tokenizer_config() -> dict[str, object]:
    """`tokenizer_config.json` for the tiny tokenizer (loads with transformers 5 and 4)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "do_lower_case": False,
        "remove_space": False,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "extra_special_tokens": list(SKIPPED_ON_DECODE),
        "model_max_length": MODEL_MAX_LENGTH,
        "padding_side": "left",
        "chat_template": chat_template_text(),
    }


def write_tokenizer(out_dir: Path) -> None:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_json = build_tokenizer().to_str(pretty=True)
    (out_dir / "tokenizer.json").write_text(tokenizer_json + "\n", encoding="utf-8")
    config_json = json.dumps(tokenizer_config(), ensure_ascii=False, indent=2)
    (out_dir / "tokenizer_config.json").write_text(config_json + "\n", encoding="utf-8")
    (out_dir / "chat_template.jinja").write_text(chat_template_text(), encoding="utf-8")


def stop_token_ids(tokenizer_dir: Path) -> list[int]:
    """Ids of `STOP_TOKENS` in the tokenizer at `tokenizer_dir` (generation_config.json's eos_token_id)."""
    backend = _load_backend(tokenizer_dir)
    return [_token_id(backend, token, tokenizer_dir) for token in STOP_TOKENS]


def vocab_size_for(tokenizer_dir: Path) -> int:
    """Number of ids the tokenizer at `tokenizer_dir` can produce, added tokens included."""
    return int(_load_backend(tokenizer_dir).get_vocab_size(with_added_tokens=True))


def _load_backend(tokenizer_dir: Path) -> Tokenizer:
    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json (write one with `glm45-train make-tiny`)")
    return Tokenizer.from_file(str(path))


def _token_id(backend: Tokenizer, token: str, tokenizer_dir: Path) -> int:
    token_id = backend.token_to_id(token)
    if token_id is None:
        raise ValueError(f"{tokenizer_dir}/tokenizer.json: token {token!r} is missing (not a GLM-4.5 tokenizer?)")
    return int(token_id)
