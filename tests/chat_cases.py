"""Conversations that exercise every branch of the GLM-4.5 template, in the raw form the template takes.

Shared by the renderer tests and by `tests/data/glm45_renderings.jsonl` (the checked-in expected renderings).
"""

from __future__ import annotations

from typing import Any

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "查询城市天气 / current weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
SEARCH_TOOL = {
    "name": "search",
    "description": "web search",
    "parameters": {"type": "object", "properties": {}},
}


def _call(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


CASES: dict[str, dict[str, Any]] = {
    "single_turn": {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
    "system": {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Why is the sky blue?"},
            {"role": "assistant", "content": "Rayleigh scattering."},
        ]
    },
    "multi_turn": {
        "messages": [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "3+3?"},
            {"role": "assistant", "content": "6"},
            {"role": "user", "content": "And 4+4?"},
            {"role": "assistant", "content": "8"},
        ]
    },
    "reasoning_field": {
        "messages": [
            {"role": "user", "content": "Is 91 prime?"},
            {
                "role": "assistant",
                "content": "No, 91 = 7 × 13.",
                "reasoning_content": "  Try 7: 7 × 13 = 91.\n",
            },
        ]
    },
    "reasoning_inline": {
        "messages": [
            {"role": "user", "content": "15% of 80?"},
            {"role": "assistant", "content": "<think>\n10% is 8, 5% is 4.\n</think>\n\n  It is 12.  "},
        ]
    },
    "earlier_reasoning_dropped": {
        "messages": [
            {"role": "user", "content": "12 × 12?"},
            {"role": "assistant", "content": "<think>12 × 12 = 144</think>144", "reasoning_content": None},
            {"role": "user", "content": "13 × 13?"},
            {"role": "assistant", "content": "169", "reasoning_content": "13 × 13 = 169"},
            {"role": "user", "content": "14 × 14?"},
            {"role": "assistant", "content": "196", "reasoning_content": "14 × 14 = 196"},
        ]
    },
    "tool_call_and_response": {
        "tools": [WEATHER_TOOL],
        "messages": [
            {"role": "user", "content": "北京天气？"},
            {"role": "assistant", "content": "", "tool_calls": [_call("get_weather", {"city": "北京"})]},
            {"role": "tool", "content": '{"temperature": 23, "condition": "晴"}'},
            {"role": "assistant", "content": "北京今天晴，23 度。"},
        ],
    },
    "consecutive_tool_messages": {
        "tools": [WEATHER_TOOL, SEARCH_TOOL],
        "messages": [
            {"role": "system", "content": "Use tools when needed."},
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {
                "role": "assistant",
                "content": "Checking both.",
                "reasoning_content": "Two cities, two calls.",
                "tool_calls": [
                    _call("get_weather", {"city": "Paris"}),
                    _call("get_weather", {"city": "Rome"}),
                ],
            },
            {"role": "tool", "content": "Paris: 18C"},
            {"role": "tool", "content": "Rome: 25C"},
            {"role": "assistant", "content": "Rome is warmer (25C vs 18C)."},
        ],
    },
    "tool_arguments_of_every_type": {
        "tools": [SEARCH_TOOL],
        "messages": [
            {"role": "user", "content": "search"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "name": "search",
                        "arguments": {
                            "q": "中文",
                            "n": 3,
                            "x": 0.5,
                            "exact": True,
                            "tags": ["a", "b"],
                            "f": None,
                        },
                    },
                    _call("search", {"nested": {"k": [1, {"z": "é"}]}}),
                    _call("search", {}),
                ],
            },
            {"role": "tool", "content": "results"},
            {"role": "assistant", "content": "Done."},
        ],
    },
    "ends_with_tool_call": {
        "tools": [WEATHER_TOOL],
        "messages": [
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": "", "tool_calls": [_call("get_weather", {"city": "Oslo"})]},
        ],
    },
    "tools_but_no_call": {
        "tools": [WEATHER_TOOL],
        "messages": [{"role": "user", "content": "Tell me a joke."}, {"role": "assistant", "content": "No."}],
    },
    "structured_content_parts": {
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is "},
                    {"type": "image", "image": "cat.png"},
                    {"type": "text", "text": "in this picture?"},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        ]
    },
    "unicode": {
        "messages": [
            {"role": "user", "content": "Ünïcödé 🙂 中文 العربية e\u0301 \u200b zero-width"},
            {"role": "assistant", "content": "収到 ✓ — «ok» 🚀", "reasoning_content": "思考：🙂"},
        ]
    },
    "empty_content": {
        "messages": [
            {"role": "system", "content": ""},
            {"role": "user", "content": ""},
            {"role": "assistant", "content": "   ", "reasoning_content": ""},
            {"role": "user", "content": ""},
            {"role": "assistant", "content": "ok"},
        ]
    },
    "user_already_nothink": {
        "messages": [
            {"role": "user", "content": "Quick answer /nothink"},
            {"role": "assistant", "content": "Sure."},
        ]
    },
    "empty_reasoning_field_keeps_inline_text": {
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "<think>kept as text</think>answer", "reasoning_content": ""},
        ]
    },
    "prompt_only": {"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "Hello?"}]},
}
