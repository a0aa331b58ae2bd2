"""Loop 2 target clean-up: the fixed, deterministic rules upstream AutoMem applies to a selected
example before fine-tuning (loop2_training_engine/postprocess.py, checked at upstream 1987b8f).

An example is one LOG or PLAN phase as a user/assistant chat. The rules are phase-agnostic, as
upstream's are; what decides is the text of the last assistant message:

* validation: at least two messages, user first, strictly alternating, assistant last, and the last
  message non-empty and holding a DONE tag, an ACTION tag (both case-sensitive) or a memory-op tag
  (any case);
* every assistant message: a ``` fence whose body starts with an op/ACTION/DONE tag is unwrapped,
  and a dangling opening fence at the very end is removed;
* last message with ``<|DONE|>`` (case-sensitive): cut right after the first DONE, kept;
* else with an ACTION block (``<|ACTION|>...<|END|>``, any case): dropped when action-only (no
  memory-op tag anywhere and under 200 characters besides the action blocks); otherwise cut before
  the first ACTION tag and dropped when no memory-op tag is left;
* else kept when it holds a memory-op tag, dropped otherwise;
* kept messages are trimmed after the last op terminator (the END of a complete op block, or a
  DONE tag in any case), and dropped when a ``` fence survives.

Ops are recognised by their tags, as upstream does: SEARCH, READ, TAIL, COUNT, APPEND, WRITE,
CREATE, UPSERT_MAP and DONE, with or without the pipes, in any case. A malformed op (no END) still
counts as an op; it only never terminates one.

One deliberate difference: upstream refuses a whole dataset when its post-checks (``verify``) find
a kept example that still breaks a rule (an ACTION before a DONE, for instance); this automated
loop drops just that example instead, with reason ``post_check:<check>``.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["postprocess", "postprocess_all", "verify", "post_checks", "OP_TAGS", "ACTION_ONLY_CHARS",
           "OK", "BAD_ROLES", "NO_OP_IN_LAST", "ACTION_ONLY", "NO_MEMORY_OP", "FENCE_LEFT", "POST_CHECK"]

# Tags that make a message count as memory use (DONE included: a bare <|DONE|> LOG is kept).
OP_TAGS = ("SEARCH", "READ", "TAIL", "COUNT", "APPEND", "WRITE", "CREATE", "UPSERT_MAP")
# A reply with no op tag and fewer characters than this besides its ACTION blocks is "action-only".
ACTION_ONLY_CHARS = 200

# Reason codes (also the postprocess-stage reasons in review_decisions.jsonl).
OK = "ok"
BAD_ROLES = "bad_alternation"          # upstream: fails validate_conversation's structure checks
NO_OP_IN_LAST = "no_op_in_last_turn"   # upstream: last message empty or without DONE/ACTION/op tag
ACTION_ONLY = "action_only"            # upstream: action_only_filtered
NO_MEMORY_OP = "no_memory_op_after_cut"  # upstream: prose_only_tail_filtered
FENCE_LEFT = "fence_remaining"         # upstream: fence_survived_filtered
POST_CHECK = "post_check"              # ours: upstream would refuse the dataset (see the docstring)


def _open(names: Iterable[str]) -> str:
    return r"<\|?(?:" + "|".join(names) + r")\|?>"


_END = r"<\|?END\|?[>}]"
_ANY_OP_OPEN = re.compile(_open(OP_TAGS + ("DONE",)), re.IGNORECASE)
_OP_BLOCK = re.compile(_open(OP_TAGS) + ".*?" + _END, re.IGNORECASE | re.DOTALL)
_DONE_CS = re.compile(_open(["DONE"]))  # the DONE branch and validation are case-sensitive upstream
_DONE_ANY = re.compile(_open(["DONE"]), re.IGNORECASE)  # ...but as a terminator any case ends an op
_ACTION_CS = re.compile(_open(["ACTION"]))
_ACTION_ANY = re.compile(_open(["ACTION"]), re.IGNORECASE)
_ACTION_BLOCK = re.compile(_open(["ACTION"]) + ".*?" + _END, re.IGNORECASE | re.DOTALL)
# A fence whose first body line starts with a tag: keep the body (up to the closing fence's line).
_TAG_FENCE = re.compile(r"```[a-zA-Z]*[ \t]*\n[ \t]*(" + _open(OP_TAGS + ("ACTION", "DONE")) + r".*?)\n[ \t]*```",
                        re.IGNORECASE | re.DOTALL)
# An opening fence with a language name left dangling at the end of the text.
_DANGLING_FENCE = re.compile(r"\n[ \t]*```[a-zA-Z]+[ \t]*\s*$")


def _has_op(text: str) -> bool:
    return _ANY_OP_OPEN.search(text) is not None


def _unfence(text: str) -> str:
    return _DANGLING_FENCE.sub("", _TAG_FENCE.sub(r"\1", text))


def _trim_tail(text: str) -> tuple[str, bool]:
    """Cut after the last op terminator; (text, whether anything but whitespace went)."""
    ends = [m.end() for m in _OP_BLOCK.finditer(text)] + [m.end() for m in _DONE_ANY.finditer(text)]
    if not ends:
        return text, False
    cut = text[:max(ends)].rstrip()
    return cut, cut != text.rstrip()


def _chat(ex: Mapping) -> Any:
    """An example's messages: ``messages`` (candidates) or ``conversations`` (dataset rows)."""
    return ex["messages"] if "messages" in ex else ex.get("conversations")


def _roles_problem(messages) -> str | None:
    if not isinstance(messages, list) or len(messages) < 2:
        return "fewer than two messages"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            return f"message {i} is not a {{role, content}} object"
        want = "user" if i % 2 == 0 else "assistant"
        if m.get("role") != want:
            return f"message {i} has role {m.get('role')!r}, expected {want!r} (user first, alternating)"
    if messages[-1]["role"] != "assistant":
        return "the last message is not the assistant's"
    return None


def _last_is_usable(text: str) -> bool:
    return bool(text.strip()) and bool(_DONE_CS.search(text) or _ACTION_CS.search(text) or _has_op(text))


def post_checks(text: str) -> list[str]:
    """Names of upstream's post-checks that the final last message fails ([] when clean)."""
    failed = []
    if not _has_op(text):
        failed.append("no_op_last")
    if "```" in text:
        failed.append("plaintext_fence")
    if _ACTION_ANY.search(text):
        failed.append("action_in_last")
    ends = [m.end() for m in _OP_BLOCK.finditer(text)] + [m.end() for m in _DONE_ANY.finditer(text)]
    if ends and text[max(ends):].strip():
        failed.append("post_op_tail")
    return failed


def _clean_last(text: str, edits: list[str]) -> tuple[str | None, str]:
    """The last assistant message after the rules, or (None, reason)."""
    done = _DONE_CS.search(text)
    if done:
        cut = _unfence(text[:done.end()].strip())
        cut, _ = _trim_tail(cut)
        if cut != text.strip():
            edits.append("done_cut")
        return cut, OK
    if _ACTION_BLOCK.search(text):
        if not _has_op(text) and len(_ACTION_BLOCK.sub("", text).strip()) < ACTION_ONLY_CHARS:
            return None, ACTION_ONLY
        before = _ACTION_ANY.search(text)
        cut = _unfence(text[:before.start()].strip())
        if not _has_op(cut):
            return None, NO_MEMORY_OP
        cut, trimmed = _trim_tail(cut)
        edits.append("action_cut")
        if trimmed:
            edits.append("tail_trimmed")
        return cut, OK
    if not _has_op(text):
        return None, ACTION_ONLY  # e.g. an ACTION tag without its END: upstream counts it here
    cut, trimmed = _trim_tail(text)
    if trimmed:
        edits.append("tail_trimmed")
        return cut, OK
    return text, OK  # nothing cut: upstream leaves the message as it was (trailing spaces too)


def postprocess(example: dict) -> tuple[dict | None, str]:
    """Upstream's clean-up of one example: (cleaned copy, "ok") or (None, reason code).

    ``example`` needs ``messages`` (or ``conversations``); its other keys are copied. Earlier
    assistant turns change only by fence unwrapping. The copy gets ``edits``: what changed
    (fence_unwrapped, done_cut, action_cut, tail_trimmed).
    """
    messages = _chat(example)
    if _roles_problem(messages) is not None:
        return None, BAD_ROLES
    if not _last_is_usable(messages[-1]["content"]):
        return None, NO_OP_IN_LAST
    edits: list[str] = []
    msgs = []
    for m in messages:
        content = m["content"]
        if m["role"] == "assistant":
            content = _unfence(content)
            if content != m["content"] and "fence_unwrapped" not in edits:
                edits.append("fence_unwrapped")
        msgs.append({"role": m["role"], "content": content})
    text, reason = _clean_last(msgs[-1]["content"], edits)
    if text is None:
        return None, reason
    if "```" in text:
        return None, FENCE_LEFT
    failed = post_checks(text)
    if failed:
        return None, f"{POST_CHECK}:{failed[0]}"
    msgs[-1]["content"] = text
    key = "messages" if "messages" in example else "conversations"
    out = {k: v for k, v in example.items() if k not in (key, "edits")}
    out[key], out["edits"] = msgs, edits
    return out, OK


def postprocess_all(examples: Iterable[dict]) -> tuple[list[dict], list[tuple[dict, str]]]:
    """(kept, [(example, reason), ...] for the dropped ones)."""
    kept, dropped = [], []
    for ex in examples:
        out, reason = postprocess(ex)
        if out is None:
            dropped.append((ex, reason))
        else:
            kept.append(out)
    return kept, dropped


_CHECK_WORDS = {"no_op_last": "last turn has no memory op", "plaintext_fence": "last turn has a ``` fence",
                "action_in_last": "last turn contains an ACTION",
                "post_op_tail": "text after the last op terminator"}


def verify(examples: Iterable[dict]) -> list[str]:
    """Violations of the post-process guarantees, one string each; [] for postprocess output."""
    problems = []
    for i, ex in enumerate(examples):
        name = ex.get("id", f"#{i}")
        why = _roles_problem(_chat(ex))
        if why is not None:
            problems.append(f"{name}: bad alternation: {why}")
            continue
        problems += [f"{name}: {_CHECK_WORDS[c]}" for c in post_checks(_chat(ex)[-1]["content"])]
    return problems
