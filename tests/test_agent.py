"""MemoryAgent driven by scripted completions through a fake two-action env."""
import json
import re
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from automem_jax.agent.memory_agent import CONSULTATION_DONE, MemoryAgent, drive
from automem_jax.agent.types import ChatRequest, Completion
from automem_jax.memory.structure import MemoryStructure

RULE = "\u2500\u2500"


@dataclass
class Obs:
    long_term: str
    short_term: str


class CorridorEnv:
    """Cells 0..9 in a row; 'left'/'right' move one cell, bumping a wall changes nothing."""

    actions = ["left", "right"]
    default_action = "left"
    instruction = "You walk a corridor. The only actions are: left, right. Reach cell 9."

    def reset(self, seed=0):
        self.pos = 0
        return self._obs()

    def _obs(self):
        return Obs(f"You are in cell {self.pos} of the corridor.", "You carry nothing.")

    def step(self, action):
        info = {}
        if action not in self.actions:
            info["invalid_action"], action = action, self.default_action
        before = self.pos
        self.pos = min(9, max(0, self.pos + (1 if action == "right" else -1)))
        reward = 1.0 if self.pos == 9 and before != 9 else 0.0
        return self._obs(), reward, False, False, info


def small_structure(**budgets):
    s = MemoryStructure.default("crafter")
    s.doc["name"] = "corridor-test"
    s.doc["budgets"].update({"log_turns": 3, "plan_turns": 3, "gameplay_turns": 2, **budgets})
    s.doc["action"]["fallback"] = "right"
    return s.validate()


def turn_index(req: ChatRequest) -> int:
    return sum(m["role"] == "assistant" for m in req.messages)


def cell(req: ChatRequest) -> int:
    return int(re.search(r"You are in cell (\d+)", req.messages[0]["content"]).group(1))


class SingleModelScript:
    """Behaviour by step k: k%10==7 LOG never finishes, ==8 LOG has no ops; ==3 PLAN never
    commits, ==5 PLAN commits an invalid action, ==9 PLAN has neither ops nor action."""

    def __init__(self):
        self.k = 0
        self.requests = []

    def __call__(self, req):
        self.requests.append((self.k, req))
        k, turn = self.k, turn_index(req)
        if req.phase == "log":
            if k % 10 == 7:
                return Completion("<|SEARCH|>actions_log.txt|cell<|END|>", 100, 10)
            if k % 10 == 8:
                return Completion("Nothing new happened.", 100, 3)
            if turn == 0:
                return Completion("Let me check.\n<|SEARCH|>actions_log.txt|cell<|END|>", 100, 10)
            return Completion(f"<|APPEND|>actions_log.txt|Step {k - 1}: now in cell {cell(req)}"
                              "<|END|>\n<|DONE|>", 100, 10)
        if k % 10 == 3:
            return Completion("<|READ|>actions_log.txt<|END|>", 50, 5)
        if k % 10 == 5:
            return Completion("<|ACTION|>jump<|END|>", 50, 5)
        if k % 10 == 9:
            return Completion("Hmm, I am not sure.", 50, 5)
        if turn == 0:
            return Completion("<|TAIL|>actions_log.txt|3<|END|>", 50, 5)
        return Completion(f"<|ACTION|>{'right' if k % 2 == 0 else 'left'}<|END|>", 50, 5)


def run_episode(agent, env, script, steps=50):
    obs = env.reset()
    records = []
    for k in range(steps):
        script.k = k
        action, rec = drive(agent.act(obs), script)
        assert action == rec.validated_action
        snapshot = dict(agent.store.files)
        obs, reward, term, trunc, info = env.step(action)
        assert "invalid_action" not in info  # the agent only ever sends valid actions
        rec.reward, rec.done = reward, term
        records.append((rec, snapshot, env.pos))
    return records


def test_fifty_steps_single_model():
    env, script = CorridorEnv(), SingleModelScript()
    s = small_structure()
    agent = MemoryAgent.for_env(s, env)
    records = run_episode(agent, env, script)
    appended = 0
    prev = None
    for k, (rec, snapshot, _) in enumerate(records):
        json.dumps(rec.to_dict())
        assert rec.step == k and rec.structure == "corridor-test@v0" and not rec.two_model
        assert rec.instruction_prompt == (env.instruction if k == 0 else None)
        log, plan = rec.log, rec.plan
        # ---- LOG
        if k == 0:
            assert (log.end_reason, log.turns) == ("skipped", [])
        elif k % 10 == 7:
            assert log.end_reason == "budget" and len(log.turns) == 3
            assert all(t.ops and not t.done for t in log.turns)
        elif k % 10 == 8:
            assert log.end_reason == "no_ops" and len(log.turns) == 1 and log.turns[0].ops == []
        else:
            assert log.end_reason == "done" and len(log.turns) == 2
            assert [o["op"] for o in log.turns[1].ops] == ["APPEND"] and log.turns[1].done
            assert log.turns[1].ops[0]["text"] == "[Appended to actions_log.txt]"
            appended += 1
        if k > 0:
            assert log.turns[0].prompt == log.initial_prompt
            assert f"You are in cell {records[k - 1][2]} of the corridor." in log.initial_prompt
            if prev.action_valid:
                assert f'Your PREVIOUS action (step {k - 1}) was: "{prev.validated_action}"' \
                    in log.initial_prompt
            else:
                assert 'you answered: "jump"' in log.initial_prompt
                assert 'the game ran the default action "left" instead' in log.initial_prompt
            for t in log.turns[1:]:
                assert t.prompt.startswith("Results of your commands:\n" + RULE + " SEARCH")
            assert all(t.model_role == "policy" for t in log.turns)
        # ---- PLAN
        assert plan.turns[0].prompt == plan.initial_prompt
        assert env.instruction in plan.initial_prompt
        if k % 10 == 3:
            assert (plan.end_reason, len(plan.turns), plan.fallback) == ("budget", 3, True)
            assert (rec.raw_action, rec.validated_action, rec.action_valid) == \
                ("right", "right", True)
        elif k % 10 == 5:
            assert (plan.end_reason, len(plan.turns), plan.fallback) == ("action", 1, False)
            assert (rec.raw_action, rec.validated_action, rec.action_valid) == \
                ("jump", "left", False)
        elif k % 10 == 9:
            assert (plan.end_reason, len(plan.turns), plan.fallback) == ("no_ops", 1, True)
            assert rec.validated_action == "right"
        else:
            assert (plan.end_reason, len(plan.turns), plan.fallback) == ("action", 2, False)
            assert rec.validated_action == ("right" if k % 2 == 0 else "left") and rec.action_valid
            assert plan.turns[1].prompt.startswith(
                f"Results of your lookups:\n{RULE} TAIL actions_log.txt (last 3 lines) {RULE}\n")
            assert plan.turns[1].committed_action == rec.validated_action
        assert all(t.model_role == "policy" for t in plan.turns)
        # ---- memory, context, tokens
        assert rec.memory_snapshot == snapshot
        assert snapshot["actions_log.txt"].count("\n") == appended
        unchanged = k > 0 and records[k - 1][2] == (records[k - 2][2] if k > 1 else 0)
        assert (rec.unchanged_count > 0) == unchanged
        assert bool(rec.context_blocks["log"]["unchanged_observation"]) == unchanged
        assert rec.tokens_in == 100 * len(log.turns) + 50 * len(plan.turns)
        assert rec.tokens_out == sum(t.tokens_out for t in rec.turns())
        prev = rec
    assert appended == 39  # steps 1..49 minus the 10 whose LOG never appends
    # no chat history across steps: every chat starts from the phase's fresh prompt
    for k, req in script.requests:
        assert req.messages[0]["role"] == "user" and len(req.messages) == 2 * turn_index(req) + 1
        rec = records[k][0]
        first = rec.log.initial_prompt if req.phase == "log" else rec.plan.initial_prompt
        assert req.messages[0]["content"] == first
        assert (req.max_tokens, req.stop, req.model_role) == (4096, None, "policy")
    # the unchanged-observation warning reached the model when the agent bumped the wall
    bumped = [r for r, _, _ in records if r.unchanged_count]
    assert bumped and all("EXACTLY the same" in r.log.initial_prompt for r in bumped if r.step)


class TwoModelScript:
    """Specialist for LOG and lookups, gameplay model for the action. Specialist behaviour by
    k%4: 0 lookup then proposes 'right'; 1 lookup and proposal in one reply; 2 neither (plain
    handoff; with k%8==6 the gameplay model also never commits); 3 never stops looking up."""

    def __init__(self):
        self.k = 0
        self.requests = []

    def __call__(self, req):
        self.requests.append((self.k, req))
        k, turn = self.k, turn_index(req)
        if req.phase == "log":
            assert req.model_role == "memory"
            if turn == 0:
                return Completion("<|SEARCH|>actions_log.txt|cell<|END|>", 7, 1)
            return Completion(f"<|APPEND|>actions_log.txt|Step {k - 1}: cell {cell(req)}<|END|>"
                              "<|DONE|>", 7, 1)
        if req.model_role == "memory":
            if k % 4 == 0:
                return Completion("<|SEARCH|>actions_log.txt|cell<|END|>" if turn == 0 else
                                  "Looks fine.\n<|ACTION|>right<|END|>", 5, 1)
            if k % 4 == 1:
                return Completion("<|COUNT|>actions_log.txt|cell<|END|> <|ACTION|>right<|END|>",
                                  5, 1)
            if k % 4 == 2:
                return Completion("No lookups needed.", 5, 1)
            return Completion("<|READ|>strategy.txt<|END|>", 5, 1)
        assert req.model_role == "gameplay"
        if k % 8 == 6:
            return Completion("<|READ|>map_notes.txt<|END|>", 3, 1)
        return Completion("ACTION: left", 3, 1)


def test_fifty_steps_two_models():
    env, script = CorridorEnv(), TwoModelScript()
    s = small_structure()
    agent = MemoryAgent.for_env(s, env, two_model=True)
    records = run_episode(agent, env, script)
    handoff, handoff_results = s.prompts["handoff"], s.prompts["handoff_with_results"]
    for k, (rec, snapshot, _) in enumerate(records):
        assert rec.two_model
        assert all(t.model_role == "memory" for t in rec.log.turns)
        roles = [t.model_role for t in rec.plan.turns]
        n_mem = {0: 2, 1: 1, 2: 1, 3: 3}[k % 4]
        n_game = 2 if k % 8 == 6 else 1
        assert roles == ["memory"] * n_mem + ["gameplay"] * n_game
        mem_turns = rec.plan.turns[:n_mem]
        assert [t.handoff for t in mem_turns] == [False] * (n_mem - 1) + [k % 4 != 3]
        if k % 4 in (0, 1):
            assert mem_turns[-1].committed_action == "right"  # proposed, never played
        if k % 8 == 6:
            assert rec.plan.fallback and rec.plan.end_reason == "budget"
            assert rec.validated_action == "right"
        else:
            assert not rec.plan.fallback and rec.plan.end_reason == "action"
            assert rec.validated_action == "left"
        assert rec.memory_snapshot == snapshot
    # what the gameplay model was shown at the handoff
    first_game = {}
    for k, req in script.requests:
        if req.model_role == "gameplay" and k not in first_game:
            first_game[k] = req
    for k, req in first_game.items():
        msgs = req.messages
        if k % 4 == 0:
            assert len(msgs) == 5 and msgs[3]["content"] == "Looks fine."
            assert msgs[4]["content"] == handoff
        elif k % 4 == 1:
            assert msgs[1]["content"] == "<|COUNT|>actions_log.txt|cell<|END|>"
            assert msgs[2]["content"] == handoff_results.replace(
                "{results}", f"{RULE} COUNT actions_log.txt for 'cell' {RULE}\n"
                f"[{k} line(s) matching 'cell']")  # LOG appended one per step
        elif k % 4 == 2:
            assert [m["content"] for m in msgs[1:]] == ["No lookups needed.", handoff]
        else:
            assert len(msgs) == 7 and msgs[-1]["content"].startswith("Results of your lookups:")
        assert all("<|ACTION|>" not in m["content"] for m in msgs if m["role"] == "assistant")


def test_action_only_specialist_reply_becomes_placeholder():
    env = CorridorEnv()
    agent = MemoryAgent.for_env(small_structure(), env, two_model=True)
    seen = []

    def respond(req):
        seen.append(req)
        return Completion("<|ACTION|>right<|END|>" if req.model_role == "memory" else
                          "<ACTION>left</ACTION>")
    action, rec = drive(agent.act(env.reset()), respond)
    assert action == "left"
    assert seen[-1].messages[1]["content"] == CONSULTATION_DONE


def test_errors_end_the_phase_and_fall_back():
    env = CorridorEnv()
    agent = MemoryAgent.for_env(small_structure(), env)
    drive(agent.act(env.reset()), lambda r: Completion("<|ACTION|>left<|END|>"))
    replies = iter([Completion("<|SEARCH|>map_notes.txt|x<|END|>", 4, 2),
                    Completion("", error="timeout"), None])
    action, rec = drive(agent.act(env.step("left")[0]), lambda r: next(replies))
    assert rec.log.end_reason == "error" and rec.log.turns[-1].error == "timeout"
    assert rec.plan.end_reason == "error" and rec.plan.fallback
    assert rec.plan.turns[0].error == "no completion was sent to the agent"
    assert (action, rec.tokens_in, rec.tokens_out) == ("right", 4, 2)
    # a bare string is accepted as the completion text
    action, rec = drive(agent.act(env.step("right")[0]),
                        lambda r: "<|DONE|>" if r.phase == "log" else "ACTION: left")
    assert action == "left" and rec.log.end_reason == "done"


def test_nethack_two_step_repair_and_case_option():
    s = MemoryStructure.default("nethack")
    agent = MemoryAgent(s, actions=["eat", "north", "esc"], default_action="esc",
                        instruction="ignored: the structure overrides it")
    action, rec = drive(agent.act(Obs("map:\n.@.\n", "inventory:\nd: apple")),
                        lambda r: "<|ACTION|>Eat d<|END|>")
    assert (action, rec.raw_action, rec.repaired, rec.action_valid) == ("eat", "eat", True, True)
    assert rec.plan.final_action == "Eat d"
    assert rec.context_blocks["plan"]["map_analysis"].startswith("=== MAP ANALYSIS ===")
    assert "ignored" not in rec.plan.initial_prompt and "You are playing NetHack" in \
        rec.plan.initial_prompt
    action, rec = drive(agent.act(Obs("x", "")), lambda r: "<|DONE|>" if r.phase == "log"
                        else "<|ACTION|>NORTH<|END|>")
    assert (action, rec.action_valid) == ("esc", False)
    s.doc["action"]["match"] = "case_insensitive"
    agent = MemoryAgent(s, actions=["eat", "north", "esc"], default_action="esc")
    action, rec = drive(agent.act(Obs("x", "")), lambda r: "<|ACTION|>NORTH<|END|>")
    assert (action, rec.action_valid) == ("north", True)


def test_structure_drives_blocks_pruning_and_mirror(tmp_path):
    s = small_structure()
    s.doc["context"].append({"name": "recent_actions", "phases": ["plan"], "params": {"n": 2}})
    s.doc["pruning"] = [{"file": "actions_log.txt", "max_lines": 3, "keep_lines": 2}]
    env = CorridorEnv()
    agent = MemoryAgent.for_env(s.validate(), env, mirror_dir=tmp_path / "ep_00")

    def respond(req):
        if req.phase == "log":
            return "<|APPEND|>actions_log.txt|note<|END|><|DONE|>"
        return "<|ACTION|>right<|END|>"
    obs = env.reset()
    for _ in range(5):
        action, rec = drive(agent.act(obs), respond)
        obs = env.step(action)[0]
    assert "=== RECENT ACTIONS (oldest first) ===\nstep 2: right\nstep 3: right" in \
        rec.plan.initial_prompt
    assert "RECENT ACTIONS" not in rec.log.initial_prompt
    assert rec.log.notes == ["actions_log.txt: pruned 2 lines, kept 2"]
    assert rec.memory_snapshot["actions_log.txt"].startswith("[... 2 older entries pruned")
    assert (tmp_path / "ep_00" / "actions_log.txt").read_text() == \
        rec.memory_snapshot["actions_log.txt"]
    agent.reset()
    assert agent.store.files["actions_log.txt"] == ""
    assert agent.history.step == -1


def test_invalid_structure_is_refused():
    s = MemoryStructure.default("crafter")
    s.doc["budgets"]["log_turns"] = 0
    with pytest.raises(ValueError, match="budgets.log_turns"):
        MemoryAgent(s, actions=["Noop"], default_action="Noop")


_junk = st.one_of(st.text(max_size=200),
                  st.binary(max_size=200).map(lambda b: b.decode("utf-8", "surrogateescape")),
                  st.sampled_from(["<|DONE|>", "<|ACTION|>right<|END|>", "ACTION: left",
                                   "<|WRITE|>../x|y<|END|>", "<|READ|>/etc/passwd<|END|>",
                                   "<|APPEND|>actions_log.txt|" + "z" * 50 + "<|END|>"]))


@settings(max_examples=40, deadline=None)
@given(replies=st.lists(_junk, min_size=1, max_size=30), two_model=st.booleans())
def test_any_replies_give_a_valid_action(replies, two_model):
    env = CorridorEnv()
    agent = MemoryAgent.for_env(small_structure(), env, two_model=two_model)
    cycle = iter(replies * 200)
    obs = env.reset()
    for _ in range(3):
        action, rec = drive(agent.act(obs), lambda r: Completion(next(cycle)))
        assert action in env.actions
        assert len(rec.log.turns) <= 3 and len(rec.plan.turns) <= (5 if two_model else 3)
        json.dumps(rec.to_dict())
        obs = env.step(action)[0]


def test_completions_are_stripped_before_parsing():
    # Upstream's client strips each completion: the chat and the trace keep the stripped text.
    env = CorridorEnv()
    agent = MemoryAgent.for_env(small_structure(), env)
    seen = []

    def respond(r):
        seen.append(r)
        return Completion("\n  <|COUNT|>actions_log.txt|cell<|END|>  \n") if turn_index(r) == 0 \
            else "  <|ACTION|>right<|END|>\n\n"

    action, rec = drive(agent.act(env.reset()), respond)
    assert action == "right"
    assert [t.response for t in rec.plan.turns] == ["<|COUNT|>actions_log.txt|cell<|END|>",
                                                   "<|ACTION|>right<|END|>"]
    assert seen[1].messages[1] == {"role": "assistant", "content": "<|COUNT|>actions_log.txt|cell<|END|>"}


def test_crafter_fallback_is_upstreams_lower_case_noop():
    # No action committed: upstream's Crafter fallback 'noop' is not a Crafter action, so the step is
    # invalid and the env's default Noop runs.
    from automem_jax.envs import describe_crafter as dc
    s = MemoryStructure.default("crafter")
    assert s.fallback_action == "noop"
    agent = MemoryAgent(s, actions=dc.ACTIONS, default_action=dc.DEFAULT_ACTION)
    action, rec = drive(agent.act(Obs("You see grass.", "inventory")), lambda r: "I am not sure.")
    assert (rec.plan.final_action, rec.plan.fallback, rec.raw_action) == ("noop", True, "noop")
    assert (action, rec.validated_action, rec.action_valid) == ("Noop", "Noop", False)


def test_unchanged_detector_sees_the_invalid_action_notice():
    from automem_jax.envs.base import Obs as EnvObs, with_invalid_notice
    agent = MemoryAgent.for_env(small_structure(), CorridorEnv())
    same = EnvObs("You are in cell 0 of the corridor.", "You carry nothing.")
    reply = lambda r: "<|DONE|>" if r.phase == "log" else "<|ACTION|>left<|END|>"  # noqa: E731
    counts = []
    for obs in (same, with_invalid_notice(same, "left"), with_invalid_notice(same, "left"), same):
        counts.append(drive(agent.act(obs), reply)[1].unchanged_count)
    # The full text is compared: the notice makes an otherwise equal observation differ.
    assert counts == [0, 0, 1, 0]
