"""MemoryStructure: defaults, validation, save/load, diff and the command line."""
import json
import subprocess
import sys

import pytest
import yaml

from automem_jax.memory.cli import main
from automem_jax.memory.diff import diff
from automem_jax.memory.structure import MemoryStructure, StructureError
from automem_jax.memory.template import render

ENVS = ["crafter", "minihack", "nethack"]
# Upstream v0 initial files per env (reference §1.4).
V0_FILES = {
    "crafter": ["map_notes.txt", "crafting_progress.txt", "survival_log.txt", "actions_log.txt",
                "strategy.txt"],
    "nethack": ["game_rules.txt", "nethack_symbols.txt", "dungeon_map.txt",
                "monster_encounters.txt", "inventory.txt", "actions_log.txt", "strategy.txt"],
    "minihack": ["game_rules.txt", "nethack_symbols.txt", "dungeon_map.txt", "actions_log.txt",
                 "inventory.txt", "strategy.txt"],
}


@pytest.mark.parametrize("env", ENVS)
def test_defaults_are_valid_and_match_upstream_v0(env):
    s = MemoryStructure.default(env).validate()
    assert [f["name"] for f in s.doc["files"]] == V0_FILES[env]
    assert s.phase_ops("log") == ("SEARCH", "READ", "TAIL", "COUNT", "APPEND", "WRITE", "CREATE",
                                  "DONE")
    assert s.phase_ops("plan") == ("SEARCH", "READ", "TAIL", "COUNT", "ACTION")
    assert s.budgets["log_turns"] == s.budgets["plan_turns"] == 10
    assert s.limits.max_search_results == 1000 and s.limits.max_action_chars == 60
    assert s.op_order == "type"
    blocks = [name for name, _ in s.context_blocks("plan")]
    assert blocks == (["unchanged_observation"] if env == "crafter"
                      else ["unchanged_observation", "map_analysis"])
    assert s.fallback_action == ("noop" if env == "crafter" else "search")  # upstream's (Crafter: invalid)
    if env == "crafter":
        assert all(f["content"] == "" for f in s.doc["files"]) and s.prompts["instruction"] is None
    else:
        rules = s.initial_files()["game_rules.txt"]
        assert "'eat d' in one action is INVALID" in rules
        assert "eat" in s.two_step_commands and "far" not in s.two_step_commands
        assert s.prompts["instruction"].rstrip().endswith("PLAY!")
    assert "<|SEARCH|>filename.txt|keyword<|END|>" in s.commands_text("log")
    assert "<|WRITE|>" not in s.commands_text("plan")


def test_default_aliases_and_unknown_env():
    assert MemoryStructure.default("nle") == MemoryStructure.default("nethack")
    assert MemoryStructure.default("craftax") == MemoryStructure.default("crafter")
    with pytest.raises(ValueError, match="no default memory structure"):
        MemoryStructure.default("pong")


def _set(path, value):
    def mutate(doc):
        *parents, last = path
        for p in parents:
            doc = doc[p]
        doc[last] = value
    return mutate


def _delete(path):
    def mutate(doc):
        *parents, last = path
        for p in parents:
            doc = doc[p]
        del doc[last]
    return mutate


def _append(path, value):
    def mutate(doc):
        for p in path:
            doc = doc[p]
        doc.append(value)
    return mutate


BROKEN = [
    ("missing top field", _delete(["prompts"]), "prompts", "required field is missing"),
    ("unknown top field", _set(["prompt"], {}), "prompt", "unknown field"),
    ("schema version", _set(["schema_version"], 7), "schema_version", "unsupported value 7"),
    ("negative version", _set(["version"], -1), "version", "integer >= 0"),
    ("budget type", _set(["budgets", "log_turns"], "ten"), "budgets.log_turns",
     "integer in [1, 100]"),
    ("budget zero", _set(["budgets", "plan_turns"], 0), "budgets.plan_turns",
     "integer in [1, 100]"),
    ("unknown placeholder", _set(["prompts", "log"], "{observation}{file_index}{commands}"
                                 "{action_description}{weather}"), "prompts.log", "{weather}"),
    ("missing placeholder", _set(["prompts", "plan"], "{instruction} {file_index} {commands}"),
     "prompts.plan", "must contain the placeholder {observation}"),
    ("missing prompt", _delete(["prompts", "handoff"]), "prompts.handoff", "required prompt"),
    ("duplicate file", _append(["files"], {"name": "strategy.txt"}), "files[strategy.txt]",
     "listed twice"),
    ("path in file name", _append(["files"], {"name": "../escape.txt"}),
     "files[../escape.txt].name", "invalid file name"),
    ("unknown op", _append(["ops", "log"], "DELETE"), "ops.log", "unknown op 'DELETE'"),
    ("write op in plan", _append(["ops", "plan"], "APPEND"), "ops.plan", "PLAN is read-only"),
    ("plan without action", _set(["ops", "plan"], ["READ"]), "ops.plan", "must offer ACTION"),
    ("log without done", _set(["ops", "log"], ["READ", "APPEND"]), "ops.log", "must offer DONE"),
    ("op order", _set(["ops", "order"], "random"), "ops.order", "expected one of"),
    ("vocabulary missing", _delete(["ops", "vocabulary", "COUNT"]), "ops.vocabulary.COUNT",
     "no usage/description"),
    ("keyed op clashes", _append(["ops", "keyed"], {"name": "READ", "file": "x.txt"}),
     "ops.keyed[READ].name", "built-in op name"),
    ("keyed op key kind", _append(["ops", "keyed"], {"name": "SETX", "file": "x.txt",
                                                     "key": "uuid"}), "ops.keyed[SETX].key",
     "expected one of"),
    ("limit not positive", _set(["limits", "max_files"], 0), "limits.max_files",
     "positive integer"),
    ("unknown limit", _set(["limits", "max_ram"], 5), "limits.max_ram", "unknown limit"),
    ("too many files", _set(["limits", "max_files"], 2), "files", "exceed limits.max_files"),
    ("unknown context block", _append(["context"], {"name": "crystal_ball"}), "context[1].name",
     "unknown context block"),
    ("context param type", _append(["context"], {"name": "recent_actions", "params": {"n": "5"}}),
     "context[recent_actions].params.n", "expected int"),
    ("context phase", _append(["context"], {"name": "recent_actions", "phases": ["act"]}),
     "context[recent_actions].phases", "non-empty subset"),
    ("block not placeable", lambda d: (d["context"].append({"name": "recent_actions"}),
                                       d["prompts"].__setitem__("plan", d["prompts"]["plan"]
                                                                .replace("{context}", ""))),
     "context[recent_actions]", "neither {recent_actions} nor {context}"),
    ("prune keep >= max", _append(["pruning"], {"file": "actions_log.txt", "max_lines": 5,
                                                "keep_lines": 5}), "pruning[0].keep_lines",
     "[1, max_lines)"),
    ("empty fallback", _set(["action", "fallback"], " "), "action.fallback", "non-empty"),
    ("action match", _set(["action", "match"], "fuzzy"), "action.match", "expected one of"),
]


@pytest.mark.parametrize("label,mutate,field,why", BROKEN, ids=[b[0] for b in BROKEN])
def test_validate_names_the_bad_field(label, mutate, field, why):
    doc = MemoryStructure.default("crafter").to_dict()
    mutate(doc)
    with pytest.raises(StructureError) as err:
        MemoryStructure(doc).validate()
    assert (field, ) in {(f,) for f, _ in err.value.problems}, err.value.problems
    reasons = [r for f, r in err.value.problems if f == field]
    assert any(why in r for r in reasons), reasons
    assert field in str(err.value)


def test_validate_rejects_a_non_mapping():
    with pytest.raises(StructureError) as err:
        MemoryStructure.from_text("- just\n- a list\n")
    assert err.value.field == "(root)"


@pytest.mark.parametrize("env", ENVS)
@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_save_load_roundtrip(tmp_path, env, suffix):
    s = MemoryStructure.default(env)
    s.doc["notes"] = "trailing space \nunicode \u00e9\u2500 tab\tand: colon # not a comment"
    s.doc["files"][0]["content"] = "line with trailing spaces   \n\n  indented\n"
    path = s.save(tmp_path / f"v1{suffix}")
    back = MemoryStructure.load(path)
    assert back == s
    assert back.validate().to_dict() == s.to_dict()


def test_load_ignores_comments_and_fills_defaults(tmp_path):
    text = MemoryStructure.default("crafter").to_yaml()
    doc = yaml.safe_load(text)
    for key in ("limits", "pruning", "budgets", "action", "parent", "notes"):
        del doc[key]
    commented = "# leading comment\n" + yaml.safe_dump(doc).replace(
        "version: 0", "version: 0   # inline comment")
    (tmp_path / "s.yaml").write_text(commented)
    s = MemoryStructure.load(tmp_path / "s.yaml")
    assert s.budgets == {"log_turns": 10, "plan_turns": 10, "gameplay_turns": 10,
                         "max_tokens": 4096}
    assert s.fallback_action == "wait"
    assert s.doc["notes"] == "" and s.doc["parent"] is None and s.doc["pruning"] == []
    default = MemoryStructure.default("crafter")
    s.doc["action"]["fallback"] = "noop"
    s.doc["notes"] = default.doc["notes"]
    assert s == default


def test_bad_yaml_names_the_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("prompts: [unclosed\n")
    with pytest.raises(StructureError, match="bad.yaml"):
        MemoryStructure.load(tmp_path / "bad.yaml")


def test_diff_lists_changes():
    a = MemoryStructure.default("crafter")
    b = a.copy()
    assert diff(a, b) == []
    b.doc["version"] = 1
    b.doc["budgets"]["log_turns"] = 5
    b.doc["files"].append({"name": "goals.txt", "description": "goals", "content": "a\nb\n"})
    b.doc["files"] = [f for f in b.doc["files"] if f["name"] != "survival_log.txt"]
    b.doc["ops"]["plan"].remove("COUNT")
    b.doc["context"].append({"name": "recent_actions", "phases": ["plan"], "params": {"n": 3},
                             "enabled": True})
    b.doc["prompts"]["log_continue"] = b.doc["prompts"]["log_continue"].replace(
        "Keep logging", "Continue logging")
    changes = diff(a, b)
    assert "~ version: 0 -> 1" in changes
    assert "~ budgets.log_turns: 10 -> 5" in changes
    assert "+ files[goals.txt]: added (2 lines)" in changes
    assert "- files[survival_log.txt]: removed" in changes
    assert "~ ops.plan: -COUNT" in changes
    assert "+ context[recent_actions]: added" in changes
    i = changes.index("~ prompts.log_continue: text changed")
    assert any(c.strip().startswith("-Keep logging") for c in changes[i:])
    assert any(c.strip().startswith("+Continue logging") for c in changes[i:])


def test_render_drops_empty_block_lines():
    t = "A\n\n{warn}\n\n{guide}\n\nobs: {observation} {unknown}\n{x}"
    assert render(t, {"warn": "", "guide": "G", "observation": "{warn}", "x": ""}) == \
        "A\n\nG\n\nobs: {warn} {unknown}"
    assert render(t, {"warn": "W", "guide": "G", "observation": "o", "x": "X"}) == \
        "A\n\nW\n\nG\n\nobs: o {unknown}\nX"


def test_cli_show_diff_validate(tmp_path, capsys):
    res = subprocess.run([sys.executable, "-m", "automem_jax.memory.structure", "show",
                          "crafter"], capture_output=True, text=True, check=True)
    assert res.stdout.startswith("# automem_jax MemoryStructure crafter-v0")
    assert MemoryStructure.from_text(res.stdout) == MemoryStructure.default("crafter")

    a = MemoryStructure.default("nethack")
    b = a.copy()
    b.doc["ops"]["log"].insert(-1, "UPSERT_MAP")
    b.doc["pruning"] = [{"file": "actions_log.txt", "max_lines": 200, "keep_lines": 100}]
    a.save(tmp_path / "A.yaml")
    b.save(tmp_path / "B.yaml")
    assert main(["diff", str(tmp_path / "A.yaml"), str(tmp_path / "B.yaml")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["+ pruning[actions_log.txt]: added", "~ ops.log: +UPSERT_MAP"]

    assert main(["show", "minihack", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "minihack-v0"

    b.doc["budgets"]["plan_turns"] = 0
    b.save(tmp_path / "C.yaml")
    assert main(["validate", str(tmp_path / "A.yaml"), str(tmp_path / "C.yaml")]) == 1
    out = capsys.readouterr().out
    assert "A.yaml: ok" in out and "budgets.plan_turns" in out
    with pytest.raises(SystemExit, match="neither a structure file nor a default"):
        main(["show", "no_such_thing"])


def test_memory_imports_nothing_above_it():
    # memory/ is the bottom layer: loading it must not pull in the agent (or anything higher).
    code = ("import sys, automem_jax.memory.structure, automem_jax.memory.store, "
            "automem_jax.memory.upstream, automem_jax.memory.cli, automem_jax.memory.diff; "
            "print(sorted(m for m in sys.modules if m.startswith('automem_jax.') "
            "and not m.startswith('automem_jax.memory')))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]"
