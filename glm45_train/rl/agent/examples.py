"""The tool task of the agent demo and tests: look a key up, answer with what the tool returned.

`lookup(key)` returns the secret word filed under a key; a prompt gives only the key, so the model must call the
tool and copy its answer (`contains` on the prompt's `word` field scores that; the `tool_calls` reward scores a
well-formed call). `lookup_nothing` is the negative control's tool: same schema, nothing useful returned.
`python -m glm45_train.rl.agent.examples data/` writes the SFT conversations (data/agent_sample.jsonl: tools,
calls, observations, answers) and the RL prompts (data/agent_prompts_sample.jsonl) from these functions; a test
checks the committed files are exactly what it writes.

The words are single tokens of the tiny tokenizer (no leading space), so the copy is one token.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

KEYS = ("Beijing", "Python", "Monday", "city", "search", "object", "string", "temperature")
SECRETS = ("sunny", "rain", "wind", "red")
FILED = dict(zip(KEYS, ("sunny", "rain", "wind", "red", "rain", "red", "sunny", "wind"), strict=True))  # 2 keys each
SFT_KEYS = KEYS[:6]  # the RL prompts hold every key: two the SFT data never showed
SYSTEM = "Answer with the word the lookup tool files under the user's key."


def secret_of(key: str) -> str:
    """The word filed under `key`."""
    return FILED[key]


def lookup(key: str) -> str:
    """Look up the secret word filed under a key."""
    if key not in KEYS:
        raise KeyError(f"no key {key!r}")
    return secret_of(key)


def lookup_nothing(key: str) -> str:
    """Look up the secret word filed under a key."""
    return "nothing"


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


def conversation(key: str) -> dict[str, Any]:
    """One SFT conversation: the key, the call, the tool's answer, the final answer."""
    call = {"type": "function", "function": {"name": "lookup", "arguments": {"key": key}}}
    return {
        "tools": TOOLS,
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": key},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": lookup(key)},
            {"role": "assistant", "content": lookup(key)},
        ],
    }


def prompt(key: str) -> dict[str, Any]:
    """One RL prompt: the conversation up to the user's key, and the word the answer must contain."""
    messages = conversation(key)["messages"][:2]
    return {"tools": TOOLS, "messages": messages, "word": secret_of(key)}


def write_samples(out_dir: Path, repeats: int = 4) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    sft = [conversation(key) for _ in range(repeats) for key in SFT_KEYS]
    prompts = [prompt(key) for _ in range(repeats) for key in KEYS]
    for name, records in (("agent_sample.jsonl", sft), ("agent_prompts_sample.jsonl", prompts)):
        lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        (out_dir / name).write_text(lines)


if __name__ == "__main__":
    write_samples(Path(sys.argv[1] if len(sys.argv) > 1 else "data"))
