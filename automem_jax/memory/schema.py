"""What a memory structure document may contain, and the rules the store shares with it.

The bottom of ``memory/``: plain data and small pure functions, importing nothing from this
package. The store (``store.py``), the document (``structure.py``) and its validator
(``validate.py``) all read from here, so none of them needs another for its vocabulary.

The context blocks are declared here as data (name, parameters with their defaults, default
phases, one-line doc). Their implementations live in ``automem_jax.agent.context``, which
registers one function per declared block and refuses to import if the two sets differ.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import MappingProxyType

PHASE_LOG = "log"
PHASE_PLAN = "plan"
PHASES = (PHASE_LOG, PHASE_PLAN)  # a game step's two phases (upstream's word)

# --------------------------------------------------------------------------- store limits


@dataclass(frozen=True)
class Limits:
    """Hard caps. Upstream v0 had none; ours are generous enough not to bind in normal play."""

    max_files: int = 64
    max_file_lines: int = 5000
    max_file_bytes: int = 262_144
    max_payload_bytes: int = 16_384
    max_search_results: int = 1000
    max_name_chars: int = 100
    max_ops_per_turn: int = 64
    max_action_chars: int = 60


@dataclass(frozen=True)
class PruneRule:
    """After each LOG phase: a ``file`` over ``max_lines`` lines keeps its last ``keep_lines``."""

    file: str
    max_lines: int
    keep_lines: int


# --------------------------------------------------------------------------- file names

# Most file systems cap a name at 255 bytes; leave room for the mirror's temporary-file prefix.
MAX_NAME_BYTES = 200


def nbytes(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def name_problem(name: str, max_chars: int = 100) -> str | None:
    """Why ``name`` cannot be a memory file name, or None if it can.

    Memory is one flat directory, so anything that could name another place is refused.
    """
    if not name:
        return "the name is empty"
    if len(name) > max_chars:
        return f"names are limited to {max_chars} characters"
    if nbytes(name) > MAX_NAME_BYTES:
        return f"names are limited to {MAX_NAME_BYTES} bytes of UTF-8"
    if "\x00" in name:
        return "the name contains a NUL byte"
    if "/" in name or "\\" in name:
        return "memory is flat: no directories or path separators"
    if ".." in name:
        return "'..' is not allowed in a name"
    if name.startswith("."):
        return "names may not start with '.'"
    if name != name.strip():
        return "names may not start or end with spaces"
    if not name.isprintable():
        return "the name contains control or unprintable characters"
    if len(name) >= 2 and name[1] == ":" and name[0].isalpha():
        return "drive-letter paths are not allowed"
    return None


# --------------------------------------------------------------------------- context blocks


@dataclass(frozen=True)
class BlockSpec:
    """A context block as a structure document sees it; the code is in agent.context."""

    name: str
    params: MappingProxyType  # name -> default value; the type of the default is the accepted type
    phases: tuple[str, ...]  # where the block is shown unless the structure says otherwise
    doc: str  # one line


def _declare(*specs: tuple[str, tuple[str, ...], dict, str]) -> MappingProxyType:
    return MappingProxyType({name: BlockSpec(name, MappingProxyType(dict(params)), phases, doc)
                             for name, phases, params, doc in specs})


# Read-only so that nothing can change the schema at run time; order is the listing order.
CONTEXT_BLOCKS: MappingProxyType = _declare(
    ("unchanged_observation", PHASES, {"critical_after": 3},
     "Warn when the observation is identical to the previous one (the action had no effect)."),
    ("repetition", ("plan",),
     {"repeat_threshold": 3, "oscillation_window": 6, "oscillation_flips": 2},
     "Alert on the same action chosen again and again, or on moves that go back and forth."),
    ("inventory_change", PHASES, {},
     "What the last action added to or removed from the inventory."),
    ("vitals_urgency", PHASES, {"low": 3, "critical": 1, "hp_fraction": 0.5},
     "Flag low health/food/drink/energy (Crafter) or low HP and hunger (NetHack)."),
    ("recent_actions", PHASES, {"n": 5},
     "The last n actions, oldest first, with invalid outputs shown next to what ran."),
    ("stuck_counter", PHASES, {"threshold": 3},
     "Steps spent on one tile (NetHack cursor), else steps without any change at all."),
    ("map_analysis", PHASES, {"max_far_stairs": 3, "style": "upstream"},
     "What surrounds '@' on a NetHack/MiniHack map: passable, blocked, doors, monsters, stairs."),
)

# --------------------------------------------------------------------------- the document

SCHEMA_VERSION = 1
ACTION_MATCH = ("exact", "case_insensitive")
MAX_BUDGET_TURNS = 100

# Placeholders each prompt may use; context-block names are also allowed in `log` and `plan`.
PROMPT_PLACEHOLDERS = {
    "log": {"action_description", "guidance", "observation", "file_index", "file_guide",
            "commands", "step", "prev_step", "context"},
    "plan": {"instruction", "guidance", "observation", "file_index", "file_guide", "commands",
             "step", "context"},
    "log_continue": {"results", "file_index", "action_description", "step", "prev_step"},
    "plan_continue": {"results", "file_index"},
    "handoff": set(),
    "handoff_with_results": {"results"},
    "action_taken": {"prev_step", "action"},
    "action_invalid": {"prev_step", "action", "raw_action"},
    "instruction": {"env_instruction", "actions"},
    "guidance": set(),
}
REQUIRED_PLACEHOLDERS = {
    "log": {"observation", "file_index", "commands", "action_description"},
    "plan": {"observation", "file_index", "commands", "instruction"},
    "log_continue": {"results"},
    "plan_continue": {"results"},
    "handoff_with_results": {"results"},
    "action_invalid": {"raw_action", "action"},
}
OPTIONAL_PROMPTS = {"instruction": None, "guidance": ""}

TOP_KEYS = ("schema_version", "name", "env", "version", "parent", "notes", "prompts", "files",
            "ops", "limits", "pruning", "context", "budgets", "action")
REQUIRED_TOP = ("schema_version", "name", "env", "version", "prompts", "files", "ops")
BUDGET_DEFAULTS = {"log_turns": 10, "plan_turns": 10, "gameplay_turns": 10, "max_tokens": 4096}
ACTION_DEFAULTS = {"fallback": "wait", "two_step_commands": [], "match": "exact"}
LIMIT_DEFAULTS = dataclasses.asdict(Limits())
OPS_DEFAULTS = {"order": "type", "vocabulary": {}, "keyed": []}
KEYED_DEFAULTS = {"key": "coord", "usage": "", "description": "",
                  "result": "[Updated {file} entry for {key}]"}
