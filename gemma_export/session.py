"""The runtime protocol every format implements, and the loops written once against it.

A `Session` owns a KV cache and offers `prefill(tokens, pos)` (up to `prefill_len` tokens,
logits for each) and `decode(token, pos)` (one token, its logits). `generate`, teacher-forced
evaluation, `verify` and the benchmarks only ever talk to this protocol; the eager PyTorch model
is one more `Session`. `BaseSession` holds what every runtime repeats (room checks, padding a
chunk to the static prefill length); a runtime supplies `reset`, `_run` and `_hidden`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .errors import ConfigError


@dataclass(frozen=True)
class SessionInfo:
    prefill_len: int
    max_context: int
    vocab_size: int
    window: int


class Session(Protocol):
    info: SessionInfo

    def reset(self) -> None: ...

    def prefill(self, tokens: Sequence[int], pos: int) -> np.ndarray: ...  # [n, V]

    def prefill_last(self, tokens: Sequence[int], pos: int) -> np.ndarray: ...  # [V]: the last token's

    def decode(self, token: int, pos: int) -> np.ndarray: ...  # [V]

    def hidden_states(self, tokens: Sequence[int]) -> np.ndarray: ...  # [L + 1, n, hidden], at position 0


def check_room(info: SessionInfo, pos: int, n: int) -> None:
    if n < 1:
        raise ConfigError("nothing to run: empty token list")
    if n > info.prefill_len:
        raise ConfigError(f"{n} tokens exceed the prefill length {info.prefill_len}")
    if pos < 0 or pos + n > info.max_context:
        raise ConfigError(
            f"positions {pos}..{pos + n - 1} exceed the max context {info.max_context}; "
            "export with a larger --max-context"
        )


class BaseSession:
    """The Session protocol over three runtime hooks.

    `_run(tokens [1, T] int32, pos, n, decode)` runs one step on the runtime's own cache and
    returns logits [T, V] (T = the prefill length for a padded chunk, 1 for decode);
    `_hidden(tokens [1, T] int32, n)` returns the residual stream per layer [L + 1, T, hidden]
    for a chunk at position 0 on an empty cache. `pads_prefill = False` passes a prefill chunk at
    its own length (runtimes with a dynamic chunk dimension) instead of padding it.
    """

    info: SessionInfo
    pads_prefill = True

    def reset(self) -> None:
        raise NotImplementedError

    def _run(self, tokens: np.ndarray, pos: int, n: int, decode: bool) -> np.ndarray:
        raise NotImplementedError

    def _hidden(self, tokens: np.ndarray, n: int) -> np.ndarray:
        raise NotImplementedError

    # image prompts (artifacts with image entry points): `encode_image(pixels [1, 3, S, S])` ->
    # soft-token embeddings [tokens, hidden]; `_run_embeddings(embeddings [n, hidden], pos, image)`
    # runs them through the decoder on the session's cache (`image`: one view, its tokens seeing
    # each other) and returns logits [n, V], or [1, V] from a graph that computes the last one's only
    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _run_embeddings(self, embeddings: np.ndarray, pos: int, image: bool) -> np.ndarray:
        raise NotImplementedError

    def prefill_image(self, embeddings: np.ndarray, pos: int, bidirectional: bool = True) -> np.ndarray:
        """One image view's soft-token embeddings [tokens, hidden] at `pos`: logits [tokens, V]
        ([1, V], the last token's, where the runtime's decoder computes only those).
        `bidirectional=False` runs them causally, as a runner that knows no image views does."""
        n = len(embeddings)
        if pos < 0 or pos + n > self.info.max_context:
            raise ConfigError(f"positions {pos}..{pos + n - 1} exceed the max context {self.info.max_context}; "
                              "export with a larger --max-context")
        return np.asarray(self._run_embeddings(embeddings, pos, bidirectional))[:n]

    def _chunk(self, tokens: Sequence[int]) -> np.ndarray:
        width = self.info.prefill_len if self.pads_prefill else len(tokens)
        chunk = np.zeros((1, width), dtype=np.int32)
        chunk[0, :len(tokens)] = np.asarray(tokens, dtype=np.int32)
        return chunk

    def prefill(self, tokens: Sequence[int], pos: int) -> np.ndarray:
        n = len(tokens)
        check_room(self.info, pos, n)
        return np.asarray(self._run(self._chunk(tokens), pos, n, False))[:n]

    def prefill_last(self, tokens: Sequence[int], pos: int) -> np.ndarray:
        """A prefill chunk as a runner runs it, for the last token's logits [V] only (a runtime
        whose graph computes the head for that token alone overrides `_run_last`)."""
        n = len(tokens)
        check_room(self.info, pos, n)
        return np.asarray(self._run_last(self._chunk(tokens), pos, n))

    def _run_last(self, tokens: np.ndarray, pos: int, n: int) -> np.ndarray:
        return self._run(tokens, pos, n, False)[n - 1]

    def decode(self, token: int, pos: int) -> np.ndarray:
        check_room(self.info, pos, 1)
        return np.asarray(self._run(np.array([[int(token)]], dtype=np.int32), pos, 1, True))[0]

    def hidden_states(self, tokens: Sequence[int]) -> np.ndarray:
        n = len(tokens)
        check_room(self.info, 0, n)
        return np.asarray(self._hidden(self._chunk(tokens), n))[:, :n]


class TorchSession(BaseSession):
    """The eager PyTorch model behind the Session protocol (the reference for every format)."""

    def __init__(self, model, prefill_len: int = 128, head: bool = True):
        import torch

        self.model, self.head = model, head  # head=False: run the decoder only (logits come back empty)
        cfg = model.cfg
        self.info = SessionInfo(prefill_len, model.max_context, cfg.vocab_size, cfg.sliding_window)
        self._torch = torch
        self.reset()

    def reset(self) -> None:
        self.cache = self.model.new_cache()

    def _args(self, tokens: np.ndarray, pos: int, n: int):
        torch = self._torch
        return (torch.from_numpy(tokens), torch.tensor([pos], dtype=torch.int32), torch.tensor([n], dtype=torch.int32))

    def _run(self, tokens, pos, n, decode):
        with self._torch.no_grad():
            logits, self.cache = self.model.step(*self._args(tokens, pos, n), self.cache, head=self.head)
        return logits[0].float().numpy() if self.head else np.zeros((tokens.shape[1], 0), np.float32)

    def _hidden(self, tokens, n):
        with self._torch.no_grad():
            _, _, h = self.model.step(*self._args(tokens, 0, n), self.model.new_cache(), hidden=True)
        return h.float().numpy()


# ----------------------------------------------------------------------------------------------
# Loops written once against Session
# ----------------------------------------------------------------------------------------------


def feed(session: Session, ids: Sequence[int], pos: int = 0, schedule: Sequence[int] | None = None
         ) -> Iterator[tuple[int, np.ndarray]]:
    """Run `ids` through the session; yield (start position, logits [n, V]) per call.

    `schedule` is a repeating list of chunk sizes: 1 means a decode step, larger sizes a prefill
    chunk (at most the prefill length). By default every chunk is a full prefill.
    """
    schedule = list(schedule or [session.info.prefill_len])
    i, k = 0, 0
    while i < len(ids):
        size = min(schedule[k % len(schedule)], len(ids) - i)
        k += 1
        if size == 1:
            logits = session.decode(ids[i], pos + i)[None, :]
        else:
            logits = session.prefill(ids[i:i + size], pos + i)
        yield pos + i, logits
        i += size


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0
    seed: int = 0


def _pick(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    if sampling.temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / sampling.temperature
    if sampling.top_k:
        cut = np.partition(z, -sampling.top_k)[-sampling.top_k]
        z = np.where(z >= cut, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    return int(rng.choice(len(p), p=p))


def generate(session: Session, prompt: Sequence[int], max_new_tokens: int,
             stop_ids: Sequence[int] = (), sampling: Sampling = Sampling()) -> Iterator[int]:
    """Stream new token ids: prefill the prompt in chunks, then decode one token at a time."""
    if not prompt:
        raise ConfigError("the prompt is empty")
    session.reset()
    t = session.info.prefill_len
    for i in range(0, len(prompt), t):  # the runner's prefill: only the last token's logits are used
        logits = session.prefill_last(prompt[i:i + t], i)
    yield from continue_from(session, logits, len(prompt), max_new_tokens, stop_ids, sampling)


def continue_from(session: Session, logits: np.ndarray, pos: int, max_new_tokens: int,
                  stop_ids: Sequence[int] = (), sampling: Sampling = Sampling()) -> Iterator[int]:
    """Stream new token ids after a prefill that ended at `pos` with these last logits [V]."""
    rng = np.random.default_rng(sampling.seed)
    token = _pick(logits, sampling, rng)
    for i in range(max_new_tokens):
        yield token
        if token in stop_ids or i == max_new_tokens - 1:
            return
        token = _pick(session.decode(token, pos), sampling, rng)
        pos += 1
