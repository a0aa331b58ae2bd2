"""The critic package: real HTTP against a scripted OpenAI-compatible server, trace tools over a
run folder written by the real Runner on Crafter (the original game: no JAX compile), the offline critic's proposals and judgements."""

import json
import os
import uuid

import pytest

from automem_jax.agent.types import Completion
from automem_jax.critic import (CriticClient, CriticError, HeuristicCritic, LLMCritic, ProposalError, TraceTools,
                                format_proposal, make_critic, parse_proposal, run_session)
from automem_jax.critic.client import FINAL_ANSWER_NOTICE
from automem_jax.memory.structure import MemoryStructure
from tests.critic_server import ScriptedCriticServer

KEY_ENV = "AUTOMEM_CRITIC_TEST_KEY"


class _ScriptedPolicy:
    """Fixed op text: LOG appends the same note every step (redundant writes) and searches an
    empty file (empty searches); PLAN looks something up, then waits."""

    def generate(self, requests):
        out = []
        for r in requests:
            if r.phase == "log":
                text = "<|APPEND|>actions_log.txt|saw a tree<|END|><|SEARCH|>map_notes.txt|water<|END|><|DONE|>"
            else:
                text = "<|SEARCH|>actions_log.txt|tree<|END|>\n<|ACTION|>Noop<|END|>"
            out.append(Completion(text=text, tokens_in=20, tokens_out=8))
        return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from automem_jax.rollout.runner import Runner
    d = str(tmp_path_factory.mktemp("critic_run") / "run")
    Runner(_ScriptedPolicy(), MemoryStructure.default("crafter"), d, env_name="crafter", num_envs=2, max_steps=4,
           progress=False).run([1, 2])
    return d


@pytest.fixture
def key(monkeypatch):
    value = "sk-critic-" + uuid.uuid4().hex
    monkeypatch.setenv(KEY_ENV, value)
    return value


def _files_containing(root, needle: str) -> list[str]:
    hits = []
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                if needle.encode() in fh.read():
                    hits.append(p)
    return hits


def _client(srv, **kw):
    kw.setdefault("backoff", 0.01)
    kw.setdefault("backoff_max", 0.05)
    return CriticClient(srv.base_url, "critic-model", **kw)


# ---------------------------------------------------------------------------- HTTP + tool loop

def test_tool_session_reads_traces_survives_bad_calls_and_never_leaks_the_key(run_dir, tmp_path, key):
    replies = [
        [{"name": "list_episodes", "arguments": {}}],
        [{"name": "read_steps", "arguments": {"episode": 0, "start": 1, "end": 2}}],
        [{"name": "read_steps", "arguments": {"episode": 0, "start": 40}},
         {"name": "read_memory", "arguments": {"episode": 7}}],
        [{"name": "no_such_tool", "arguments": {}}, {"name": "search_traces", "arguments": "{not json"}],
        "Final answer: the agent never moves.",
    ]
    tools = TraceTools(run_dir, MemoryStructure.default("crafter"), max_reply_chars=3000)
    with ScriptedCriticServer(replies) as srv:
        client = _client(srv, api_key_env=KEY_ENV)
        session = run_session(client, [{"role": "user", "content": "Why is progression zero?"}], tools,
                              max_turns=10)
    assert session.final_text == "Final answer: the agent never moves."
    assert session.mode == "tools" and session.turns == 5
    tool_msgs = [m for m in session.transcript if m["role"] == "tool"]
    assert len(tool_msgs) == 6 and all(len(m["content"]) <= 3000 for m in tool_msgs)
    assert tool_msgs[0]["content"].startswith("2 episode(s)") and "seed=1" in tool_msgs[0]["content"]
    assert "== episode 0 step 1 ==" in tool_msgs[1]["content"] and "step 2 ==" in tool_msgs[1]["content"]
    assert tool_msgs[2]["content"] == "error: episode 0 has steps 0-3; start step 40 does not exist"
    assert tool_msgs[3]["content"].startswith("error: episode 7 does not exist")
    assert tool_msgs[4]["content"].startswith("error: unknown tool 'no_such_tool'")
    assert tool_msgs[5]["content"].startswith("error: the arguments of search_traces are not valid JSON")
    assert session.usage["tool_calls"] == 6 and session.usage["tool_errors"] == 4

    # Each follow-up request carried the model's tool calls and our answers, matched by id.
    assert len(srv.requests) == 5 and all(r.get("tools") for r in srv.requests)
    second = srv.requests[1]["messages"]
    assert second[1]["tool_calls"][0]["function"]["name"] == "list_episodes"
    assert second[2]["role"] == "tool" and second[2]["tool_call_id"] == second[1]["tool_calls"][0]["id"]
    assert {t["function"]["name"] for t in srv.requests[0]["tools"]} == set(TraceTools.TOOLS)

    # The key went out as a bearer token and nowhere else.
    assert srv.auth_headers == [f"Bearer {key}"] * 5
    assert key not in json.dumps(session.transcript) and key not in repr(client)
    assert client.usage.calls == 5 and len(client.usage.per_call) == 5
    assert client.usage.prompt_tokens > 0 and client.usage.completion_tokens > 0
    (tmp_path / "transcript.json").write_text(json.dumps({"transcript": session.transcript,
                                                          "usage": client.usage.as_dict()}))
    assert _files_containing(tmp_path, key) == [] and _files_containing(run_dir, key) == []


def test_turn_cap_forces_one_final_call_without_tools(run_dir):
    tools = TraceTools(run_dir)
    call = [{"name": "run_summary", "arguments": {}}]
    with ScriptedCriticServer([call, call, call, "summary read"]) as srv:
        session = run_session(_client(srv), [{"role": "user", "content": "go"}], tools, max_turns=3)
    assert session.final_text == "summary read" and session.turns == 4
    assert [bool(r.get("tools")) for r in srv.requests] == [True, True, True, False]
    assert srv.requests[-1]["messages"][-1] == {"role": "user", "content": FINAL_ANSWER_NOTICE}
    assert srv.auth_headers == [""] * 4  # api_key_env=None sends no key


def test_retries_after_a_500_then_succeeds():
    with ScriptedCriticServer(["hello"], fail_first=1) as srv:
        client = _client(srv)
        reply = client.chat([{"role": "user", "content": "hi"}])
    assert reply.content == "hello" and reply.finish_reason == "stop" and reply.tool_calls == []
    assert srv.statuses == [500, 200] and client.usage.calls == 1


def test_errors_name_the_endpoint_and_status_but_never_the_key(key, tmp_path):
    with ScriptedCriticServer([], fail_first=10, fail_message="upstream broke; you sent {auth}") as srv:
        client = _client(srv, api_key_env=KEY_ENV, max_retries=1)
        with pytest.raises(CriticError) as ei:
            client.chat([{"role": "user", "content": "hi"}])
    msg = str(ei.value)
    assert srv.base_url in msg and "HTTP 500" in msg and "gave up after 2 attempts" in msg
    assert key not in msg and "<redacted>" in msg and len(srv.requests) == 2
    with ScriptedCriticServer([], fail_first=1, fail_status=401, fail_message="bad key {auth}") as srv:
        client = _client(srv, api_key_env=KEY_ENV)
        with pytest.raises(CriticError) as ei:
            client.chat([{"role": "user", "content": "hi"}])
    assert ei.value.status == 401 and len(srv.requests) == 1  # 4xx is not retried
    assert key not in str(ei.value) and key not in repr(ei.value)
    (tmp_path / "error.txt").write_text(f"{ei.value!r}\n{ei.value}")
    assert _files_containing(tmp_path, key) == []


def test_unset_key_variable_is_a_clear_error(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ValueError, match=KEY_ENV):
        CriticClient("http://127.0.0.1:9/v1", "m", api_key_env=KEY_ENV)


def test_endpoint_without_tools_gets_the_digest(run_dir):
    tools = TraceTools(run_dir)
    with ScriptedCriticServer(["digest-based answer"], reject_tools=True) as srv:
        session = run_session(_client(srv), [{"role": "user", "content": "analyse"}], tools, digest_tokens=1500)
    assert session.mode == "digest" and session.final_text == "digest-based answer"
    assert srv.statuses == [400, 200] and "tools" not in srv.requests[1]
    user = srv.requests[1]["messages"][-1]["content"]
    assert user.startswith("analyse") and "TRACE DIGEST" in user and "SAMPLED STEPS" in user
    with ScriptedCriticServer(["ok"]) as srv:  # use_tools=False: digest from the start
        session = run_session(_client(srv), [{"role": "user", "content": "analyse"}], tools, use_tools=False)
    assert session.mode == "digest" and len(srv.requests) == 1 and "tools" not in srv.requests[0]


# ---------------------------------------------------------------------------- trace tools

def test_tools_are_bounded_and_answer_errors_as_strings(run_dir):
    t = TraceTools(run_dir, MemoryStructure.default("crafter"), max_reply_chars=500)
    replies = {
        "list_episodes": t.call("list_episodes"),
        "read_steps": t.call("read_steps", '{"episode": 1, "start": 0, "end": 3}'),
        "fields": t.call("read_steps", {"episode": 0, "start": -1, "fields": ["memory_snapshot"]}),
        "search": t.call("search_traces", '{"pattern": "TREE", "max_hits": 3}'),
        "regex": t.call("search_traces", '{"pattern": "saw a (tree|rock)", "regex": true, "field": "response"}'),
        "memory": t.call("read_memory", '{"episode": 1}'),
        "structure": t.call("read_structure"),
        "section": t.call("read_structure", '{"section": "budgets"}'),
        "summary": t.call("run_summary"),
    }
    assert all(len(v) <= 500 for v in replies.values()), {k: len(v) for k, v in replies.items()}
    assert "reply truncated" in replies["structure"] and "plan_turns: 10" in replies["section"]
    assert "match(es) for 'TREE'" in replies["search"] and "response" in replies["regex"]
    assert "actions_log.txt" in replies["memory"] and '"memory_snapshot"' in replies["fields"]
    errors = [
        t.call("read_steps", '{"episode": 0, "start": 2, "end": 99}'),
        t.call("read_steps", '{"episode": "x"}'),
        t.call("read_steps", '{"start": 0}'),
        t.call("read_steps", '{"episode": 0, "start": "two"}'),
        t.call("read_steps", '{"episode": 0, "fields": ["nope"]}'),
        t.call("read_memory", '{"episode": 0, "step": 4}'),
        t.call("search_traces", '{"pattern": "(", "regex": true}'),
        t.call("search_traces", '{"pattern": "x", "field": "everything"}'),
        t.call("read_structure", '{"section": "nope"}'),
        t.call("list_episodes", "[1, 2]"),
    ]
    assert all(e.startswith("error: ") and len(e) <= 500 for e in errors), errors
    assert errors[0] == "error: episode 0 has steps 0-3; end step 99 does not exist"
    assert errors[5] == "error: episode 0 has steps 0-3; step 4 does not exist"
    assert "needs the argument(s) episode" in errors[2]
    stats = t.episode_stats(0)
    assert stats["steps"] == 4 and stats["seed"] == 1 and stats["end_reason"] == "max_steps"
    assert stats["redundant_writes"] == 2 and stats["empty_searches"] == 4 and stats["writes"] == 3
    lines = t.steps(0)
    assert stats["unchanged_steps"] == sum(1 for ln in lines if ln["unchanged_count"] > 0)
    assert TraceTools(run_dir + "_missing").call("list_episodes").startswith("error: no episodes")


def test_digest_fits_the_token_budget(run_dir):
    t = TraceTools(run_dir)
    for budget in (100, 400, 1500, 6000):
        d = t.digest(budget)
        assert len(d) <= max(400, 4 * budget), (budget, len(d))
    big = t.digest(6000)
    assert "seed=2" in big and "-- ep 1 step" in big and "log said" in big and "plan said" in big


# ---------------------------------------------------------------------------- proposal format

def test_parse_proposal_errors_are_clear():
    doc = MemoryStructure.default("crafter").to_dict()
    good = format_proposal(doc, "- nothing changed")
    parsed, rationale = parse_proposal(good, validate=True)
    assert parsed == doc and rationale == "- nothing changed"
    cases = {
        "": "reply is empty",
        "I think we should add a file.\nRationale: because": "no ```yaml block",
        "```yaml\nname: x\n": "never closed",
        "```yaml\nname: [x\n```\nRationale: r": "not valid YAML",
        "```yaml\n- a\n- b\n```": "not a mapping",
    }
    for text, expected in cases.items():
        with pytest.raises(ProposalError, match=expected):
            parse_proposal(text)
    bad = dict(doc, budgets={**doc["budgets"], "plan_turns": 0})
    with pytest.raises(ProposalError, match="budgets.plan_turns"):
        parse_proposal(format_proposal(doc, "x").replace("plan_turns: 10", "plan_turns: 0"), validate=True)
    assert parse_proposal(format_proposal(bad, "x"))[0]["budgets"]["plan_turns"] == 0  # no validation asked
    # A fragment quoted earlier does not hide the full document that follows it.
    two = "Change this:\n```yaml\nbudgets: {plan_turns: 15}\n```\n" + good
    assert parse_proposal(two)[0] == doc


# ---------------------------------------------------------------------------- offline critic

def test_heuristic_proposals_are_valid_different_and_deterministic(run_dir):
    s = MemoryStructure.default("crafter")
    tools = TraceTools(run_dir, s)
    critic = HeuristicCritic(seed=0)
    r0, r1 = critic.propose(s, tools, attempt=0), critic.propose(s, tools, attempt=1)
    d0, rat0 = parse_proposal(r0.text, validate=True)
    d1, _ = parse_proposal(r1.text, validate=True)
    assert "```yaml" in r0.text and "\nRationale:\n" in r0.text and rat0 == r0.rationale
    assert d0 != s.to_dict() and d1 != s.to_dict() and d0 != d1
    assert d0["version"] == 1 and d0["parent"] == "crafter-v0@v0" and d0["name"] == "crafter-v1"
    assert r0.edits != r1.edits and f"[edit: {r0.edits[0]}]" in r0.rationale
    assert "4 of 6 writes repeated content" in r0.text  # the note re-appended every step, cited as evidence
    again = HeuristicCritic(seed=0).propose(s, tools, attempt=0)
    assert again.text == r0.text
    cont = critic.propose(s, tools, feedback=f"v1 did not improve (0.0 vs 0.0). Its rationale:\n{r0.rationale}",
                          attempt=0)
    dc, _ = parse_proposal(cont.text, validate=True)
    assert r0.edits[0] not in cont.edits and len(cont.edits) == 2 and dc not in (d0, d1)
    for env in ("nethack", "minihack"):  # valid on every default structure, for every attempt
        for k in range(6):
            parse_proposal(critic.propose(MemoryStructure.default(env), tools, attempt=k).text, validate=True)


def _op(op, *args, text="[ok]", ok=True):
    return {"op": op, "args": list(args), "text": text, "ok": ok}


def _cand(cid, phase, ops, **kw):
    turn = {"response": "...", "ops": ops + [_op("DONE" if phase == "log" else "ACTION")],
            "tool_results": "", "committed_action": "Move West" if phase == "plan" else None}
    return {"id": cid, "episode": 0, "step": 3, "phase": phase, "messages": [], "turns": [turn],
            "reward": kw.get("reward", 0.0), "progression_delta": 0.0,
            "redundant_writes": kw.get("redundant", 0), "empty_searches": kw.get("empty", 0)}


def test_heuristic_judge_applies_each_rule_with_a_specific_reason():
    cands = [
        _cand("none", "log", []),
        _cand("failed", "log", [_op("APPEND", "ghost.txt", "x", text="[ERROR: file 'ghost.txt' does not exist]",
                                    ok=False)]),
        _cand("redundant", "log", [_op("APPEND", "notes.txt", "saw a tree")], redundant=1),
        _cand("empty", "plan", [_op("SEARCH", "map.txt", "water", text="[No lines matching 'water']")], empty=1),
        _cand("huge", "log", [_op("APPEND", "notes.txt", "tree " * 200)]),
        _cand("reread", "plan", [_op("READ", "map.txt", text="a\nb"), _op("READ", "map.txt", text="a\nb")]),
        _cand("twice", "log", [_op("APPEND", "a.txt", "same"), _op("APPEND", "a.txt", "same")]),
        _cand("good_log", "log", [_op("SEARCH", "map.txt", "tree", text="(3,4): tree"),
                                  _op("APPEND", "map.txt", "(5,1): water")], reward=1.0),
        _cand("good_plan", "plan", [_op("SEARCH", "map.txt", "water", text="(5,1): water")]),
    ]
    out = HeuristicCritic().judge(cands)
    assert [o["id"] for o in out] == [c["id"] for c in cands]
    got = {o["id"]: (o["decision"], o["reason"]) for o in out}
    assert got["none"] == ("reject", "no memory op in this LOG phase (only DONE)")
    assert got["failed"][0] == "reject" and "APPEND(ghost.txt) failed" in got["failed"][1]
    assert got["redundant"][0] == "reject" and "already in memory" in got["redundant"][1]
    assert got["empty"][0] == "reject" and "SEARCH(map.txt for 'water') found nothing" in got["empty"][1]
    assert got["huge"][0] == "reject" and "oversized write" in got["huge"][1]
    assert got["reread"][0] == "reject" and "READ(map.txt) re-read" in got["reread"][1]
    assert got["twice"][0] == "reject" and "same text twice" in got["twice"][1]
    assert got["good_log"][0] == "accept" and "map.txt" in got["good_log"][1] and "reward 1" in got["good_log"][1]
    assert got["good_plan"][0] == "accept" and "'Move West'" in got["good_plan"][1]


# ---------------------------------------------------------------------------- LLM critic + factory

def test_llm_critic_proposes_over_http_and_repairs_a_broken_answer(run_dir, key):
    s = MemoryStructure.default("crafter")
    doc = s.to_dict()
    doc["budgets"]["plan_turns"] = 14
    good = "I looked at the traces.\n" + format_proposal(doc, "- more PLAN turns: plans hit the budget")
    replies = [[{"name": "list_episodes", "arguments": {}}], "```yaml\nbudgets: [oops\n```", good]
    with ScriptedCriticServer(replies) as srv:
        critic = make_critic({"kind": "openai", "base_url": srv.base_url, "model": "critic-model",
                              "api_key_env": KEY_ENV, "max_turns": 5, "backoff": 0.01})
        assert isinstance(critic, LLMCritic)
        reply = critic.propose(s, TraceTools(run_dir, s))
    parsed, rationale = parse_proposal(reply.text, validate=True)
    assert parsed["budgets"]["plan_turns"] == 14 and rationale.startswith("- more PLAN turns")
    assert reply.usage["calls"] == 3 and reply.usage["repairs"] == 1
    first = srv.requests[0]["messages"]
    assert first[0]["role"] == "system" and "STRUCTURAL" in first[0]["content"]
    assert "crafter-v0@v0" in first[1]["content"] and "```yaml" in first[1]["content"]
    assert "not valid YAML" in srv.requests[2]["messages"][-1]["content"]
    assert key not in json.dumps(reply.transcript)


def test_llm_critic_judge_parses_decisions_and_rejects_what_it_skipped():
    cands = [_cand("a", "log", [_op("APPEND", "n.txt", "x")]), _cand("b", "plan", []), _cand("c", "log", [])]
    answer = ('```json\n[{"id": "a", "decision": "accept", "reason": "new fact"},'
              ' {"id": "b", "decision": "REJECT", "reason": "no lookup"}]\n```')
    with ScriptedCriticServer([answer]) as srv:
        critic = make_critic({"kind": "openai", "base_url": srv.base_url, "model": "m"})
        out = critic.judge(cands)
    assert out == [{"id": "a", "decision": "accept", "reason": "new fact"},
                   {"id": "b", "decision": "reject", "reason": "no lookup"},
                   {"id": "c", "decision": "reject", "reason": "the critic gave no valid decision for this candidate"}]
    assert "candidate id=\"c\"" in srv.requests[0]["messages"][1]["content"]


def _context_cand(cid, first_prompt, results=""):
    obs = f"[{cid}] A zombie stands two steps north. Health 5/9, Food 6/9."
    memory = {"dangers.txt": f"[{cid}] zombies hit for 2 at night", "actions_log.txt": f"[{cid}] Step 4: slept"}
    msgs = [{"role": "user", "content": first_prompt + "\n" + obs},
            {"role": "assistant", "content": "<|SEARCH|>dangers.txt|zombie<|END|>"},
            {"role": "user", "content": "Results of your commands:\n" + (results or "zombies hit for 2 at night")},
            {"role": "assistant", "content": "<|APPEND|>dangers.txt|zombie north at step 5<|END|>\n<|DONE|>"}]
    turns = [{"prompt": msgs[0]["content"], "response": msgs[1]["content"],
              "ops": [_op("SEARCH", "dangers.txt", "zombie", text="zombies hit for 2 at night")], "tool_results": ""},
             {"prompt": msgs[2]["content"], "response": msgs[3]["content"],
              "ops": [_op("APPEND", "dangers.txt", "zombie north at step 5", text="[Appended]"), _op("DONE")],
              "tool_results": "[Appended to dangers.txt]"}]
    return {"id": cid, "episode": 0, "step": 5, "phase": "log", "messages": msgs, "turns": turns,
            "observation": obs, "memory_before": memory, "prev_action": "Do", "reward": 0.0,
            "progression_delta": 0.0, "redundant_writes": 0, "empty_searches": 0}


def test_llm_critic_judge_sends_observation_memory_and_turns_over_http():
    cands = [_context_cand("a", "Fixed LOG instructions."), _context_cand("b", "Fixed LOG instructions.")]
    answer = json.dumps([{"id": "a", "decision": "accept", "reason": "new danger"},
                         {"id": "b", "decision": "reject", "reason": "dup"}])
    with ScriptedCriticServer([answer]) as srv:
        critic = make_critic({"kind": "openai", "base_url": srv.base_url, "model": "m", "judge_token_budget": 3000})
        out = critic.judge(cands)
    assert [o["decision"] for o in out] == ["accept", "reject"]
    sent = srv.requests[0]["messages"][1]["content"]  # the judge's actual HTTP input
    for c in cands:
        assert c["observation"] in sent and all(text in sent for text in c["memory_before"].values())
        assert all(m["content"] in sent for m in c["messages"][1:])  # replies and the results prompt
        assert "[Appended to dangers.txt]" in sent and "APPEND(dangers.txt, zombie north at step 5)" in sent
    assert "previous action (its outcome is what LOG records): Do" in sent
    report = critic.render_log[0]
    assert report["candidates"] == 2 and report["clipped"] == 0 and report["budget_tokens"] == 3000
    assert report["counter"] == "chars/4 estimate" and report["tokens"] > 0 and "prompt_tokens" in report


def test_llm_critic_judge_clips_over_budget_but_keeps_observation_and_memory():
    long_prompt = "Always follow the memory rules below. " * 500  # ~19k characters of fixed text
    cands = [_context_cand("a", long_prompt, results="old result line. " * 400)]
    with ScriptedCriticServer([json.dumps([{"id": "a", "decision": "accept", "reason": "fine"}])]) as srv:
        critic = make_critic({"kind": "openai", "base_url": srv.base_url, "model": "m", "judge_token_budget": 400})
        critic.judge(cands)
    sent = srv.requests[0]["messages"][1]["content"]
    c = cands[0]
    assert c["observation"] in sent and all(text in sent for text in c["memory_before"].values())
    assert c["messages"][-1]["content"] in sent  # the reply being judged
    assert long_prompt[:2000] not in sent and "characters omitted" in sent
    report = critic.render_log[0]
    assert report["clipped"] == 1 and report["over_budget"] == 0 and report["tokens"] <= 400
    with pytest.raises(ValueError, match="judge_token_budget must be an integer >= 1"):
        make_critic({"kind": "openai", "base_url": srv.base_url, "model": "m", "judge_token_budget": 0})


def test_make_critic_validates_the_spec(monkeypatch):
    assert isinstance(make_critic({"kind": "heuristic", "seed": 3}), HeuristicCritic)
    with pytest.raises(ValueError, match="critic.kind must be one of openai, heuristic"):
        make_critic({"kind": "claude"})
    with pytest.raises(ValueError, match=r"unknown field\(s\) temperature for kind 'heuristic'"):
        make_critic({"kind": "heuristic", "temperature": 0.5})
    with pytest.raises(ValueError, match="critic.base_url is required"):
        make_critic({"kind": "openai", "model": "m"})
    with pytest.raises(ValueError, match="critic.max_turns must be an integer >= 1"):
        make_critic({"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m", "max_turns": 0})
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ValueError, match=f"critic: environment variable {KEY_ENV}"):
        make_critic({"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m", "api_key_env": KEY_ENV})


@pytest.mark.parametrize("reply", [
    '{"results": [{"id": "a", "decision": "accept", "reason": "r"}]}',
    'Draft:\n```\nnot json yet\n```\nFinal:\n```json\n[{"id": "a", "decision": "ACCEPT", "reason": "r"}]\n```',
    'Here you go [{"id": "a", "decision": "accept", "reason": "r"}] — done.',
])
def test_judgement_list_found_in_the_usual_reply_shapes(reply):
    from automem_jax.critic.client import _decisions
    from automem_jax.critic.protocol import parse_decisions
    assert parse_decisions(reply)[0]["id"] == "a"
    got = _decisions([{"id": "a"}, {"id": "b"}], reply)
    assert got[0] == {"id": "a", "decision": "accept", "reason": "r"}
    assert got[1]["decision"] == "reject" and "no valid decision" in got[1]["reason"]
