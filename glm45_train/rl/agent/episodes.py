"""The multi-turn rollout loop: sample a turn, run its tool calls, append the observation, sample the next turn.

For every trajectory (group member j of prompt i): generate until a stop token; a turn that ends on
`<|observation|>` has its tool calls parsed (data/tool_calls.py), checked against the prompt's tool schemas and
run by the environment's episode; the results are appended exactly as the chat template renders them
(data/chat.py `observation_continuation`: the tool responses, then `<|assistant|>` and, thinking off, the empty
think block), and the same sequence continues. It stops on `<|user|>` / `<|endoftext|>`, when the environment
says done, at `rl.environment.max_turns` assistant turns, or at the token budget (`rl.environment.max_tokens`, and
never past `data.max_length`).

Notable:
- Ids are appended, never re-rendered: the trained ids are the ids the engine saw, token for token
  (`mask` marks the policy's own tokens; observation tokens carry no loss and no engine log-prob). Where a
  whole-conversation rendering of the final conversation can differ from them, and why, is tested in
  tests/test_rl_agent.py: the model's own text is kept as sampled (the template re-serialises tool-call
  arguments and strips surrounding whitespace), and a tokenisation the sampler chose need not be the canonical
  one; observation ids equal the template's because every appended piece starts after an added token
  (`<|observation|>`) and ends on one (`<|assistant|>`, `</think>`).
- Every turn of every trajectory is one request with its own seed (turn 0: the group's request, member j seed
  + j; turn t: seed(member's seed, t)), all active trajectories of a rank batched in one `generate` per turn: a
  trajectory depends on (weights, prompt, seed) only, so a resumed run samples the same episodes.
- A turn cut by the budget is truncated to it (its log-probs stay valid: a prefix of what was sampled); a cut
  trajectory is not `finished`. With routing replay the last turn's record covers every token before it (the
  engine ran the whole sequence), so it is the trajectory's.
- Nothing the policy or a tool does stops the run: a malformed call, an unknown tool, bad arguments, a tool that
  raises, hangs or floods, an environment that raises — each becomes an `error: …` observation, counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from glm45_train.data.chat import observation_continuation
from glm45_train.data.tool_calls import ParsedCall, call_problems_against_schema, parse_tool_calls, tool_schemas
from glm45_train.rl.agent.environment import TRUNCATED, Environment, StepResult, ToolResult, truncated
from glm45_train.rl.rollout import Completion, Request, SamplingParams


@dataclass(frozen=True)
class Limits:
    max_turns: int
    max_tokens: int  # after the prompt (0: up to max_length)
    max_length: int  # prompt + response
    max_observation_chars: int
    thinking: bool


@dataclass
class Trajectory:
    """One episode as the rewards see it: its turns as messages, and what happened."""

    messages: list[dict[str, Any]] = field(default_factory=list)  # assistant turns (raw text) and tool results
    tool_calls: int = 0
    tool_errors: int = 0
    tool_timeouts: int = 0
    tool_truncations: int = 0  # results cut to rl.environment.max_observation_chars
    cut: str | None = None  # budget | max_turns | length: why it stopped before ending its turn


@dataclass
class _Episode:
    request: Request
    member: int
    record: Any
    session: Any
    budget: int
    ids: list[int] = field(default_factory=list)  # the response so far (model and observation tokens)
    logprobs: list[float] = field(default_factory=list)
    mask: list[bool] = field(default_factory=list)
    turns: int = 0
    finished: bool = False
    done: bool = False
    routing: np.ndarray | None = None
    trajectory: Trajectory = field(default_factory=Trajectory)

    def next_request(self) -> Request:
        seed = int(np.random.SeedSequence([self.request.seed + self.member, self.turns]).generate_state(1)[0] >> 1)
        return Request(self.request.prompt_ids + tuple(self.ids), 1, seed)


class EpisodeRunner:
    """Runs a rank's trajectories against its engine and environment."""

    def __init__(self, engine: Any, environment: Environment, tokenizer: Any, limits: Limits) -> None:
        self.engine, self.environment, self.tokenizer, self.limits = engine, environment, tokenizer, limits
        self.observation_id = tokenizer.token_to_id("<|observation|>")

    @classmethod
    def for_recipe(cls, recipe: Any, engine: Any, environment: Environment, tokenizer: Any) -> EpisodeRunner:
        section = recipe.rl.environment
        limits = Limits(
            section.max_turns, section.max_tokens, recipe.data.max_length, section.max_observation_chars,
            recipe.rl.rollout.thinking,
        )  # fmt: skip
        return cls(engine, environment, tokenizer, limits)

    def run(
        self, requests: Sequence[Request], records: Sequence[Any], params: SamplingParams, extra: Sequence[Request] = ()
    ) -> tuple[list[list[Completion]], list[list[Completion]]]:
        """(`request.samples` trajectories per request as completions, the `extra` requests' plain completions,
        sampled with turn 0)."""
        episodes = [
            [self._start(request, member, record) for member in range(request.samples)]
            for request, record in zip(requests, records, strict=True)
        ]
        flat = [episode for group in episodes for episode in group]
        try:
            first = self.engine.generate([*requests, *extra], params)
            extra_out = first[len(requests) :]
            for group, completions in zip(episodes, first[: len(requests)], strict=True):
                for episode, completion in zip(group, completions, strict=True):
                    self._after_turn(episode, completion)
            while active := [e for e in flat if not e.done]:
                room = max(e.budget - len(e.ids) for e in active)
                turn = replace(params, max_new_tokens=min(params.max_new_tokens, room))
                answers = self.engine.generate([e.next_request() for e in active], turn)
                for episode, (completion,) in zip(active, answers, strict=True):
                    self._after_turn(episode, completion)
        finally:
            for episode in flat:
                episode.session.close()
        return [[_completion(e) for e in group] for group in episodes], extra_out

    def _start(self, request: Request, member: int, record: Any) -> _Episode:
        room = self.limits.max_length - len(request.prompt_ids)
        budget = min(self.limits.max_tokens, room) if self.limits.max_tokens else room
        return _Episode(request, member, record, self.environment.start(record), budget)

    def _after_turn(self, episode: _Episode, completion: Completion) -> None:
        response = list(completion.response_ids)[: episode.budget - len(episode.ids)]
        cut_here = len(response) < len(completion.response_ids)
        episode.ids += response
        episode.logprobs += list(completion.logprobs[: len(response)])
        episode.mask += [True] * len(response)
        episode.turns += 1
        episode.routing = completion.routing
        text = self.tokenizer.decode(response, skip_special_tokens=False)
        episode.trajectory.messages.append({"role": "assistant", "content": text})
        if cut_here or not completion.finished:  # at the budget, or at max_new_tokens within one turn
            at_budget = cut_here or len(episode.ids) >= episode.budget
            return self._end(episode, finished=False, cut="budget" if at_budget else "length")
        if response[-1] != self.observation_id:
            return self._end(episode, finished=True)
        step = self._act(episode, text)
        if step.done:
            return self._end(episode, finished=True)
        if episode.turns >= self.limits.max_turns:
            return self._end(episode, finished=False, cut="max_turns")
        results = [truncated(result.text, self.limits.max_observation_chars) for result in step.results]
        episode.trajectory.tool_truncations += sum(TRUNCATED in text for text in results)
        observation = self.tokenizer.encode(
            observation_continuation(results, thinking=self.limits.thinking), add_special_tokens=False
        ).ids
        if len(episode.ids) + len(observation) >= episode.budget:  # no room left for a single generated token
            return self._end(episode, finished=False, cut="budget")
        episode.ids += observation
        episode.logprobs += [0.0] * len(observation)
        episode.mask += [False] * len(observation)
        episode.trajectory.messages += [{"role": "tool", "content": result} for result in results]

    def _act(self, episode: _Episode, text: str) -> StepResult:
        """The turn's tool calls run (or answered with errors); counted in the trajectory."""
        answer = text.rsplit("</think>", 1)[-1]
        calls, problems = parse_tool_calls(answer)
        trajectory = episode.trajectory
        if problems or not calls:
            trajectory.tool_errors += 1
            why = "; ".join(problems) or "the turn ended on <|observation|> without a <tool_call>"
            return StepResult([ToolResult(f"error: {why}", error=True)])
        trajectory.tool_calls += len(calls)
        schemas = tool_schemas(episode.record.tools or self.environment.tools())
        checked: list[ToolResult | None] = []
        valid: list[ParsedCall] = []
        for call in calls:
            problems = call_problems_against_schema(call, schemas)
            checked.append(ToolResult("error: " + "; ".join(problems), error=True) if problems else None)
            if not problems:
                valid.append(call)
        step = StepResult([])
        if valid:
            try:
                step = episode.session.act(valid)
                if len(step.results) != len(valid):
                    raise RuntimeError(f"{len(step.results)} results for {len(valid)} calls")
            except Exception as exc:  # an environment's bug is an observation, not a crashed run
                step = StepResult([ToolResult(f"error: the environment failed: {exc!r}", error=True)] * len(valid))
        answers = iter(step.results)
        results = [result if result is not None else next(answers) for result in checked]
        trajectory.tool_errors += sum(result.error for result in results)
        trajectory.tool_timeouts += sum(result.timed_out for result in results)
        return StepResult(results, step.done)

    def _end(self, episode: _Episode, *, finished: bool, cut: str | None = None) -> None:
        episode.done, episode.finished, episode.trajectory.cut = True, finished, cut


def _completion(episode: _Episode) -> Completion:
    routing = episode.routing
    if routing is not None:
        routing = routing[: len(episode.request.prompt_ids) + len(episode.ids) - 1]
    return Completion(
        tuple(episode.ids), tuple(episode.logprobs), episode.finished, routing, tuple(episode.mask), episode.trajectory
    )


def agent_metrics(trajectories: Sequence[Trajectory]) -> dict[str, float]:
    """The step's episode figures (the per-function rewards are logged with the rewards)."""
    count = max(1, len(trajectories))
    turns = [sum(m["role"] == "assistant" for m in t.messages) for t in trajectories]
    return {
        "agent/turns": float(np.mean(turns)) if turns else 0.0,
        "agent/tool_calls": sum(t.tool_calls for t in trajectories) / count,
        "agent/tool_errors": sum(t.tool_errors for t in trajectories),
        "agent/tool_timeouts": sum(t.tool_timeouts for t in trajectories),
        "agent/tool_truncations": sum(t.tool_truncations for t in trajectories),
        "agent/cut_by_budget": sum(t.cut == "budget" for t in trajectories),
        "agent/cut_by_max_turns": sum(t.cut == "max_turns" for t in trajectories),
    }
