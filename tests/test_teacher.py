"""The scripted teacher: real Craftax-Classic episodes through the real MemoryAgent and Runner."""
import json
import os

import numpy as np
import pytest

from automem_jax.agent.memory_agent import MemoryAgent, drive
from automem_jax.agent.types import ChatRequest, Completion
from automem_jax.envs import describe_crafter as dc
from automem_jax.loops.chats import phase_chat
from automem_jax.loops.teacher import TeacherClient, teacher_examples
from automem_jax.loops.teacher_prompt import Notes, parse_observation
from automem_jax.memory.ops import parse
from automem_jax.memory.structure import MemoryStructure
from automem_jax.rollout.runner import Runner

SEEDS = [0, 1]
STEPS = 40
RATE = 0.3


def _lines(run_dir):
    folder = os.path.join(run_dir, "traces", "craftax", "Craftax-Classic")
    return {k: [json.loads(x) for x in open(os.path.join(folder, f"ep_{k}.jsonl"))]
            for k in range(len(SEEDS))}


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("teacher_run"))
    structure = MemoryStructure.default("crafter_tiny")
    summary = Runner(TeacherClient(seed=0, redundant_write_rate=RATE, useless_read_rate=0.2),
                     structure, run_dir, "craftax", num_envs=len(SEEDS), max_steps=STEPS,
                     progress=False).run(SEEDS)
    return run_dir, structure, summary, _lines(run_dir)


def test_every_turn_is_well_formed_and_only_intended_writes_repeat(teacher_run):
    _, structure, _, episodes = teacher_run
    vocab = {p: set(structure.phase_ops(p)) for p in ("log", "plan")}
    redundant = phases = stray_phases = 0
    for lines in episodes.values():
        before: dict[str, str] = {}
        for line in lines:
            assert line["log"]["end_reason"] == ("skipped" if line["step"] == 0 else "done")
            assert line["plan"]["end_reason"] == "action" and not line["plan"]["fallback"]
            assert line["action_valid"] and line["validated_action"] in dc.ACTIONS
            for phase in ("log", "plan"):
                for turn in line[phase]["turns"]:
                    assert turn["model_id"] == "teacher" and turn["error"] is None
                    assert turn["tokens_in"] > 0 and turn["tokens_out"] > 0
                    for op in turn["ops"]:
                        assert op["op"] in vocab[phase] and op["ok"], op
                        if op["op"] == "SEARCH":
                            assert not op["text"].startswith(("[No lines", "[FILE IS EMPTY"))
            # A stray read (the other bad habit) touches a file the phase then leaves alone.
            for phase in ("log", "plan"):
                turns = line[phase]["turns"]
                written = {op["args"][0] for t in turns for op in t["ops"]
                           if op["op"] in ("APPEND", "WRITE")}
                stray = {op["args"][0] for t in turns for op in t["ops"] if op["op"] == "READ"
                         and op["args"][0] not in ("strategy.txt", "actions_log.txt")}
                assert not stray & written, (stray, written)
                phases += bool(turns)
                stray_phases += bool(stray)
            # A repeated line is always a whole line already in the file (the bad habit);
            # every other APPEND adds text found nowhere in the file.
            for turn in line["log"]["turns"]:
                for op in turn["ops"]:
                    if op["op"] == "APPEND":
                        name, text = op["args"]
                        old = before.get(name, "")
                        if text in old:
                            assert text in old.splitlines(), (text, old)
                            redundant += 1
            before = dict(line["memory_snapshot"])
    assert redundant > 0
    assert 0.1 <= stray_phases / phases <= 0.3  # useless_read_rate=0.2 per phase


def test_plays_competently_and_never_sends_an_invalid_action(teacher_run):
    _, _, summary, episodes = teacher_run
    task = summary["environments"]["craftax"]["Craftax-Classic"]
    assert task["invalid_action_rate"] == 0.0
    progress = [lines[-1]["progression"] for lines in episodes.values()]
    assert max(progress) > 0
    actions = {ln["validated_action"] for lines in episodes.values() for ln in lines}
    assert {"Do", "Place Table"} <= actions


def test_redundant_write_rate_is_the_share_of_log_phases_with_the_habit(teacher_run):
    _, _, summary, episodes = teacher_run
    hyg = summary["environments"]["craftax"]["Craftax-Classic"]["hygiene"]
    writing = with_habit = from_state = 0
    for lines in episodes.values():
        before: dict[str, str] = {}
        for ln in lines:
            files = dict(before)
            ops = [op for t in ln["log"]["turns"] for op in t["ops"]]
            writes = [op for op in ops if op["op"] in ("APPEND", "WRITE")]
            dup = False
            for op in writes:
                name, text = op["args"][0], op["args"][-1]
                if op["op"] == "APPEND":
                    if text in files.get(name, "").splitlines():
                        dup = True
                        from_state += name == "strategy.txt"
                    files[name] = files.get(name, "") + text + "\n"
                else:
                    files[name] = text + "\n"
            writing += bool(writes)
            with_habit += dup
            before = dict(ln["memory_snapshot"])
    assert writing >= 40
    assert RATE - 0.12 <= with_habit / writing <= RATE + 0.12, (with_habit, writing)
    assert from_state > 0  # re-noted state lines, besides lines repeated within one reply
    # One or two repeats in a phase that writes several lines: a minority of all writes.
    assert 0.03 <= hyg["redundant_write_rate"] < RATE, hyg
    assert hyg["empty_searches"] == 0


def test_teacher_examples_are_alternating_chats_of_every_phase(teacher_run):
    run_dir, _, _, episodes = teacher_run
    examples = teacher_examples(run_dir)
    phases = [(k, ln["step"], p) for k, lines in episodes.items() for ln in lines
              for p in ("log", "plan") if ln[p]["turns"]]
    assert [e["id"] for e in examples] == [f"ep{k}/s{s}/{p}" for k, s, p in phases]
    by_id = {f"ep{k}/s{ln['step']}/{p}": ln[p] for k, lines in episodes.items() for ln in lines
             for p in ("log", "plan")}
    for ex in examples:
        conv = ex["conversations"]
        assert set(ex) == {"conversations", "id"}
        assert len(conv) % 2 == 0 and conv[-1]["role"] == "assistant"
        assert [m["role"] for m in conv] == ["user", "assistant"] * (len(conv) // 2)
        assert all(m["content"] for m in conv)
        assert conv[0]["content"] == by_id[ex["id"]]["initial_prompt"]
    assert any(len(e["conversations"]) >= 4 for e in examples)  # multi-turn phases are kept


def test_replies_depend_only_on_seed_and_messages(teacher_run):
    run_dir, _, _, _ = teacher_run
    examples = teacher_examples(run_dir)
    teacher = TeacherClient(seed=0, redundant_write_rate=RATE, useless_read_rate=0.2)
    other = TeacherClient(seed=1, redundant_write_rate=RATE, useless_read_rate=0.2)
    pairs = []
    for ex in examples:
        phase = ex["id"].rsplit("/", 1)[1]
        conv = ex["conversations"]
        pairs += [(ChatRequest(messages=conv[:i + 1], phase=phase, model_role="policy"),
                   conv[i + 1]["content"]) for i in range(0, len(conv), 2)]
    requests = [r for r, _ in pairs]
    # Replaying the recorded chats gives back the recorded replies, in any batch order.
    assert [c.text for c in teacher.generate(requests)] == [t for _, t in pairs]
    assert [c.text for c in teacher.generate(requests[::-1])] == [t for _, t in pairs][::-1]
    # Another teacher seed changes some habits.
    assert [c.text for c in other.generate(requests)] != [t for _, t in pairs]


def test_a_zero_rate_teacher_would_write_nothing_twice_in_the_same_situations(teacher_run):
    """Counterfactual replay: the recorded LOG chats, answered by a teacher with zero rates."""
    _, structure, _, episodes = teacher_run
    clean = TeacherClient(seed=0, redundant_write_rate=0.0, useless_read_rate=0.0)
    checked = 0
    for lines in episodes.values():
        before: dict[str, str] = {}
        for line in lines:
            turns = line["log"]["turns"]
            if turns:
                msgs = [{"role": "user", "content": turns[0]["prompt"]}]
                if len(turns) == 2:  # reads, then writes: replay the writing turn
                    msgs += [{"role": "assistant", "content": turns[0]["response"]},
                             {"role": "user", "content": turns[1]["prompt"]}]
                reply = clean.generate([ChatRequest(msgs, "log", "policy")])[0].text
                assert reply.endswith("<|DONE|>")
                for call in parse(reply, structure.phase_ops("log")).calls:
                    name, text = call.args
                    if call.op == "APPEND":
                        assert text not in before.get(name, ""), (text, before.get(name))
                    elif call.op == "WRITE":
                        assert text.strip() != before.get(name, "").strip()
                    checked += 1
            before = dict(line["memory_snapshot"])
    assert checked >= 40


@pytest.mark.slow
def test_zero_rates_give_no_redundant_writes_and_no_stray_reads(tmp_path):
    structure = MemoryStructure.default("crafter_tiny")
    summary = Runner(TeacherClient(seed=3, redundant_write_rate=0.0, useless_read_rate=0.0),
                     structure, str(tmp_path), "craftax", num_envs=1, max_steps=30,
                     progress=False).run([5])
    hyg = summary["environments"]["craftax"]["Craftax-Classic"]["hygiene"]
    assert hyg["redundant_writes"] == 0 and hyg["redundant_write_rate"] == 0.0
    folder = tmp_path / "traces" / "craftax" / "Craftax-Classic"
    for raw in open(folder / "ep_0.jsonl"):
        line = json.loads(raw)
        for phase in ("log", "plan"):
            for turn in line[phase]["turns"]:
                assert all(op["args"][0] == "strategy.txt" for op in turn["ops"]
                           if op["op"] == "READ"), turn["ops"]


# ------------------------------------------------------------------ no env: parsing and edits


def _obs(front="tree", inventory=None, vitals=(9, 9, 9, 9), cells=()):
    """A Craftax-style observation from the real describer; the player faces east."""
    local = np.full((1, dc.VIEW_W, dc.VIEW_H), dc.ID["grass"], np.int16)
    local[0, dc.CENTER_X, dc.CENTER_Y] = dc.PLAYER
    local[0, dc.CENTER_X + 1, dc.CENTER_Y] = dc.ID[front]
    for kind, dx, dy in cells:
        local[0, dc.CENTER_X + dx, dc.CENTER_Y + dy] = dc.ID[kind]
    inv = np.zeros((1, len(dc.ITEMS)), np.int32)
    for name, n in (inventory or {}).items():
        inv[0, dc.ITEMS.index(name)] = n
    (lt, st), = dc.describe_batch(local, [[1, 0]], [False], [False], [list(vitals)], inv)
    return lt, st


def test_parse_observation_reads_the_balrog_text():
    lt, st = _obs("tree", {"wood": 2, "sapling": 1}, vitals=(9, 7, 5, 8),
                  cells=[("water", -2, -1), ("stone", 0, 3)])
    view = parse_observation("some context\nYou face nothing here\n" + lt + "\n" + st)
    assert view.front == "tree" and not view.sleeping
    assert view.see["tree"] == (1, ("east",)) and view.adjacent("tree") == "east"
    assert view.see["water"] == (3, ("north", "west"))
    assert view.see["stone"] == (3, ("south",))
    assert view.inventory == {"sapling": 1, "wood": 2}
    assert view.vitals == {"health": 9, "food": 7, "drink": 5, "energy": 8}
    assert view.blocked("east") and not view.blocked("west")
    assert Notes.parse(Notes(goal="g", heading="west", since=3, inventory={"wood": 1},
                             seen=["tree"], done=["collect wood"]).render().splitlines()) == \
        Notes(goal="g", heading="west", since=3, inventory={"wood": 1}, seen=["tree"],
              done=["collect wood"])


def _edited_structure():
    """What a Loop-1 edit may look like: renamed files, fewer ops, reworded prompts, new blocks."""
    s = MemoryStructure.default("crafter_tiny")
    d = s.doc
    d["name"], d["version"] = "crafter-tiny-edited", 1
    d["files"] = [{"name": "goals.txt", "description": "plan", "content": ""},
                  {"name": "journal.txt", "description": "what happened", "content": ""},
                  {"name": "places.txt", "description": "where things are", "content": ""}]
    d["ops"]["log"] = ["READ", "APPEND", "DONE"]
    d["ops"]["plan"] = ["READ", "ACTION"]
    d["prompts"]["log"] = ("Keep notes. {action_description}\n{context}\nNow:\n{observation}\n"
                           "Files:\n{file_index}\nOps:\n{commands}\nFinish with <|DONE|>.")
    d["prompts"]["plan"] = ("{instruction}\n{context}\nNow:\n{observation}\nFiles:\n{file_index}\n"
                            "Ops:\n{commands}\nPick an action.")
    d["context"] += [{"name": "recent_actions", "phases": ["log", "plan"], "params": {"n": 3}},
                     {"name": "inventory_change", "phases": ["log", "plan"]}]
    return s.validate()


@pytest.mark.parametrize("rate", [0.0, 0.4])
def test_follows_an_edited_structure(rate):
    s = _edited_structure()
    teacher = TeacherClient(seed=0, redundant_write_rate=rate, useless_read_rate=0.5)
    agent = MemoryAgent(s, actions=dc.ACTIONS, default_action="Noop", instruction="Play.")
    # wood goes 0 -> 1 -> 2 -> 1 -> 1: a value coming back must still be recorded.
    script = [_obs("tree"), _obs("tree", {"wood": 1}), _obs("grass", {"wood": 2}),
              _obs("grass", {"wood": 1, "wood_pickaxe": 1}, cells=[("table", 0, -1)]),
              _obs("grass", {"wood": 1, "wood_pickaxe": 1}, cells=[("table", 0, -1)])]
    before: dict[str, str] = {}
    redundant = 0
    for lt, st in script:
        action, rec = drive(agent.act(type("O", (), {"long_term": lt, "short_term": st})),
                            lambda req: teacher.generate([req])[0])
        assert rec.action_valid and rec.plan.end_reason == "action"
        assert rec.log.end_reason in ("skipped", "done")
        for phase, turns in (("log", rec.log.turns), ("plan", rec.plan.turns)):
            for turn in turns:
                assert turn.error is None
                for op in turn.ops:
                    assert op["op"] in s.phase_ops(phase) and op["ok"], op
                    if op["op"] == "APPEND" and op["args"][1] in before.get(op["args"][0], ""):
                        redundant += 1
        before = dict(rec.memory_snapshot)
    assert "goals.txt" in before and "journal.txt" in before
    notes = Notes.parse(before["goals.txt"].splitlines())
    assert notes.heading in ("north", "east", "south", "west") and "collect wood" in notes.done
    if rate == 0.0:
        assert redundant == 0
        # The state kept by appends (no WRITE here) ends on the latest values. With the redundant
        # habit on, a re-appended older state line may come last: that is the bad habit itself.
        assert notes.inventory == {"wood": 1, "wood_pickaxe": 1}


def test_tiny_structure_loads_by_name():
    s = MemoryStructure.default("crafter_tiny").validate()
    assert s.name == "crafter-tiny-v0" and "crafter_tiny" in MemoryStructure.default_names()
    assert set(s.phase_ops("plan")) <= {"SEARCH", "READ", "TAIL", "COUNT", "ACTION"}


def test_failed_parse_never_raises():
    teacher = TeacherClient()
    out = teacher.generate([ChatRequest([{"role": "user", "content": "no observation"}], "plan",
                                        "policy"),
                            ChatRequest([{"role": "user", "content": ""}], "log", "policy")])
    assert [c.text for c in out] == ["<|ACTION|>Noop<|END|>", "<|DONE|>"]
    assert all(isinstance(c, Completion) and c.error is None for c in out)


def test_two_model_chats_hand_over_and_become_examples():
    s = MemoryStructure.default("crafter_tiny")
    teacher = TeacherClient(seed=0)
    agent = MemoryAgent(s, actions=dc.ACTIONS, default_action="Noop", instruction="Play.",
                        two_model=True)
    for lt, st in [_obs("tree"), _obs("tree", {"wood": 1}), _obs("grass", {"wood": 2})]:
        _, rec = drive(agent.act(type("O", (), {"long_term": lt, "short_term": st})),
                       lambda req: teacher.generate([req])[0])
        assert rec.action_valid and not rec.plan.fallback
        assert rec.plan.turns[-1].model_role == "gameplay"
        assert any(t.handoff for t in rec.plan.turns)
    conv = phase_chat(rec.plan.to_dict())
    assert [m["role"] for m in conv] == ["user", "assistant"] * (len(conv) // 2)
    assert "<|ACTION|>" not in "".join(m["content"] for m in conv[:-1] if m["role"] == "assistant")
    assert conv[-1]["content"].startswith("<|ACTION|>")


def test_log_follow_up_prompts_repeat_the_step_stamp(teacher_run):
    """crafter_tiny's log_continue restates the last action, worded as the events' stamp, right
    before the reply: the nearest text a small model can copy it from."""
    _, _, _, episodes = teacher_run
    follow_ups = 0
    for lines in episodes.values():
        for ln in lines:
            for turn in ln["log"]["turns"][1:]:
                assert f'Step {ln["step"] - 1} action "' in turn["prompt"].rsplit("\n\n", 1)[-1], turn["prompt"]
                follow_ups += 1
    assert follow_ups >= 20
