"""Memory-op vocabulary and the lenient tag parser.

Ops are inline tags in free model text, e.g. ``<|SEARCH|>notes.txt|wood<|END|>``. Parsing follows
upstream AutoMem exactly: open tags ``<|OP|>``/``<OP>``/``<|OP>``, close tags ``<|END|>``,
``<END>``, ``<|END|}``..., arguments split on the first ``|``, malformed ops silently dropped, and
by default the ops run grouped by type rather than in the order they were written.

Everything here is total: any string parses to a (possibly empty) result and nothing raises.
"""
from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

READ_OPS = ("READ", "SEARCH", "TAIL", "COUNT")
WRITE_OPS = ("APPEND", "WRITE", "CREATE")
CONTROL_OPS = ("DONE", "ACTION")
BUILTIN_OPS = READ_OPS + WRITE_OPS + CONTROL_OPS
# Upstream's execution order; keyed-update ops (nethack_v2's UPSERT_MAP) run between APPEND
# and WRITE.
KEYED_SLOT = "<keyed>"
TYPE_ORDER = ("READ", "SEARCH", "TAIL", "COUNT", "APPEND", KEYED_SLOT, "WRITE", "CREATE")
ORDERS = ("type", "text")
KEY_KINDS = ("coord", "text")
OP_NAME_RE = re.compile(r"[A-Z][A-Z0-9_]{1,31}")

DEFAULT_MAX_ACTION_CHARS = 60
# Results are shown to the model as "── HEADER ──\n<result>" blocks (v0 uses U+2500).
RULE = "\u2500\u2500"

_END_RE = re.compile(r"<\|?END\|?[>}]")
_END_RE_I = re.compile(r"<\|?END\|?[>}]", re.IGNORECASE)
_DONE_RE = re.compile(r"<\|?DONE\|?>")
_ACTION_OPEN_RE = re.compile(r"<\|?ACTION\|?>", re.IGNORECASE)
_XML_ACTION_OPEN_RE = re.compile(r"<ACTION>", re.IGNORECASE)
_XML_ACTION_CLOSE_RE = re.compile(r"</ACTION>", re.IGNORECASE)
_ACTION_COLON_RE = re.compile(r"ACTION:", re.IGNORECASE)
_ACTION_COLON_TAIL_RE = re.compile(r"\s*([^\n]{1,40})\s*(?:\n|$)")
_ACTION_LINE_RE = re.compile(r"[ \t\r\f\v]*ACTION:[ \t\r\f\v]*[^\n]{1,40}", re.IGNORECASE)


@dataclass(frozen=True)
class KeyedOp:
    """A keyed-line update op: replace the line(s) for one key in one file, or add it.

    ``key='coord'`` accepts ``x,y`` or ``(x,y)`` with integers and stores ``(x,y): value``
    (upstream's UPSERT_MAP on dungeon_map.txt); ``key='text'`` accepts any one-line key.
    """

    name: str
    file: str
    key: str = "coord"
    usage: str = ""
    description: str = ""
    result: str = "[Updated {file} entry for {key}]"

    def canonical_key(self, raw: str) -> str | None:
        raw = raw.strip()
        if self.key == "coord":
            parts = raw.strip("()").split(",")
            if len(parts) != 2:
                return None
            try:
                x, y = int(parts[0].strip()), int(parts[1].strip())
            except ValueError:
                return None
            return f"({x},{y})"
        key = " ".join(raw.split())  # one line, single spaces: keys are matched by line prefix
        return key or None


@dataclass(frozen=True)
class OpCall:
    op: str
    args: tuple[str, ...]
    start: int = 0  # offset of the op's open tag in the model text


@dataclass
class Parsed:
    calls: list[OpCall] = field(default_factory=list)
    done: bool = False
    action: str | None = None


def _open_re(name: str, flags: int = 0) -> re.Pattern:
    return re.compile(r"<\|?" + re.escape(name) + r"\|?>", flags)


def tag_spans(text: str, name: str, *, ignore_case: bool = False,
              _ends: list[tuple[int, int]] | None = None) -> list[tuple[int, int, int, int]]:
    """(start, inner_start, inner_end, end) of every ``<|NAME|>...<|END|>`` block.

    Same matches as ``finditer(r'<\\|?NAME\\|?>(.*?)<\\|?END\\|?[>}]', DOTALL)`` but linear
    time: the lazy regex rescans to the end of the text for every unterminated open tag, which is
    quadratic on adversarial model output.
    """
    if _ends is None:
        end_re = _END_RE_I if ignore_case else _END_RE
        _ends = [(m.start(), m.end()) for m in end_re.finditer(text)]
    starts = [s for s, _ in _ends]
    found: list[tuple[int, int, int, int]] = []
    resume = 0
    for m in _open_re(name, re.IGNORECASE if ignore_case else 0).finditer(text):
        if m.start() < resume:
            continue  # inside the previous match, which finditer would have consumed
        i = bisect_left(starts, m.end())
        if i == len(starts):
            break  # no close tag after this open, hence none after any later one either
        found.append((m.start(), m.end(), starts[i], _ends[i][1]))
        resume = _ends[i][1]
    return found


def find_tagged(text: str, name: str, *, ignore_case: bool = False,
                _ends: list[tuple[int, int]] | None = None) -> list[tuple[int, str]]:
    """(start, inner text) for every ``<|NAME|>...<|END|>`` block, in text order."""
    return [(s, text[a:b]) for s, a, b, _ in tag_spans(text, name, ignore_case=ignore_case,
                                                        _ends=_ends)]


def _split2(content: str) -> tuple[str, str] | None:
    parts = content.split("|", 1)
    if len(parts) != 2:
        return None
    return parts[0].strip(), parts[1].strip()


def _args_for(op: str, content: str, keyed: KeyedOp | None) -> tuple[str, ...] | None:
    """Upstream's per-op argument rules; None means the op is silently dropped."""
    if op in ("READ", "CREATE"):
        name = content.strip()
        return (name,) if name else None
    pair = _split2(content)
    if pair is None:
        return None
    first, second = pair
    if not first:
        return None
    if op == "WRITE":
        return (first, second)  # empty content is allowed: it empties the file
    if not second:
        return None
    if op == "TAIL":
        try:
            return (first, str(int(second)))
        except ValueError:
            return None
    if keyed is not None:
        key = keyed.canonical_key(first)
        return (key, second) if key else None
    return (first, second)


def extract_action(text: str, max_chars: int = DEFAULT_MAX_ACTION_CHARS) -> str | None:
    """The committed game action, trying upstream's three forms in turn.

    1. ``<|ACTION|>x<|END|>`` (lenient tags), 2. ``<ACTION>x</ACTION>``, 3. a line ``ACTION: x``
    (at most 40 characters). Each form contributes its first match only; a match that is empty or
    not shorter than ``max_chars`` falls through to the next form.
    """
    candidates: list[str] = []
    tagged = find_tagged(text, "ACTION", ignore_case=True)
    if tagged:
        candidates.append(tagged[0][1])
    m_open = _XML_ACTION_OPEN_RE.search(text)
    if m_open:
        m_close = _XML_ACTION_CLOSE_RE.search(text, m_open.end())
        if m_close:
            candidates.append(text[m_open.end():m_close.start()])
    colon = _action_colon(text)
    if colon is not None:
        candidates.append(colon)
    for cand in candidates:
        cand = cand.strip()
        if cand and len(cand) < max_chars:
            return cand
    return None


def _action_colon(text: str) -> str | None:
    # Equivalent to re.search(r'(?:^|\n)\s*ACTION:\s*([^\n]{1,40})\s*(?:\n|$)', re.I) without the
    # quadratic rescans over long whitespace runs.
    for m in _ACTION_COLON_RE.finditer(text):
        before = text[:m.start()]
        lead = before.rstrip()
        gap = before[len(lead):]
        if lead and "\n" not in gap:
            continue  # something other than whitespace on the same line before "ACTION:"
        tail = _ACTION_COLON_TAIL_RE.match(text, m.end())
        if tail:
            return tail.group(1)
    return None


def strip_action(text: str) -> str:
    """The text with every committed-action form removed (two-model handoff)."""
    out, pos = [], 0
    for start, _, _, end in tag_spans(text, "ACTION", ignore_case=True):
        out.append(text[pos:start])
        pos = end
    out.append(text[pos:])
    text = re.sub(r"<ACTION>.*?</ACTION>", "", "".join(out), flags=re.DOTALL | re.IGNORECASE)
    lines = [ln for ln in text.split("\n") if not _ACTION_LINE_RE.fullmatch(ln)]
    return "\n".join(lines).strip()


def has_done(text: str) -> bool:
    return _DONE_RE.search(text) is not None


def parse(text: str, ops: Collection[str], keyed: Mapping[str, KeyedOp] | None = None, *,
          order: str = "type", max_action_chars: int = DEFAULT_MAX_ACTION_CHARS) -> Parsed:
    """Parse model text for the ops in ``ops`` (one phase's vocabulary).

    Ops not in ``ops`` are ignored, as upstream's PLAN parser ignores write ops. ``DONE`` and
    ``ACTION`` are reported as flags rather than calls.
    """
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    keyed = dict(keyed or {})
    enabled = set(ops)
    ends = [(m.start(), m.end()) for m in _END_RE.finditer(text)]
    groups: list[list[OpCall]] = []
    for slot in TYPE_ORDER:
        names = sorted(n for n in keyed if n in enabled) if slot == KEYED_SLOT else [slot]
        for name in names:
            if name not in enabled:
                continue
            spec = keyed.get(name) if slot == KEYED_SLOT else None
            group = []
            for start, inner in find_tagged(text, name, _ends=ends):
                args = _args_for(name, inner, spec)
                if args is not None:
                    group.append(OpCall(name, args, start))
            groups.append(group)
    calls = [c for g in groups for c in g]
    if order == "text":
        calls.sort(key=lambda c: c.start)
    parsed = Parsed(calls=calls)
    parsed.done = "DONE" in enabled and has_done(text)
    if "ACTION" in enabled:
        parsed.action = extract_action(text, max_action_chars)
    return parsed


def header_for(call: OpCall) -> str:
    """Upstream's result header for one op, e.g. ``SEARCH notes.txt for 'wood'``."""
    a = call.args
    if call.op == "READ":
        return f"READ {a[0]}"
    if call.op == "SEARCH":
        return f"SEARCH {a[0]} for '{a[1]}'"
    if call.op == "TAIL":
        return f"TAIL {a[0]} (last {a[1]} lines)"
    if call.op == "COUNT":
        return f"COUNT {a[0]} for '{a[1]}'"
    if call.op == "APPEND":
        return f"APPEND to {a[0]}"
    if call.op == "WRITE":
        return f"WRITE to {a[0]}"
    if call.op == "CREATE":
        return f"CREATE {a[0]}"
    return f"{call.op} {a[0]}" if a else call.op
