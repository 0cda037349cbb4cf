"""Rewards from a reward server (``reward.name: http``), speaking OpenRLHF's remote reward protocol.

A request is ``POST reward.url`` with the JSON ``{"query": [prompt + response, ...], "prompts": [...],
"labels": [reference answer, ...], "mode": [...]}`` (``mode``, r4b's forced mode of each rollout, is ignored by
servers that do not read it), answered by ``{"rewards": [float, ...]}``, one per query in order (other fields
of the answer are ignored). The rollouts of a step go out in requests of ``reward.batch_size`` queries,
``reward.concurrency`` at a time; each answer is put back at its batch's place, so the rewards keep the rollouts'
order whichever request finishes first.

A request that times out (``reward.timeout_s``), fails (a connection error, an HTTP error status) or gets a bad
answer (not JSON, no ``rewards`` list of the batch's length, a value that is not a finite number) is retried
``reward.retries`` times, waiting 0.5 s, 1 s, 2 s, ... between tries. One that still fails is never a silent 0:
with ``reward.on_failure: null`` (the default) the run stops with one line naming the URL and the last error;
with a number, each of its rollouts gets that reward and is counted (``reward_failures`` in the metrics).

:class:`ServerScoring` is the server as a BPO run uses it: rank 0 sends a step's rollouts in the background (the
trainer runs the reference log-prob pass meanwhile) and every rank gets the same answer.
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from r4b.config.sections import RewardSection
from r4b.errors import InputError
from r4b.rollout.base import Prompt, Rollout
from r4b.rollout.prompts import render_prompt

__all__ = ["RemoteReward", "RemoteScores", "RewardServerError", "ServerScoring", "server_scores"]


class RewardServerError(InputError):
    """The reward server could not score a batch after every retry (``reward.on_failure: null``)."""


@dataclass(frozen=True)
class RemoteScores:
    """One step's rewards from the server, in the queries' order: ``rewards[i]`` is None where query i's request
    failed after its retries; ``error`` is the last such failure, for the message."""

    rewards: list[float | None]
    error: str | None = None

    @property
    def failures(self) -> int:
        return sum(r is None for r in self.rewards)


class RemoteReward:
    """A client of one reward server (see the module docstring)."""

    def __init__(
        self, url: str, *, timeout_s: float = 60.0, retries: int = 3, batch_size: int = 64, concurrency: int = 4
    ) -> None:
        self.url, self.timeout_s, self.retries = url, timeout_s, retries
        self.batch_size, self.concurrency = batch_size, concurrency

    def score(
        self, prompts: Sequence[str], responses: Sequence[str], labels: Sequence[str], modes: Sequence[str]
    ) -> RemoteScores:
        """The server's reward of each (prompt, response), its reference answer ``labels[i]`` and mode."""
        queries = [p + r for p, r in zip(prompts, responses, strict=True)]
        items = list(zip(queries, prompts, labels, modes, strict=True))
        batches = [items[i : i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        with ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(batches)))) as pool:
            answers = list(pool.map(self._request_with_retries, batches))  # map keeps the batches' order
        rewards = [reward for values, _ in answers for reward in values]
        errors = [error for _, error in answers if error is not None]
        return RemoteScores(rewards, errors[-1] if errors else None)

    def _request_with_retries(self, batch: list[tuple[str, str, str, str]]) -> tuple[list[float | None], str | None]:
        error = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(0.5 * 2 ** (attempt - 1), 8.0))
            try:
                return self._request(batch), None
            except _BadAnswer as failure:
                error = str(failure)
        return [None] * len(batch), error

    def _request(self, batch: list[tuple[str, str, str, str]]) -> list[float]:
        queries, prompts, labels, modes = (list(column) for column in zip(*batch, strict=True))
        body = json.dumps({"query": queries, "prompts": prompts, "labels": labels, "mode": modes}).encode()
        request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                payload = response.read()
        except urllib.error.HTTPError as failure:
            raise _BadAnswer(f"HTTP {failure.code} {failure.reason}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as failure:
            reason = getattr(failure, "reason", failure)
            raise _BadAnswer(f"no answer ({reason or type(failure).__name__})") from None
        return _rewards_of(payload, len(batch))


class _BadAnswer(Exception):
    """One failed try of one request."""


def _rewards_of(payload: bytes, expected: int) -> list[float]:
    try:
        answer = json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _BadAnswer(f"an answer that is not JSON ({payload[:60]!r})") from None
    rewards = answer.get("rewards") if isinstance(answer, dict) else None
    if not isinstance(rewards, list) or len(rewards) != expected:
        got = f"{len(rewards)} rewards" if isinstance(rewards, list) else "no 'rewards' list"
        raise _BadAnswer(f"{got} for {expected} queries")
    bad = [r for r in rewards if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r)]
    if bad:
        raise _BadAnswer(f"a reward that is not a finite number ({bad[0]!r})")
    return [float(r) for r in rewards]


def server_scores(
    server: RemoteReward,
    rollouts: Sequence[Sequence[Rollout]],
    prompts: Sequence[str],
    answers: Sequence[str],
    on_failure: float | None,
) -> tuple[torch.Tensor, int]:
    """The reward server's scores ``[prompts, G]`` of ``rollouts[p][j]`` (``prompts[p]``: prompt p's chat template
    text before the mode suffix, so that prompt + full text is the sequence as generated) and how many failed
    (scored ``on_failure``); with ``on_failure`` None a failure raises :class:`RewardServerError`."""
    flat = [(prompts[p], r.full_text, answers[p], r.mode) for p, row in enumerate(rollouts) for r in row]
    result = server.score(*(list(column) for column in zip(*flat, strict=True)))
    if result.failures and on_failure is None:
        raise RewardServerError(
            f"reward server {server.url}: {result.failures} of {len(flat)} rollouts unscored after "
            f"{server.retries} retries ({result.error}); set reward.on_failure to score them and go on"
        )
    values = iter(on_failure if value is None else value for value in result.rewards)
    return torch.tensor([[next(values) for _ in row] for row in rollouts]), result.failures


class ServerScoring:
    """``reward.name: http`` in a BPO run: :meth:`ask` sends the rollouts from rank 0 in the background (a Future;
    None on other ranks), :meth:`answer` waits for it and hands every rank the same scores and failure count (a
    failure that stops the run stops every rank)."""

    def __init__(self, reward: RewardSection, tokenizer: Any, *, main: bool, world_size: int) -> None:
        self.client = RemoteReward(
            reward.url, timeout_s=reward.timeout_s, retries=reward.retries, batch_size=reward.batch_size,
            concurrency=reward.concurrency,
        )  # fmt: skip
        self.on_failure, self.tokenizer = reward.on_failure, tokenizer
        self.main, self.world_size = main, world_size
        self.requests = ThreadPoolExecutor(max_workers=1)

    def ask(self, rollouts: Sequence[Sequence[Rollout]], prompts: Sequence[Prompt], answers: Sequence[str]) -> Any:
        if not self.main:
            return None
        texts = [render_prompt(self.tokenizer, p.messages, "auto", suffix="") for p in prompts]
        return self.requests.submit(server_scores, self.client, rollouts, texts, answers, self.on_failure)

    def answer(self, pending: Future | None) -> tuple[torch.Tensor, int]:
        outcome: list[Any] = [None]
        if pending is not None:
            try:
                outcome[0] = pending.result()
            except RewardServerError as error:
                outcome[0] = error
        if self.world_size > 1:
            dist.broadcast_object_list(outcome, src=0)
        if isinstance(outcome[0], RewardServerError):
            raise outcome[0]
        return outcome[0]

    def scores(
        self, rollouts: Sequence[Sequence[Rollout]], prompts: Sequence[Prompt], answers: Sequence[str]
    ) -> tuple[torch.Tensor, int]:
        """:meth:`ask`, then :meth:`answer`."""
        return self.answer(self.ask(rollouts, prompts, answers))
