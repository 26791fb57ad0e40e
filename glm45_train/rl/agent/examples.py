"""The tool task of the agent demo and tests: look a key up, answer with what the tool returned.

`lookup(key)` returns the secret word filed under a key; a prompt gives only the key, so the model must call the
tool and copy its answer. The SFT conversations were recorded with other vaults (`secret_of`): they teach the call
and reading its result, and an answer learnt by heart from them is wrong in RL (RL itself can still learn the
tool's 16-entry table by heart: on the tiny model that is what a run's rising `contains` measured, so the task
shows the plumbing, not tool use). `contains` on the prompt's `word` field scores the answer, the `tool_calls`
reward a well-formed call. `python -m glm45_train.rl.agent.examples data/` writes the SFT conversations
(data/agent_sample.jsonl: tools, calls, observations, answers) and the RL prompts (data/agent_prompts_sample.jsonl);
a test checks the committed files are exactly what it writes.

The words are single tokens of the tiny tokenizer: copying a key or a secret is copying one token.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

KEYS = ("Beijing", "Python", "Monday", "city", "search", "object", "string", "temperature",
        "function", "name", "query", "rate", "self", "turn", "come", "arguments")  # fmt: skip
SECRETS = ("sunny", "rain", "wind", "red")
SYSTEM = "Answer with the word the lookup tool files under the user's key."


def secret_of(key: str, vault: int = 1) -> str:
    """The word filed under `key` in a vault: 1 is the tool's (what RL is scored on), 0 and 2 the ones the SFT
    conversations were recorded with. Each word holds 4 keys in each vault, and no key holds the same word in two
    vaults: the SFT data can only teach reading the tool's result, and an answer learnt by heart is wrong in RL."""
    index = KEYS.index(key)
    return SECRETS[(index + index // 4 + vault) % len(SECRETS)]


def lookup(key: str) -> str:
    """Look up the secret word filed under a key."""
    if key not in KEYS:
        raise KeyError(f"no key {key!r}")
    return secret_of(key)


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Look up the secret word filed under a key.",
            "parameters": {"type": "object", "properties": {"key": {"type": "string"}}, "required": ["key"]},
        },
    }
]


def conversation(key: str, vault: int = 0) -> dict[str, Any]:
    """One SFT conversation: the key, the call, the answer of the tool (of another vault than RL's), the final
    answer that repeats it."""
    call = {"type": "function", "function": {"name": "lookup", "arguments": {"key": key}}}
    filed = secret_of(key, vault)
    return {
        "tools": TOOLS,
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": key},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": filed},
            {"role": "assistant", "content": filed},
        ],
    }


def prompt(key: str) -> dict[str, Any]:
    """One RL prompt: the conversation up to the user's key, and the word the answer must contain."""
    messages = conversation(key)["messages"][:2]
    return {"tools": TOOLS, "messages": messages, "word": secret_of(key)}


def write_samples(out_dir: Path, repeats: int = 2) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    sft = [conversation(key, vault) for vault in (0, 2) for key in KEYS]  # two words per key: read, don't learn
    prompts = [prompt(key) for _ in range(repeats) for key in KEYS]
    for name, records in (("agent_sample.jsonl", sft), ("agent_prompts_sample.jsonl", prompts)):
        lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        (out_dir / name).write_text(lines)


if __name__ == "__main__":
    write_samples(Path(sys.argv[1] if len(sys.argv) > 1 else "data"))
