"""The critic's reply formats, shared by every critic (hosted or offline) and every loop that reads
them: a judgement is a JSON list of ``{id, decision, reason}`` objects."""
from __future__ import annotations

import json
import re


class JudgeError(ValueError):
    """A judge reply that cannot be used at all (not a list of decisions)."""


def parse_decisions(text: str) -> list[dict]:
    """A judge's JSON list of {id, decision, reason}; tolerates a ```json fence and prose around it."""
    body = text.strip()
    m = re.search(r"```(?:json)?\s*\n?(.*?)```", body, re.DOTALL | re.IGNORECASE)
    if m:
        body = m.group(1).strip()
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
    if isinstance(data, dict) and isinstance(data.get("decisions"), list):
        data = data["decisions"]
    if not isinstance(data, list):
        raise JudgeError(f"expected a JSON list of decisions, got {type(data).__name__}")
    for i, d in enumerate(data):
        if not isinstance(d, dict) or "id" not in d or "decision" not in d:
            raise JudgeError(f"item {i} is not an object with 'id' and 'decision': {str(d)[:120]}")
    return data
