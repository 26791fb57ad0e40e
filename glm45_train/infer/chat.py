"""Chat with an exported GLM-4.5 (merged, or base + HF-PEFT adapter) through transformers, streaming tokens.

The prompt is rendered by the checkpoint's own chat template (so a fine-tune is judged in the format it was
trained in); thinking off renders GLM-4.5's non-thinking prompt (`/nothink` on user turns and an empty
`<think></think>` after `<|assistant|>`). Generation stops on the checkpoint's stop tokens
(`<|endoftext|>`, `<|user|>`, `<|observation|>` from generation_config.json).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from threading import Thread
from typing import Any, TextIO

import torch

from glm45_train.errors import UserError


@dataclass
class ChatSession:
    model: Any
    tokenizer: Any
    thinking: bool = True
    max_new_tokens: int = 512
    temperature: float = 0.0
    history: list[dict[str, str]] = field(default_factory=list)

    def prompt_ids(self, messages: list[dict[str, str]]) -> torch.Tensor:
        text = render_prompt(self.tokenizer, messages, self.thinking)
        return self.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids

    def stream_reply(self, user_text: str) -> Iterator[str]:
        """Yield the reply piece by piece; the finished reply joins the history."""
        from transformers import TextIteratorStreamer

        messages = [*self.history, {"role": "user", "content": user_text}]
        ids = self.prompt_ids(messages).to(self.model.device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        sampling = (
            {"do_sample": True, "temperature": self.temperature} if self.temperature > 0 else {"do_sample": False}
        )
        kwargs = dict(input_ids=ids, max_new_tokens=self.max_new_tokens, streamer=streamer, **sampling)
        worker = Thread(target=self.model.generate, kwargs=kwargs, daemon=True)
        worker.start()
        pieces = []
        for piece in streamer:
            pieces.append(piece)
            yield piece
        worker.join()
        self.history = [*messages, {"role": "assistant", "content": "".join(pieces)}]


def render_prompt(tokenizer: Any, messages: list[dict[str, str]], thinking: bool) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, enable_thinking=thinking)


def load_for_chat(model_dir: str | Path, adapter: str | Path | None = None, dtype: str = "auto") -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_chat_dir(Path(model_dir), adapter)
    torch_dtype = {"auto": "auto", "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
    model = model.to(device).eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    return model, AutoTokenizer.from_pretrained(adapter if _has_tokenizer(adapter) else model_dir)


def check_chat_dir(model_dir: Path, adapter: str | Path | None) -> None:
    """What chat needs before transformers is asked (its errors blame a missing `model_type`): an HF export with
    its config and weights, and a tokenizer with it or with the adapter."""
    from glm45_train.convert.torch_dist.directory import METADATA_NAME, TRACKER_NAME

    if not model_dir.is_dir():
        raise UserError(f"{model_dir}: no such directory")
    if (model_dir / TRACKER_NAME).exists() or (model_dir / METADATA_NAME).exists():
        raise UserError(
            f"{model_dir}: a Megatron checkpoint, not an HF one; export it first: "
            f"glm45-train export --to-hf --model {model_dir} --output-dir DIR"
        )
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir}: no config.json (not an HF model directory)")
    if not any(model_dir.glob("*.safetensors")):
        raise UserError(f"{model_dir}: no *.safetensors weights")
    if not (_has_tokenizer(model_dir) or _has_tokenizer(adapter)):
        where = f"{model_dir} or {adapter}" if adapter is not None else str(model_dir)
        raise UserError(f"{where}: no tokenizer (tokenizer_config.json); copy the base model's tokenizer files in")


def _has_tokenizer(directory: str | Path | None) -> bool:
    return directory is not None and (Path(directory) / "tokenizer_config.json").exists()


def interactive(session: ChatSession, read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> None:
    """A terminal conversation: empty line or /exit ends it, /reset forgets the history."""
    out.write("chat with the model (/reset clears the history, /exit or Ctrl-D ends)\n")
    while True:
        try:
            text = read("you> ").strip()
        except EOFError:
            break
        if text in ("", "/exit"):
            break
        if text == "/reset":
            session.history = []
            continue
        out.write("glm> ")
        for piece in session.stream_reply(text):
            out.write(piece)
            out.flush()
        out.write("\n")
