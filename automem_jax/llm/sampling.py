"""Sampling: a request's parameters, the checkpoint's defaults, and the jitted token choice.

`SamplingParams` is what a request asks for (unset fields come from the checkpoint's
generation_config.json via `generation_defaults`, else neutral values); `sampling_inputs` turns a
batch's parameters into the per-row arrays the jitted step takes; `penalize` and `sample` run inside
it; `hits_stop` / `cut_at_stop` end a reply at a stop string.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

# Sampling fields a request may leave unset; the engine fills them from the checkpoint's
# generation_config.json (vLLM's default) or these neutral values.
NEUTRAL_SAMPLING = {"top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}


@dataclasses.dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float | None = None  # None: the engine's default (generation_config.json, else 1.0)
    top_k: int | None = None  # 0 = no top-k cut; None: the engine's default
    max_tokens: int = 256
    stop: list[str] | None = None  # generation ends at the first of these strings
    seed: int | None = None  # None: derived from the engine seed and a request counter
    include_stop_str_in_output: bool = False
    repetition_penalty: float | None = None  # > 1 discourages tokens already in prompt or reply

    def validate(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty is not None and not (self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.stop is not None and (not isinstance(self.stop, list) or
                                      not all(isinstance(s, str) and s for s in self.stop)):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")

    def resolved(self, defaults: dict) -> "SamplingParams":
        p = dataclasses.replace(self)
        for name, neutral in NEUTRAL_SAMPLING.items():
            if getattr(p, name) is None:
                setattr(p, name, defaults.get(name, neutral))
        return p

    @property
    def mode(self) -> str:
        if self.temperature <= 0:
            return "greedy"
        return "filtered" if ((self.top_k or 0) > 0 or (self.top_p or 1.0) < 1) else "sample"


def batch_mode(params) -> str:
    modes = {p.mode for p in params}
    return "filtered" if "filtered" in modes else "sample" if "sample" in modes else "greedy"


def generation_defaults(folder: str) -> dict:
    """top_p / top_k / repetition_penalty from a checkpoint's generation_config.json ({} if none)."""
    from automem_jax import storage
    path = storage.join(folder, "generation_config.json")
    try:
        d = storage.read_json(path, default={})
    except (OSError, ValueError) as e:
        log.warning("%s: unreadable (%s); using neutral sampling defaults", path, e)
        return {}
    out = {}
    for name, kind in (("top_p", float), ("top_k", int), ("repetition_penalty", float)):
        if isinstance(d.get(name), (int, float)) and not isinstance(d.get(name), bool):
            out[name] = kind(d[name])
    return out



_NEG = -1e30


def sample(logits, keys, steps, temp, top_p, top_k, mode: str):
    """One token per row; temperature 0 rows are greedy. `mode` (static) skips work no row needs:
    "greedy" draws no random numbers, "sample" skips the sort that top-k / top-p need."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if mode == "greedy":
        return greedy
    filtered = mode == "filtered"
    x = logits / jnp.maximum(temp, 1e-6)[:, None]
    if filtered:
        V = x.shape[-1]
        srt = -jnp.sort(-x, axis=-1)
        k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
        kth = jnp.take_along_axis(srt, (k - 1)[:, None], axis=-1)
        srt = jnp.where(srt < kth, _NEG, srt)
        probs = jax.nn.softmax(srt, axis=-1)
        cum = jnp.cumsum(probs, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (at least one token).
        keep = jnp.maximum(jnp.sum((cum - probs) < top_p[:, None], axis=-1), 1)
        thr = jnp.take_along_axis(srt, (keep - 1)[:, None], axis=-1)
        x = jnp.where(x < jnp.maximum(thr, kth), _NEG, x)
    sampled = jax.vmap(lambda key, s, row: jax.random.categorical(jax.random.fold_in(key, s), row))(keys, steps, x)
    return jnp.where(temp <= 0, greedy, sampled).astype(jnp.int32)


def penalize(logits, seen, penalty):
    """Repetition penalty as transformers / vLLM apply it: logits of tokens already in the prompt
    or the reply are divided by `penalty` when positive, multiplied when negative.
    seen [B, U]: token ids (-1 = padding)."""
    B, V = logits.shape
    rows = jnp.broadcast_to(jnp.arange(B)[:, None], seen.shape)
    mask = jnp.zeros((B, V), bool).at[rows, jnp.where(seen < 0, V, seen)].set(True, mode="drop")
    p = penalty[:, None]
    return jnp.where(mask, jnp.where(logits > 0, logits / p, logits * p), logits)


def sampling_inputs(rows: Sequence, seen_width: Callable[[int], int]):
    """The per-row sampling arrays of a padded batch: keys, temp, top_p, top_k, penalty, seen (the
    distinct tokens of rows with a repetition penalty, -1 padded to `seen_width(most seen)`), and the
    static mode / use_penalty flags. `rows`: objects with .params, .key, .seen, or None for padding."""
    B = len(rows)
    keys = np.zeros((B, 2), np.uint32)
    temp = np.zeros((B,), np.float32)
    top_p = np.ones((B,), np.float32)
    top_k = np.zeros((B,), np.int32)
    penalty = np.ones((B,), np.float32)
    for r, s in enumerate(rows):
        if s is None:
            continue
        p = s.params
        keys[r], temp[r], top_p[r], top_k[r], penalty[r] = s.key, p.temperature, p.top_p, p.top_k, \
            p.repetition_penalty
    live = [s for s in rows if s is not None]
    mode = batch_mode(s.params for s in live)
    use_penalty = any(s.params.repetition_penalty != 1.0 for s in live)
    if use_penalty:
        width = seen_width(max(len(s.seen) for s in live))
        seen = np.full((B, width), -1, np.int32)
        for r, s in enumerate(rows):
            if s is not None and s.params.repetition_penalty != 1.0:
                seen[r, :len(s.seen)] = sorted(s.seen)
    else:
        seen = np.full((B, 1), -1, np.int32)
    return keys, temp, top_p, top_k, penalty, seen, mode, use_penalty


def hits_stop(decode: Callable[[list[int]], str], generated: list[int], stop: list[str]) -> bool:
    """Whether the reply's tail now holds a stop string."""
    longest = max(len(x) for x in stop)
    # A token is at least one character, so the last `longest` tokens cover any new match.
    tail = decode(generated[-(longest + 1):])
    return any(x in tail for x in stop)


def cut_at_stop(text: str, stop: list[str] | None, include: bool) -> str:
    """The reply up to its first stop string (with it when `include`)."""
    hits = [(text.find(x), x) for x in (stop or ()) if x in text]
    if not hits:
        return text
    pos, s = min(hits)
    return text[: pos + (len(s) if include else 0)]
