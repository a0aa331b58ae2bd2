"""SFT data for Loop 2: sharegpt conversations -> token ids + loss masks -> padded, bucketed batches.

One example is one phase (LOG or PLAN) of one env step: `{"conversations": [{"role", "content"}, ...],
"id"?: ..., "meta"?: ...}` with roles system / user / assistant / tool (tool = a tool-result turn).

Rendering matches inference exactly: the tokens before assistant turn k are
`apply_chat_template(tok, messages[:k])` (generation prompt included), and the turn's target is
`encode(content) + <|im_end|>` (the `<|im_start|>assistant\\n` header is prompt). The sequence is the
prompt of the last assistant turn followed by its target; every earlier assistant turn whose rendering
inside that prompt is exactly `prefix_k + encode(content_k) + <|im_end|>` is a target too
(`loss_on="all"`, LLaMA-Factory's default). An earlier turn the template renders otherwise (content that
starts with a newline merges with the header's newline; Qwen3 strips `<think>` blocks from history) cannot
match both its own inference prompt and the later ones, so it stays masked and is counted as `unaligned`.

Truncation (`on_overlong="truncate"`), applied only to examples longer than `cutoff_len`:
  1. if the last turn's target (content + <|im_end|>) leaves no room for one prompt token, the example is
     dropped (reason `target_exceeds_cutoff`);
  2. earlier exchanges (an assistant turn with the tool/user turns answering it) are removed oldest first
     and the shorter conversation is re-rendered with the template, until it fits: what is left is still
     exactly the template's rendering of a (shorter) conversation;
  3. if only the opening prompt and the last turn are left and it is still too long, tokens are cut from
     the middle of the prompt (its first half and its last half, with the assistant header, are kept).
The last turn's target is never cut, and masks only ever mark assistant tokens.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections import Counter
from typing import Any

import numpy as np

from automem_jax import storage
from automem_jax.models.tokenizer import apply_chat_template

ROLES = ("system", "user", "assistant", "tool")
DATA_FILE = "data.jsonl"
MANIFEST_FILE = "manifest.json"
FORMAT = "automem_jax.sft/1"
_CHUNK_BATCHES = 50  # length bucketing sorts within shuffled chunks of this many batches


class DataError(ValueError):
    """A training example (or a saved dataset) is malformed; the message names which and why."""


# ---- config ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DataConfig:
    cutoff_len: int = 16384          # max tokens per example (LLaMA-Factory cutoff_len upstream)
    loss_on: str = "all"             # "all": every assistant turn is a target; "last": only the last one
    bucket_multiple: int = 128       # batch lengths are multiples of this
    bucket_ladder: bool = True       # lengths only on m*{1,2,3,4,6,8,12,..}: few compiled shapes, <=1/3 padding
    seed: int = 0                    # shuffling seed; epoch e uses default_rng((seed, e))
    on_overlong: str = "truncate"    # "truncate" (see module doc) or "drop" examples over cutoff_len
    chat_template_kwargs: dict = dataclasses.field(default_factory=dict)  # same as the inference Engine's

    def __post_init__(self):
        def bad(field, expected):
            raise ValueError(f"DataConfig.{field}: expected {expected}, got {getattr(self, field)!r}")

        if not _is_int(self.cutoff_len) or self.cutoff_len < 2:
            bad("cutoff_len", "an int >= 2")
        if self.loss_on not in ("all", "last"):
            bad("loss_on", "'all' or 'last'")
        if not _is_int(self.bucket_multiple) or self.bucket_multiple < 1:
            bad("bucket_multiple", "an int >= 1")
        if not isinstance(self.bucket_ladder, bool):
            bad("bucket_ladder", "a bool")
        if not _is_int(self.seed) or self.seed < 0:
            bad("seed", "an int >= 0")
        if self.on_overlong not in ("truncate", "drop"):
            bad("on_overlong", "'truncate' or 'drop'")
        if not isinstance(self.chat_template_kwargs, dict):
            bad("chat_template_kwargs", "a dict")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DataConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"DataConfig: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def bucket(n: int, multiple: int) -> int:
    """`n` rounded up to a multiple of `multiple` (at least one multiple)."""
    return max(1, math.ceil(n / multiple)) * multiple


def length_bucket(n: int, cfg: DataConfig) -> int:
    """Padded batch length for a longest row of `n` tokens, never above bucket(cutoff_len)."""
    m = cfg.bucket_multiple
    cap = bucket(cfg.cutoff_len, m)
    if not cfg.bucket_ladder:
        return min(bucket(n, m), cap)
    units = max(1, math.ceil(n / m))
    step = 1
    while True:  # ladder 1,2,3,4,6,8,12,16,...: each rung is 2^i or 3*2^(i-1)
        for rung in (step, 3 * step // 2) if step >= 2 else (step,):
            if rung >= units:
                return min(rung * m, cap)
        step *= 2


def max_target_positions(batch: dict, multiple: int = 128) -> int:
    """Most target tokens in any row of a batch, rounded up to `multiple` (size of the target gather)."""
    per_row = np.asarray(batch["loss_mask"]).sum(axis=1)
    return bucket(int(per_row.max(initial=0)), multiple)


# ---- one example ----------------------------------------------------------------------------------


@dataclasses.dataclass
class TokenizedExample:
    ids: np.ndarray                  # int32 [L]
    loss_mask: np.ndarray            # bool [L]; True where the token is a target (the trainer shifts)
    index: int = -1                  # position in the input list
    id: Any = None                   # the example's "id" field, else its index
    target_turns: int = 0            # assistant turns that carry loss
    truncated: bool = False
    removed_turns: int = 0           # earlier assistant turns removed by truncation
    unaligned_turns: int = 0         # earlier assistant turns left masked (see module doc)
    drop_reason: str | None = None   # set when the example cannot be kept (ids then empty)
    example: dict | None = None      # the source example, for save()

    @property
    def length(self) -> int:
        return int(self.ids.shape[0])

    @property
    def num_targets(self) -> int:
        return int(self.loss_mask.sum())

    @property
    def stats(self) -> dict:
        return {"length": self.length, "num_targets": self.num_targets, "target_turns": self.target_turns,
                "truncated": self.truncated, "removed_turns": self.removed_turns,
                "unaligned_turns": self.unaligned_turns, "drop_reason": self.drop_reason}


def _special_ids(tok) -> tuple[int, str, int]:
    """(end-of-turn id, its text, pad id)."""
    eot_text = "<|im_end|>"
    eot = tok.convert_tokens_to_ids(eot_text)
    if eot is None or eot == tok.unk_token_id:
        eot_text, eot = tok.eos_token, tok.eos_token_id
    if eot is None:
        raise ValueError("tokenizer has neither <|im_end|> nor an eos token to end assistant turns")
    pad = tok.pad_token_id if tok.pad_token_id is not None else eot
    return int(eot), eot_text, int(pad)


def _label(index, ex_id) -> str:
    return f"example {index}" + (f" (id={ex_id!r})" if ex_id is not None and ex_id != index else "")


def validate_conversation(conversation, where: str = "example", eot_text: str = "<|im_end|>") -> list[dict]:
    """Checks a sharegpt conversation; returns it as plain {role, content} messages or raises DataError."""
    if not isinstance(conversation, list):
        raise DataError(f"{where}: 'conversations' must be a list of messages, got {type(conversation).__name__}")
    if not conversation:
        raise DataError(f"{where}: empty conversation")
    msgs = []
    for i, m in enumerate(conversation):
        if not isinstance(m, dict):
            raise DataError(f"{where}: message {i} must be a dict with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: message {i} has role {role!r}; expected one of {list(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{where}: message {i} ({role}) content must be a string, got {type(content).__name__}")
        if role == "system" and i != 0:
            raise DataError(f"{where}: message {i} is a system message; only the first message may be system")
        if role == "assistant":
            prev = msgs[-1]["role"] if msgs else None
            if prev not in ("user", "tool"):
                raise DataError(f"{where}: message {i} (assistant) must follow a user or tool turn, "
                                f"not {prev or 'the start'}")
            if not content.strip():
                raise DataError(f"{where}: message {i} (assistant) has empty content")
            if eot_text in content:
                raise DataError(f"{where}: message {i} (assistant) contains the end-of-turn token {eot_text!r}")
        msgs.append({"role": role, "content": content})
    first = 1 if msgs[0]["role"] == "system" else 0
    if first >= len(msgs) or msgs[first]["role"] != "user":
        raise DataError(f"{where}: the first non-system message must be a user turn")
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{where}: no assistant turn (nothing to train on)")
    if msgs[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message must be an assistant turn, got {msgs[-1]['role']}")
    return msgs


def _render(tok, msgs: list[dict], cfg: DataConfig, eot: int):
    """Untruncated ids/mask plus (target starts, aligned count, unaligned count, last target length)."""
    kw = cfg.chat_template_kwargs
    turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    prompt = apply_chat_template(tok, msgs[:turns[-1]], **kw)
    target = tok.encode(msgs[-1]["content"], add_special_tokens=False) + [eot]
    ids = np.asarray(prompt + target, np.int32)
    mask = np.zeros(len(ids), bool)
    mask[len(prompt):] = True
    starts, aligned, unaligned = [], 1, 0
    for k in turns[:-1]:
        prefix = apply_chat_template(tok, msgs[:k], **kw) if cfg.loss_on == "all" else None
        if prefix is None:
            starts.append(None)
            continue
        start = len(prefix)
        starts.append(start)
        want = tok.encode(msgs[k]["content"], add_special_tokens=False) + [eot]
        if prompt[:start] == prefix and prompt[start:start + len(want)] == want:
            mask[start:start + len(want)] = True
            aligned += 1
        else:
            unaligned += 1
    starts.append(len(prompt))
    return ids, mask, starts, aligned, unaligned, len(target)


def tokenize_conversation(tok, conversation, cfg: DataConfig | None = None, *, strict: bool = False,
                          index: int = -1) -> TokenizedExample:
    """Tokens + loss mask of one example (a dict with 'conversations', or the message list itself).

    An example that cannot be kept within cutoff_len comes back with `drop_reason` set and empty
    arrays, or raises DataError with `strict=True`. Malformed input always raises DataError.
    """
    cfg = cfg or DataConfig()
    eot, eot_text, _ = _special_ids(tok)
    example = conversation if isinstance(conversation, dict) else {"conversations": conversation}
    ex_id = example.get("id", index)
    where = _label(index, ex_id)
    if "conversations" not in example:
        raise DataError(f"{where}: missing 'conversations' (keys: {sorted(example)})")
    msgs = validate_conversation(example["conversations"], where, eot_text)

    def out(ids, mask, **kw):
        return TokenizedExample(ids=ids, loss_mask=mask, index=index, id=ex_id, example=example, **kw)

    def drop(reason, detail):
        if strict:
            raise DataError(f"{where}: {detail}")
        return out(np.zeros(0, np.int32), np.zeros(0, bool), drop_reason=reason)

    ids, mask, starts, aligned, unaligned, tlen = _render(tok, msgs, cfg, eot)
    if len(ids) <= cfg.cutoff_len:
        return out(ids, mask, target_turns=aligned, unaligned_turns=unaligned)
    if cfg.on_overlong == "drop":
        return drop("overlong", f"{len(ids)} tokens > cutoff_len {cfg.cutoff_len} (on_overlong='drop')")
    if tlen >= cfg.cutoff_len:
        return drop("target_exceeds_cutoff", f"last assistant target has {tlen} tokens; cutoff_len "
                                             f"{cfg.cutoff_len} leaves no room for a prompt")

    # Step 2: remove the oldest exchanges. Guess how many from the token spans, then re-render to be exact.
    turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    n_earlier = len(turns) - 1
    d = 1
    if n_earlier and None not in starts:
        spans, excess, d = np.diff(starts), len(ids) - cfg.cutoff_len, 0
        while d < n_earlier and excess > 0:
            excess -= int(spans[d])
            d += 1
        d = max(d, 1)
    while d <= n_earlier:
        reduced = msgs[:turns[0]] + msgs[turns[d]:]
        ids, mask, _, aligned, unaligned, _ = _render(tok, reduced, cfg, eot)
        if len(ids) <= cfg.cutoff_len:
            return out(ids, mask, target_turns=aligned, unaligned_turns=unaligned, truncated=True,
                       removed_turns=d)
        d += 1
    # Step 3: only the opening prompt and the last turn are left; cut the middle of the prompt.
    prompt_len = len(ids) - tlen
    keep = cfg.cutoff_len - tlen
    head = keep // 2
    ids = np.concatenate([ids[:head], ids[prompt_len - (keep - head):]])
    mask = np.concatenate([np.zeros(keep, bool), np.ones(tlen, bool)])
    return out(ids, mask, target_turns=1, unaligned_turns=0, truncated=True, removed_turns=n_earlier)


# ---- dataset --------------------------------------------------------------------------------------


def _hash(items: list[TokenizedExample]) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(np.int64(it.length).tobytes())
        h.update(it.ids.astype("<i4").tobytes())
        h.update(it.loss_mask.astype(np.uint8).tobytes())
    return "sha256:" + h.hexdigest()


class SFTDataset:
    """Tokenized examples with a manifest, deterministic bucketed batches, save/load and split."""

    def __init__(self, items: list[TokenizedExample], tok, cfg: DataConfig, source: str = "",
                 raw: list[dict] | None = None, dropped: dict[str, int] | None = None):
        self.items = items
        self.tok = tok
        self.cfg = cfg
        self.source = source
        self.raw = raw if raw is not None else [it.example for it in items]  # what save() writes
        self.pad_id = _special_ids(tok)[2]
        self._lengths = np.asarray([it.length for it in items], np.int64)
        self._plan_cache: dict[tuple[int, int], list[np.ndarray]] = {}
        self.manifest = self._make_manifest(dropped or {})

    def __len__(self) -> int:
        return len(self.items)

    def _make_manifest(self, dropped: dict[str, int]) -> dict:
        lengths = self._lengths
        return {
            "format": FORMAT,
            "source": self.source,
            "tokenizer": str(getattr(self.tok, "name_or_path", "")),
            "vocab_size": len(self.tok),
            "cutoff_len": self.cfg.cutoff_len,
            "loss_on": self.cfg.loss_on,
            "config": self.cfg.to_dict(),
            "counts": {
                "examples_in": len(self.raw),
                "kept": len(self.items),
                "dropped": dict(sorted(dropped.items())),
                "truncated": sum(it.truncated for it in self.items),
                "target_turns": sum(it.target_turns for it in self.items),
                "removed_turns": sum(it.removed_turns for it in self.items),
                "unaligned_turns": sum(it.unaligned_turns for it in self.items),
            },
            "tokens": {
                "total": int(lengths.sum()),
                "target": int(sum(it.num_targets for it in self.items)),
                "max_len": int(lengths.max(initial=0)),
                "mean_len": float(lengths.mean()) if len(lengths) else 0.0,
            },
            "hash": _hash(self.items),
        }

    # -- batches --
    def num_batches(self, batch_size: int) -> int:
        if not _is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
        return math.ceil(len(self.items) / batch_size)

    def epoch_plan(self, epoch: int, batch_size: int) -> list[np.ndarray]:
        """Example indices of each batch of an epoch: shuffled, length-grouped in chunks, batches shuffled."""
        key = (epoch, batch_size)
        if key not in self._plan_cache:
            rng = np.random.default_rng((self.cfg.seed, epoch))
            perm = rng.permutation(len(self.items))
            chunk = _CHUNK_BATCHES * batch_size  # a multiple of batch_size: only the last batch is short
            batches = []
            for c in range(0, len(perm), chunk):
                part = perm[c:c + chunk]
                part = part[np.argsort(-self._lengths[part], kind="stable")]
                batches += [part[b:b + batch_size] for b in range(0, len(part), batch_size)]
            order = rng.permutation(len(batches))
            if len(self._plan_cache) >= 2:  # a trainer only needs the current (and maybe next) epoch
                self._plan_cache.pop(next(iter(self._plan_cache)))
            self._plan_cache[key] = [batches[i] for i in order]
        return self._plan_cache[key]

    def batch_at(self, step: int, batch_size: int) -> dict:
        """Batch `step` (counted across epochs): a pure function of (seed, step, batch_size).

        Right-padded to a bucketed length T; a short last batch is filled with rows that have no
        targets and no attended tokens (example_index -1).
        """
        if not self.items:
            raise DataError(f"dataset {self.source!r} is empty: no batches")
        if not _is_int(step) or step < 0:
            raise ValueError(f"step: expected an int >= 0, got {step!r}")
        nb = self.num_batches(batch_size)
        rows = self.epoch_plan(step // nb, batch_size)[step % nb]
        T = length_bucket(int(self._lengths[rows].max()), self.cfg)
        ids = np.full((batch_size, T), self.pad_id, np.int32)
        loss = np.zeros((batch_size, T), bool)
        attn = np.zeros((batch_size, T), bool)
        index = np.full(batch_size, -1, np.int64)
        for r, i in enumerate(rows):
            it = self.items[i]
            ids[r, :it.length] = it.ids
            loss[r, :it.length] = it.loss_mask
            attn[r, :it.length] = True
            index[r] = it.index
        return {"input_ids": ids, "loss_mask": loss, "attention_mask": attn,
                "num_targets": int(loss.sum()), "example_index": index}

    # -- persistence --
    def save(self, path: str) -> None:
        """`path/data.jsonl` (source examples, one per line) and `path/manifest.json`; local or gs://."""
        lines = "".join(json.dumps(ex, ensure_ascii=False) + "\n" for ex in self.raw)
        storage.write_text(storage.join(path, DATA_FILE), lines)
        # manifest last: its presence marks a complete dataset folder
        storage.write_text(storage.join(path, MANIFEST_FILE), json.dumps(self.manifest, indent=2) + "\n")

    @classmethod
    def load(cls, path: str, tok, cfg: DataConfig | None = None) -> SFTDataset:
        """Re-tokenizes `path/data.jsonl` and checks the token hash against the manifest."""
        mpath, dpath = storage.join(path, MANIFEST_FILE), storage.join(path, DATA_FILE)
        absent = object()
        manifest = storage.read_json(mpath, error=DataError, default=absent)
        if manifest is absent:
            raise DataError(f"{mpath}: no manifest (not a saved SFT dataset, or an unfinished save)")
        if manifest.get("format") != FORMAT:
            raise DataError(f"{mpath}: format {manifest.get('format')!r}, expected {FORMAT!r}")
        cfg = cfg or DataConfig.from_dict(manifest["config"])
        examples = []
        for n, line in enumerate(storage.read_text(dpath).splitlines(), 1):
            if not line.strip():
                continue
            try:
                examples.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{dpath}:{n}: not valid JSON ({e})") from None
        ds = build_dataset(examples, tok, cfg, source=manifest.get("source", ""))
        if ds.manifest["hash"] != manifest["hash"]:
            raise DataError(
                f"{path}: token hash {ds.manifest['hash']} does not match the manifest's {manifest['hash']} "
                f"(tokenizer now {ds.manifest['tokenizer']!r}, vocab {ds.manifest['vocab_size']}; saved with "
                f"{manifest.get('tokenizer')!r}, vocab {manifest.get('vocab_size')}; or a different config "
                f"or edited data)")
        return ds

    def split(self, eval_fraction: float, seed: int = 0) -> tuple[SFTDataset, SFTDataset]:
        """Deterministic (train, eval) split of the kept examples; both keep the original order."""
        if not 0.0 <= eval_fraction < 1.0:
            raise ValueError(f"eval_fraction: expected 0 <= x < 1, got {eval_fraction!r}")
        n = len(self.items)
        n_eval = int(round(n * eval_fraction))
        if eval_fraction > 0 and n >= 2:
            n_eval = min(max(n_eval, 1), n - 1)  # a requested split always leaves both sides non-empty
        chosen = np.zeros(n, bool)
        chosen[np.random.default_rng(seed).permutation(n)[:n_eval]] = True
        train = [it for it, c in zip(self.items, chosen) if not c]
        evals = [it for it, c in zip(self.items, chosen) if c]
        return (SFTDataset(train, self.tok, self.cfg, f"{self.source}[train]"),
                SFTDataset(evals, self.tok, self.cfg, f"{self.source}[eval]"))


def build_dataset(examples: list[dict], tok, cfg: DataConfig | None = None, source: str = "", *,
                  strict: bool = False) -> SFTDataset:
    """Tokenizes every example; overlong ones are truncated or dropped (counted by reason in the manifest)."""
    cfg = cfg or DataConfig()
    if not isinstance(examples, list):
        raise DataError(f"{source or 'dataset'}: expected a list of examples, got {type(examples).__name__}")
    items, dropped = [], Counter()
    for i, ex in enumerate(examples):
        if not isinstance(ex, dict):
            raise DataError(f"example {i}: expected a dict with 'conversations', got {type(ex).__name__}")
        it = tokenize_conversation(tok, ex, cfg, strict=strict, index=i)
        if it.drop_reason:
            dropped[it.drop_reason] += 1
        else:
            items.append(it)
    return SFTDataset(items, tok, cfg, source, raw=list(examples), dropped=dict(dropped))
