"""The critic's reply formats, shared by every critic (hosted or offline) and every loop that reads
them.

* A proposal (Loop 1) is a reply in ``PROPOSAL_FORMAT``: a ```yaml block holding the complete revised
  memory structure, then a ``Rationale:`` section. ``parse_proposal`` reads one (``ProposalError``
  says what is wrong), ``format_proposal`` writes one, ``ProposalReply`` carries one with its
  transcript and usage.
* A judgement (Loop 2) is a JSON list of ``{id, decision, reason}`` objects. ``find_json_list`` is
  the one extraction of that list from a reply; ``parse_decisions`` is the strict reading of it
  (``JudgeError``), and the hosted critic's judge reads it leniently (a bad item rejects only its
  candidate).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import yaml

from automem_jax.memory.structure import MemoryStructure, StructureError

# --------------------------------------------------------------------------------------------
# Proposals (Loop 1)

PROPOSAL_FORMAT = """\
Answer in this format, and only this format:

1. Optionally, a short analysis in plain text.
2. ONE fenced block that starts with ```yaml and holds the COMPLETE revised memory structure
   document (every top-level section: schema_version, name, env, version, parent, notes, prompts,
   files, ops, limits, pruning, context, budgets, action), not a diff or a fragment.
3. A section that starts with the line "Rationale:" followed by a few lines explaining each change
   and the trace evidence behind it.
"""

_FENCE_RE = re.compile(r"^[ \t]*```[ \t]*([A-Za-z0-9_+-]*)[ \t]*$", re.MULTILINE)
_RATIONALE_RE = re.compile(r"^[ \t#*_>-]*rationale[ \t*_]*:?[ \t*_]*(.*)$", re.IGNORECASE | re.MULTILINE)


class ProposalError(ValueError):
    """A critic's reply holds no usable structure document; the message says what is wrong."""


@dataclass
class ProposalReply:
    text: str  # the critic's answer, in PROPOSAL_FORMAT
    rationale: str
    transcript: list[dict] = field(default_factory=list)
    usage: dict = field(default_factory=dict)
    edits: list[str] = field(default_factory=list)  # heuristic only: ids of the edits applied

    def parse(self, *, validate: bool = False) -> tuple[dict, str]:
        return parse_proposal(self.text, validate=validate)


def format_proposal(doc: dict, rationale: str, analysis: str = "") -> str:
    """A proposal in PROPOSAL_FORMAT (what the heuristic critic returns)."""
    body = MemoryStructure(doc).to_yaml().rstrip("\n")
    head = f"{analysis.strip()}\n\n" if analysis.strip() else ""
    return f"{head}```yaml\n{body}\n```\n\nRationale:\n{rationale.strip()}\n"


def _fenced_blocks(text: str) -> tuple[list[tuple[str, str, int]], int | None]:
    """(language, body, line of the opening fence) of each closed fence; the line of an unclosed one."""
    blocks, open_at, lang, start = [], None, "", 0
    for m in _FENCE_RE.finditer(text):
        if open_at is None:
            open_at, lang, start = text.count("\n", 0, m.start()) + 1, m.group(1).lower(), m.end()
        elif not m.group(1):
            blocks.append((lang, text[start:m.start()].strip("\n"), open_at))
            open_at = None
    return blocks, open_at


def parse_proposal(text: str, *, validate: bool = False) -> tuple[dict, str]:
    """(document, rationale) from a critic reply in PROPOSAL_FORMAT.

    Takes the last ```yaml block that parses to a mapping (a model may quote fragments before
    the full document); raises ProposalError naming what is missing or broken. With
    ``validate=True`` the document must also pass MemoryStructure.validate().
    """
    if not isinstance(text, str) or not text.strip():
        raise ProposalError("the critic's reply is empty; expected a ```yaml block with the complete "
                            "memory structure and a Rationale: section")
    blocks, unclosed = _fenced_blocks(text)
    yaml_blocks = [b for b in blocks if b[0] in ("yaml", "yml")]
    if not yaml_blocks:
        if unclosed is not None:
            raise ProposalError(f"the fenced block opened on line {unclosed} is never closed with ``` "
                                f"(the reply may have been cut off by the token limit)")
        untagged = [b for b in blocks if not b[0]]
        if not untagged:
            raise ProposalError("no ```yaml block found; the revised memory structure must be in one "
                                "fenced block that starts with ```yaml")
        yaml_blocks = untagged  # an untagged fence is accepted if it holds the document
    errors, doc, where = [], None, 0
    for _lang, body, line in reversed(yaml_blocks):
        try:
            parsed = yaml.safe_load(body)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {line + mark.line + 1} of the reply" if mark is not None else ""
            errors.append(f"the ```yaml block on line {line} is not valid YAML{at}: "
                          f"{getattr(e, 'problem', None) or e}")
            continue
        if isinstance(parsed, dict):
            doc, where = parsed, line
            break
        errors.append(f"the ```yaml block on line {line} holds a {type(parsed).__name__}, "
                      f"not a mapping (the structure document)")
    if doc is None:
        raise ProposalError("; ".join(errors))
    if validate:
        try:
            MemoryStructure(doc).validate()
        except StructureError as e:
            raise ProposalError(f"the structure in the ```yaml block on line {where} is invalid:\n"
                                + "\n".join(f"  {f}: {why}" for f, why in e.problems)) from None
    return doc, _rationale(text)


def _rationale(text: str) -> str:
    # The Rationale: section outside any fence; it runs to the end (minus later fenced blocks).
    fences = [(m.start(), m.end()) for m in re.finditer(r"```.*?```", text, re.DOTALL)]
    for m in reversed(list(_RATIONALE_RE.finditer(text))):
        if any(a <= m.start() < b for a, b in fences):
            continue
        rest = text[m.end():]
        rest = re.sub(r"```.*?```", "", rest, flags=re.DOTALL)
        return (m.group(1).strip() + "\n" + rest.strip()).strip()
    return ""


# --------------------------------------------------------------------------------------------
# Judgements (Loop 2)


class JudgeError(ValueError):
    """A judge reply that cannot be used at all (not a list of decisions)."""


def find_json_list(text: str) -> list:
    """The JSON list in a judge's reply: the body of its first ``` fence (```json or bare) that
    parses, else of its first fence, else the whole reply; parsed as it is, else the span from its
    first '[' to its last ']'. A mapping gives its ``decisions`` list, or its only list. Raises
    JudgeError saying what is missing."""
    body = text.strip()
    fences = [m.group(1).strip() for m in re.finditer(r"```(?:json)?\s*\n?(.*?)```", body,
                                                      re.DOTALL | re.IGNORECASE)]
    if fences:
        body = next((f for f in fences if _loads(f) is not None), fences[0])
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        lo, hi = body.find("["), body.rfind("]")
        if lo < 0 or hi <= lo:
            raise JudgeError("the reply holds no JSON list") from None
        try:
            data = json.loads(body[lo:hi + 1])
        except json.JSONDecodeError as e:
            raise JudgeError(f"the JSON list does not parse: {e}") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if isinstance(data.get("decisions"), list):
            data = data["decisions"]
        elif len(lists) == 1:  # e.g. {"results": [...]}
            data = lists[0]
    if not isinstance(data, list):
        raise JudgeError(f"expected a JSON list of decisions, got {type(data).__name__}")
    return data


def _loads(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def parse_decisions(text: str) -> list[dict]:
    """A judge's JSON list of {id, decision, reason}; tolerates a ```json fence and prose around it.
    Strict: any item without 'id' and 'decision' makes the whole reply unusable (JudgeError)."""
    data = find_json_list(text)
    for i, d in enumerate(data):
        if not isinstance(d, dict) or "id" not in d or "decision" not in d:
            raise JudgeError(f"item {i} is not an object with 'id' and 'decision': {str(d)[:120]}")
    return data
