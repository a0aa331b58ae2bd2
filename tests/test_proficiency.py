"""Loop 2 mining: candidates from a real Craftax run, upstream's post-process rules, judging, the
dataset folder and the resumable iteration ledger."""

import json
import os
import re

import pytest

from automem_jax.agent.types import Completion
from automem_jax.critic import protocol
from automem_jax.loops import judging, loop2, loop2_data, loop2_mining
from automem_jax.loops import postprocess as PP
from automem_jax.rollout.traces import summarize
from automem_jax.training.data import validate_conversation

# ----------------------------------------------------------------------------- a real run folder

LOG_GOOD_0 = "Let me look first.\n<|SEARCH|>actions_log.txt|Step<|END|>"
LOG_GOOD_1 = "<|APPEND|>actions_log.txt|Step {p}: moved, nothing else<|END|>\n<|DONE|>"
LOG_SAME = "<|APPEND|>actions_log.txt|A tree stands to the east<|END|>\n<|DONE|>"  # redundant after its first time
LOG_EMPTY = "```\n<|SEARCH|>map_notes.txt|diamond<|END|>\n```"  # an empty search in a fence
LOG_NOOPS = "Nothing new happened."
PLAN_SEARCH = "<|SEARCH|>actions_log.txt|tree<|END|>"
PLAN_ACT = "<|ACTION|>Noop<|END|>"
PLAN_MIXED = "<|TAIL|>actions_log.txt|2<|END|>\nThe tree is east, so I go there.\n<|ACTION|>Move East<|END|>"


class ScriptedClient:
    """LOG behaviour by the previous step p (read from the prompt): p%4==0 search then append,
    ==1 the same note every time, ==2 a fenced empty search then DONE, ==3 no ops. PLAN by a
    counter n of PLAN phases: n%3==0 search then action-only, ==1 lookup + reasoning + action in
    one reply, ==2 action only."""

    def __init__(self):
        self.plans = 0

    def _one(self, req):
        turn = (len(req.messages) - 1) // 2
        if req.phase == "log":
            p = int(re.search(r"PREVIOUS action \(step (\d+)\)", req.messages[0]["content"]).group(1))
            kind = p % 4
            if kind == 0:
                return LOG_GOOD_0 if turn == 0 else LOG_GOOD_1.format(p=p)
            if kind == 1:
                return LOG_SAME
            if kind == 2:
                return LOG_EMPTY if turn == 0 else "<|DONE|>"
            return LOG_NOOPS
        if turn == 0:
            self.plans += 1
        kind = (self.plans - 1) % 3
        if kind == 0:
            return PLAN_SEARCH if turn == 0 else PLAN_ACT
        return PLAN_MIXED if kind == 1 else PLAN_ACT

    def generate(self, requests):
        return [Completion(self._one(r), 100, 10) for r in requests]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from automem_jax.memory.structure import MemoryStructure
    from automem_jax.rollout.runner import Runner
    d = str(tmp_path_factory.mktemp("loop2") / "run")
    # One slot: the PLAN counter then maps to steps deterministically.
    Runner(ScriptedClient(), MemoryStructure.default("crafter"), d, "craftax", num_envs=1, max_steps=8,
           progress=False).run([3, 4])
    return d


def _by_id(cands):
    return {c["id"]: c for c in cands}


def test_extract_candidates_rebuild_the_chat_verbatim(run_dir):
    cands = loop2_mining.extract_candidates(run_dir)
    ids = _by_id(cands)
    assert len(ids) == len(cands)
    prefix = "craftax/Craftax-Classic/ep0"
    assert f"{prefix}/s0/log" not in ids and f"{prefix}/s0/plan" in ids  # no LOG at step 0
    # 2 episodes x (7 LOG + 8 PLAN) phases
    assert len(cands) == 30
    lines = [json.loads(x) for x in open(os.path.join(run_dir, "traces/craftax/Craftax-Classic/ep_0.jsonl"))]
    for c in cands:
        msgs = c["messages"]
        assert [m["role"] for m in msgs] == ["user", "assistant"] * (len(msgs) // 2)
        assert [m["content"] for m in msgs[1::2]] == [t["response"] for t in c["turns"]]
        assert c["episode"] in (0, 1) and c["seed"] == (3, 4)[c["episode"]]
        assert set(c) >= {"id", "episode", "step", "phase", "messages", "turns", "reward", "progression_delta",
                          "redundant_writes", "empty_searches", "episode_return", "episode_progression"}
        if c["episode"] == 0:
            line = lines[c["step"]]
            assert msgs[0]["content"] == line[c["phase"]]["initial_prompt"]
            # one model, no failed call: every turn of the phase, as upstream's examples hold them
            assert c["turns"] == line[c["phase"]]["turns"]
    # step 1 LOG (p=0): search, then append + DONE; the second user message carries the results
    two = ids[f"{prefix}/s1/log"]["messages"]
    assert [m["content"] for m in two[1::2]] == [LOG_GOOD_0, LOG_GOOD_1.format(p=0)]
    assert two[2]["content"].startswith("Results of your commands:") and "actions_log.txt" in two[2]["content"]
    # the same note at steps 2 and 6: new the first time, redundant the second
    assert ids[f"{prefix}/s2/log"]["redundant_writes"] == 0
    assert ids[f"{prefix}/s6/log"]["redundant_writes"] == 1
    assert ids[f"{prefix}/s3/log"]["empty_searches"] == 1 and ids[f"{prefix}/s3/log"]["redundant_writes"] == 0
    # PLAN keeps its trailing action-only turn (upstream's post-processing then drops such an example)
    assert [m["content"] for m in ids[f"{prefix}/s0/plan"]["messages"][1::2]] == [PLAN_SEARCH, PLAN_ACT]
    assert PP.postprocess(ids[f"{prefix}/s0/plan"]) == (None, "action_only")
    assert loop2_mining.extract_candidates(run_dir, phases=("plan",)) == [c for c in cands if c["phase"] == "plan"]
    s1 = ids[f"{prefix}/s1/log"]
    assert s1["prev_action"] == lines[0]["validated_action"] and s1["memory_before"] == lines[0]["memory_snapshot"]
    assert s1["observation"].startswith(lines[1]["obs_long_term"])


# ----------------------------------------------------------------------------- postprocess rules

def ex(phase, *assistant, users=None):
    msgs = []
    for i, a in enumerate(assistant):
        msgs += [{"role": "user", "content": (users or {}).get(i, f"prompt {i}")}, {"role": "assistant", "content": a}]
    return {"id": f"x/{phase}/{len(assistant)}", "phase": phase, "messages": msgs}


def last(out):
    return out["messages"][-1]["content"]


def test_fence_around_ops_is_unwrapped_in_every_assistant_turn():
    out, why = PP.postprocess(ex("log", "```\n<|SEARCH|>a.txt|x<|END|>\n```",
                                "Noting it:\n```text\n<|APPEND|>a.txt|x seen<|END|>\n<|DONE|>\n```"))
    assert why == "ok" and "fence_unwrapped" in out["edits"]
    assert out["messages"][1]["content"] == "<|SEARCH|>a.txt|x<|END|>"
    assert last(out) == "Noting it:\n<|APPEND|>a.txt|x seen<|END|>\n<|DONE|>"
    assert out["messages"][0] == {"role": "user", "content": "prompt 0"}  # user turns untouched


def test_log_is_cut_at_done():
    out, why = PP.postprocess(ex("log", "<|APPEND|>a.txt|x<|END|>\n<|DONE|>\nAlso <|APPEND|>a.txt|y<|END|>"))
    assert why == "ok" and last(out) == "<|APPEND|>a.txt|x<|END|>\n<|DONE|>" and out["edits"] == ["done_cut"]


def test_plan_is_cut_before_the_action():
    out, why = PP.postprocess(ex("plan", PLAN_MIXED))
    assert why == "ok" and last(out) == "<|TAIL|>actions_log.txt|2<|END|>"
    assert out["edits"] == ["action_cut", "tail_trimmed"]
    out, why = PP.postprocess(ex("plan", "<|READ|>a.txt<|END|>\nACTION: Noop"))  # the line form too
    assert why == "ok" and last(out) == "<|READ|>a.txt<|END|>"


def test_action_only_plan_is_dropped():
    assert PP.postprocess(ex("plan", PLAN_SEARCH, "Going east. <|ACTION|>Move East<|END|>")) == (None, "action_only")
    # long reasoning without a lookup is not action-only, but it has no memory op either
    long_text = "I think about it. " * 20 + "<|ACTION|>Noop<|END|>"
    assert PP.postprocess(ex("plan", long_text)) == (None, "no_memory_op_after_cut")


def test_last_turn_without_memory_op_is_dropped():
    assert PP.postprocess(ex("log", "Nothing new.")) == (None, "no_op_in_last_turn")
    # As upstream: DONE counts as an op, and ops are recognised by their tags in any phase
    out, why = PP.postprocess(ex("log", LOG_GOOD_0, "<|DONE|>"))
    assert why == "ok" and last(out) == "<|DONE|>"
    out, why = PP.postprocess(ex("log", "<|DONE|> <|APPEND|>a.txt|late<|END|>"))
    assert why == "ok" and last(out) == "<|DONE|>" and out["edits"] == ["done_cut"]
    for text in ("<|APPEND|>a.txt|x<|END|>", "<|TAIL|>a.txt|many<|END|>", "<|search|>a.txt|x<|end|>"):
        out, why = PP.postprocess(ex("plan", text))
        assert why == "ok" and last(out) == text


def test_text_after_the_last_op_is_trimmed():
    out, why = PP.postprocess(ex("log", "Checking.\n<|SEARCH|>a.txt|x<|END|>\nI expect nothing there."))
    assert why == "ok" and last(out) == "Checking.\n<|SEARCH|>a.txt|x<|END|>" and out["edits"] == ["tail_trimmed"]
    out, why = PP.postprocess(ex("log", "<|UPSERT_MAP|>(3,4)|fountain<|END|> then more"))  # keyed ops count
    assert why == "ok" and last(out) == "<|UPSERT_MAP|>(3,4)|fountain<|END|>"


def test_remaining_fence_drops_the_example():
    assert PP.postprocess(ex("log", "```python\nx = 1\n```\n<|APPEND|>a.txt|x<|END|>")) == (None, "fence_remaining")
    # an earlier turn may keep a fence that holds no op: only the last turn is held to the rule
    out, why = PP.postprocess(ex("log", "```\nplain\n```\n<|READ|>a.txt<|END|>", "<|APPEND|>a.txt|y<|END|>"))
    assert why == "ok" and "```" in out["messages"][1]["content"]


def test_bad_alternation_is_dropped():
    good = ex("log", "<|READ|>a.txt<|END|>")["messages"]
    for msgs in ([], good[:1], good[::-1], [good[0], good[0], good[1]], good + [good[0]],
                 [{"role": "system", "content": "s"}] + good, [{"role": "user", "content": None}, good[1]]):
        assert PP.postprocess({"phase": "log", "messages": msgs}) == (None, "bad_alternation")
    assert PP.postprocess({"messages": good})[1] == "ok"  # phase-agnostic, as upstream


def test_turn_with_an_action_is_cut_before_it_in_any_phase():
    assert PP.postprocess(ex("log", "<|ACTION|>Noop<|END|> <|APPEND|>a.txt|x<|END|>")) == \
        (None, "no_memory_op_after_cut")
    out, why = PP.postprocess(ex("log", "<|APPEND|>a.txt|x<|END|> <|ACTION|>Noop<|END|>"))
    assert why == "ok" and last(out) == "<|APPEND|>a.txt|x<|END|>"
    # an ACTION before DONE survives upstream's rules but fails its post-checks: dropped here
    assert PP.postprocess(ex("log", "<|ACTION|>Noop<|END|><|DONE|>")) == (None, "post_check:action_in_last")


def test_verify_is_clean_on_postprocess_output_and_flags_bad_examples(run_dir):
    crafted = [ex("log", "```\n<|APPEND|>a.txt|x<|END|>\n<|DONE|>\n```"), ex("plan", PLAN_MIXED),
               ex("log", "<|SEARCH|>a.txt|x<|END|> trailing"), ex("plan", "<|READ|>a.txt<|END|>")]
    kept, dropped = PP.postprocess_all(crafted + loop2_mining.extract_candidates(run_dir))
    assert len(kept) >= len(crafted) and dropped
    assert PP.verify(kept) == []
    assert all(c["messages"][-1]["content"].endswith(("<|END|>", "<|DONE|>")) for c in kept)
    bad = {
        "fence": ex("log", "```\n<|APPEND|>a.txt|x<|END|>\n```"),
        "ACTION": ex("plan", "<|READ|>a.txt<|END|><|ACTION|>Noop<|END|>"),
        "after the last op": ex("log", "<|APPEND|>a.txt|x<|END|> and so on"),
        "no memory op": ex("log", "Just prose."),
        "alternation": {"id": "alt", "phase": "log", "messages": [{"role": "assistant", "content": "<|DONE|>"}]},
    }
    for what, example in bad.items():
        problems = PP.verify([example])
        assert problems and any(what in p for p in problems), (what, problems)


# ----------------------------------------------------------------------------- judging

class StubJudge:
    def __init__(self, reply_fn):
        self.reply_fn, self.calls = reply_fn, []

    def judge(self, batch):
        self.calls.append([c["id"] for c in batch])
        return self.reply_fn(batch)


def _cands(n):
    return [{"id": f"c{i}", "phase": "log", "messages": []} for i in range(n)]


def test_judge_reply_missing_an_id_rejects_it_and_never_accepts_by_default():
    def reply(batch):
        out = [{"id": c["id"], "decision": "ACCEPT", "reason": "fine"} for c in batch[1:]]  # drops the first id
        out.append({"id": "stranger", "decision": "accept", "reason": "not asked"})
        if any(c["id"] == "c3" for c in batch):
            out.append({"id": "c3", "decision": "reject", "reason": "changed my mind"})
        if any(c["id"] == "c4" for c in batch):
            out = [d if d["id"] != "c4" else {**d, "decision": "maybe"} for d in out]
        return out
    judge = StubJudge(reply)
    got = judging.judge_candidates(_cands(5), judge, batch_size=3)
    assert judge.calls == [["c0", "c1", "c2"], ["c3", "c4"]]
    assert [d["id"] for d in got] == [f"c{i}" for i in range(5)]
    d = {x["id"]: x for x in got}
    assert d["c0"]["decision"] == "reject" and d["c0"]["reason"] == "no decision"
    assert d["c3"]["decision"] == "reject" and d["c3"]["reason"] == "changed my mind"  # answered late, still counts
    assert d["c4"]["decision"] == "reject" and "invalid decision" in d["c4"]["reason"]
    assert d["c1"]["decision"] == d["c2"]["decision"] == "accept"
    conflicting = StubJudge(lambda b: [{"id": "c0", "decision": "accept"}, {"id": "c0", "decision": "reject"}])
    assert judging.judge_candidates(_cands(1), conflicting)[0]["decision"] == "reject"
    with pytest.raises(protocol.JudgeError, match="list"):
        judging.judge_candidates(_cands(2), StubJudge(lambda b: {"c0": "accept"}))


class FakeChat:
    def __init__(self, *replies):
        self.replies, self.seen = list(replies), []

    def chat(self, messages):
        self.seen.append(messages)
        return type("Reply", (), {"content": self.replies.pop(0)})()


def test_llm_judge_reads_a_fenced_json_reply():
    batch = [{"id": "craftax/T/ep0/s1/log", "phase": "log", "step": 1, "reward": 0.0,
              "messages": [{"role": "user", "content": "obs " * 5000},
                           {"role": "assistant", "content": "<|APPEND|>a.txt|x<|END|>"}]}]
    chat = FakeChat('Here you go:\n```json\n[{"id": "craftax/T/ep0/s1/log", "decision": "accept", '
                    '"reason": "new fact"}]\n```')
    judge = judging.LLMJudge(chat, token_budget=500)
    assert judge.judge(batch) == [{"id": "craftax/T/ep0/s1/log", "decision": "accept", "reason": "new fact"}]
    prompt = chat.seen[0][-1]["content"]
    assert "craftax/T/ep0/s1/log" in prompt and "<|APPEND|>a.txt|x<|END|>" in prompt
    assert len(prompt) < len(judging.DEFAULT_JUDGE_INSTRUCTIONS) + 2500  # the long prompt was clipped
    assert judge.render_log == [{"candidates": 1, "tokens": judge.render_log[0]["tokens"], "clipped": 1,
                                 "over_budget": 0, "budget_tokens": 500, "counter": "chars/4 estimate"}]
    assert 400 < judge.render_log[0]["tokens"] <= 500


def test_llm_judge_shows_observation_memory_and_replies_within_bounds(run_dir):
    cands = [c for c in loop2_mining.extract_candidates(run_dir) if c["step"] == 1]
    chat = FakeChat(json.dumps([{"id": c["id"], "decision": "reject", "reason": "meh"} for c in cands]))
    got = judging.judge_candidates(cands, judging.LLMJudge(chat, token_budget=1500))
    assert [d["decision"] for d in got] == ["reject"] * len(cands)
    prompt = chat.seen[0][0]["content"]
    assert len(prompt) < len(judging.DEFAULT_JUDGE_INSTRUCTIONS) + len(cands) * (1500 * 4 + 100)
    for c in cands:
        # the whole context: observation, every memory file as it was, the previous action, the turns
        assert c["id"] in prompt and c["observation"] in prompt and c["prev_action"] in prompt
        assert c["memory_before"] and all(text in prompt for text in c["memory_before"].values())
        assert all(m["content"] in prompt for m in c["messages"][1::2])  # short replies are shown whole
        for later in c["messages"][2::2]:  # the prompts that carry command results
            assert later["content"][-200:] in prompt
    assert "previous action (its outcome is what LOG records)" in prompt


def test_llm_judge_retries_once_with_the_parse_error_then_rejects_all():
    batch = _cands(2)
    chat = FakeChat("[{'id': c0}", '[{"id": "c0", "decision": "accept", "reason": "ok"}, '
                    '{"id": "c1", "decision": "reject", "reason": "dup"}]')
    got = judging.judge_candidates(batch, judging.LLMJudge(chat))
    assert [d["decision"] for d in got] == ["accept", "reject"] and len(chat.seen) == 2
    assert chat.seen[1][-2]["content"] == "[{'id': c0}" and "could not be used" in chat.seen[1][-1]["content"]
    chat = FakeChat("no idea", "still {not json")
    got = judging.judge_candidates(batch, judging.LLMJudge(chat))
    assert len(chat.seen) == 2
    assert all(d["decision"] == "reject" and d["source"] == "judge_error" and "unusable" in d["reason"] for d in got)


def _big_candidate():
    obs = "You see a tree to the east and water to the north.\nHealth 9/9, Food 7/9."
    memory = {"actions_log.txt": "Step 1: moved east\nStep 2: collected wood", "map_notes.txt": "(3,4): water"}
    instructions = "You are an agent. Follow these rules carefully. " * 400  # long fixed text
    results = ["Results of your commands:\n" + f"result line of turn {k}. " * 300 for k in range(3)]
    replies = ["<|SEARCH|>actions_log.txt|wood<|END|>", "<|READ|>map_notes.txt<|END|>",
               "<|TAIL|>actions_log.txt|2<|END|>", "<|APPEND|>actions_log.txt|Step 3: drank water<|END|>\n<|DONE|>"]
    msgs = [{"role": "user", "content": instructions + "\n" + obs}]
    for k, r in enumerate(replies):
        msgs.append({"role": "assistant", "content": r})
        if k < len(results):
            msgs.append({"role": "user", "content": results[k]})
    return {"id": "craftax/T/ep0/s3/log", "phase": "log", "step": 3, "episode": 0, "reward": 0.0,
            "messages": msgs, "observation": obs, "memory_before": memory, "prev_action": "Move North"}, results


def test_clipping_keeps_observation_memory_and_replies_and_cuts_fixed_text_first():
    from automem_jax.critic import judge_view
    c, results = _big_candidate()
    text, info = judge_view.render_candidate(c, token_budget=1200)
    assert info["clipped"] and not info["over_budget"] and info["tokens"] <= 1200
    assert c["observation"] in text and all(v in text for v in c["memory_before"].values())
    assert "Move North" in text and all(m["content"] in text for m in c["messages"][1::2])
    assert "Follow these rules carefully. " * 20 not in text  # the fixed instructions went first
    assert results[-1][-300:] in text and results[0][-300:] not in text  # older results before newer
    whole, info = judge_view.render_candidate(c, token_budget=100_000)
    assert not info["clipped"] and all(r in whole for r in results)

    class WordTokenizer:  # any encode(text) -> sequence counts
        def encode(self, s):
            return s.split()
    texts, report = judge_view.render_batch([c, c], 500, WordTokenizer())
    assert report["counter"] == "tokenizer" and report["clipped"] == 2 and report["candidates"] == 2
    assert report["tokens"] == sum(len(t.split()) for t in texts) and report["tokens"] <= 2 * 500
    assert all(c["observation"] in t for t in texts)


def test_judge_render_report_reaches_selection_stats(run_dir, tmp_path):
    def reply(messages):
        ids = re.findall(r'### candidate id="([^"]+)"', messages[-1]["content"])
        return json.dumps([{"id": i, "decision": "accept", "reason": "ok"} for i in ids])

    class EchoChat:
        def chat(self, messages):
            return reply(messages)
    judge = judging.LLMJudge(EchoChat(), token_budget=800)
    out = str(tmp_path / "ds")
    stats = loop2_data.build_iteration_dataset(run_dir, out, judge, min_examples=1, batch_size=4)
    r = stats["judge_render"]
    assert r["batches"] == len(judge.render_log) > 1 and r["counter"] == ["chars/4 estimate"]
    assert r["candidates"] == sum(b["candidates"] for b in judge.render_log) and r["budget_tokens"] == [800]
    assert r["tokens_rendered"] == sum(b["tokens"] for b in judge.render_log) > 0
    assert r["clipped"] == sum(b["clipped"] for b in judge.render_log)
    assert json.load(open(os.path.join(out, "selection_stats.json")))["judge_render"] == r


# ----------------------------------------------------------------------------- dataset and loop

def accept_odd_steps(batch):
    return [{"id": c["id"], "decision": "accept" if c["step"] % 2 else "reject", "reason": "parity"} for c in batch]


def _read(path):
    return [json.loads(x) for x in open(path)]


def test_build_iteration_dataset_writes_the_folder_and_resumes(run_dir, tmp_path):
    out = str(tmp_path / "ds")
    judge = StubJudge(accept_odd_steps)
    stats = loop2_data.build_iteration_dataset(run_dir, out, judge, min_examples=1, version=7, batch_size=4)
    assert sorted(os.listdir(out)) == ["DONE", "judge_cache", "review_decisions.jsonl", "selected.jsonl",
                                       "selection_stats.json"]
    cands = loop2_mining.extract_candidates(run_dir)
    rows = _read(os.path.join(out, "review_decisions.jsonl"))
    assert [r["id"] for r in rows] == [c["id"] for c in cands]  # every candidate has a decision
    assert all(set(r) >= {"episode", "step", "phase", "decision", "reason"} for r in rows)
    pp = [r for r in rows if r["stage"] == "postprocess"]
    assert pp and all(r["decision"] == "reject" for r in pp)
    # (a LOG ending in a bare <|DONE|> is kept, as upstream keeps it: DONE counts as an op)
    assert {r["reason"] for r in pp} >= {"action_only", "no_op_in_last_turn"}
    selected = _read(os.path.join(out, "selected.jsonl"))
    assert selected and PP.verify(selected) == []
    for s in selected:  # rows are what the SFT data builder reads
        assert validate_conversation(s["conversations"], s["id"]) == s["conversations"]
        assert s["meta"]["phase"] in ("log", "plan") and s["conversations"][-1]["role"] == "assistant"
    judged = [r for r in rows if r["stage"] == "judge"]
    assert sum(len(c) for c in judge.calls) == len(judged)
    assert {s["id"] for s in selected} == {r["id"] for r in judged if r["decision"] == "accept"}
    assert all(s["meta"]["step"] % 2 == 1 for s in selected)
    assert stats["selected"] == len(selected) and stats["candidates"] == len(cands) and stats["violations"] == 0
    assert stats["version"] == 7 and sum(stats["by_decision"].values()) == len(cands)
    assert stats["by_phase"]["log"]["candidates"] + stats["by_phase"]["plan"]["candidates"] == len(cands)
    assert stats == json.load(open(os.path.join(out, "selection_stats.json")))

    def boom(batch):
        raise AssertionError("a finished dataset must not be judged again")
    assert loop2_data.build_iteration_dataset(run_dir, out, StubJudge(boom), min_examples=1, version=7) == stats


def test_too_few_examples_raise_but_keep_the_judged_work(run_dir, tmp_path):
    out = str(tmp_path / "ds")
    judge = StubJudge(accept_odd_steps)
    with pytest.raises(loop2_data.NotEnoughExamples) as e:
        loop2_data.build_iteration_dataset(run_dir, out, judge, min_examples=10_000)
    assert e.value.min_examples == 10_000 and e.value.selected == e.value.stats["selected"] > 0
    assert not os.path.exists(os.path.join(out, "DONE"))
    assert json.load(open(os.path.join(out, "selection_stats.json")))["status"] == "not_enough_examples"
    # the re-run reuses the cached verdicts: the judge is not asked again
    again = StubJudge(accept_odd_steps)
    stats = loop2_data.build_iteration_dataset(run_dir, out, again, min_examples=10_000, allow_fewer=True)
    assert again.calls == [] and stats["selected"] == e.value.selected
    assert os.path.exists(os.path.join(out, "DONE"))


def test_top_pct_keeps_the_best_episodes(run_dir, tmp_path):
    cands = loop2_mining.extract_candidates(run_dir)
    fake = [dict(c, episode_progression=0.5 if c["episode"] == 1 else 0.1) for c in cands]
    kept, dropped = loop2_mining.filter_top_episodes(fake, 50)
    assert {c["episode"] for c in kept} == {1} and {c["episode"] for c in dropped} == {0}
    assert loop2_mining.filter_top_episodes(fake, 100) == (fake, [])
    stats = loop2_data.build_iteration_dataset(run_dir, str(tmp_path / "ds"), StubJudge(accept_odd_steps),
                                      min_examples=0, top_pct=50)
    assert stats["by_stage"]["filter"]["reject"] == len(cands) // 2


def test_run_loop2_writes_ledger_rows_and_resumes_without_redoing_units(run_dir, tmp_path):
    workdir = str(tmp_path / "work")
    calls = {"train": [], "eval": []}

    def train_fn(dataset_dir, out_dir, it):
        calls["train"].append(it)
        n = len(open(os.path.join(dataset_dir, "selected.jsonl")).readlines())
        ckpt = os.path.join(out_dir, "ckpt.txt")
        open(ckpt, "w").write(f"trained on {n}")
        return {"checkpoint": ckpt, "first_loss": 2.0, "final_loss": 1.0 - 0.1 * it, "steps": 5, "examples": n}

    fail_eval_at = {1}

    def eval_fn(train_result, eval_dir, it):
        calls["eval"].append(it)
        if it in fail_eval_at:
            fail_eval_at.clear()
            raise RuntimeError("eval crashed")
        assert open(train_result["checkpoint"]).read().startswith("trained on")
        folder = os.path.join(eval_dir, "traces", "craftax", "Craftax-Classic")
        os.makedirs(folder)
        eps = []
        for k, prog in enumerate([0.1, 0.3]):
            ep = {"env": "craftax", "task": "Craftax-Classic", "seed": 42 + k, "episode_idx": k, "num_steps": 4,
                  "episode_return": prog * 10, "progression": prog, "end_reason": "max_steps",
                  "input_tokens": 10, "output_tokens": 2,
                  "hygiene": {"ops": 4, "writes": 2, "redundant_writes": 1, "searches": 2, "empty_searches": 0,
                              "invalid_actions": 0, "context_tokens_per_step": 100.0}}
            json.dump(ep, open(os.path.join(folder, f"ep_{k}.json"), "w"))
            open(os.path.join(folder, f"ep_{k}.jsonl"), "w").close()
            eps.append(ep)
        return summarize(eps)

    kw = dict(workdir=workdir, traces_dir=run_dir, judge=StubJudge(accept_odd_steps), train_fn=train_fn,
              eval_fn=eval_fn, iterations=2, min_examples=1, reuse_dataset=True)
    with pytest.raises(RuntimeError, match="eval crashed"):
        loop2.run_loop2(**kw)
    assert calls == {"train": [0, 1], "eval": [0, 1]} and len(loop2.read_ledger(workdir)) == 1
    rows = loop2.run_loop2(**kw)  # iteration 0 is in the ledger; iteration 1 only needs its eval
    assert calls == {"train": [0, 1], "eval": [0, 1, 1]}
    assert [r["iteration"] for r in rows] == [0, 1] and loop2.read_ledger(workdir) == rows
    assert sorted(os.listdir(os.path.join(workdir, "datasets"))) == ["0"]  # reused by iteration 1
    r0, r1 = rows
    assert r0["dataset_dir"] == r1["dataset_dir"]
    assert r1["dataset_reused_from"] == 0 and r0["dataset_reused_from"] is None
    assert r0["n_examples"] == r0["train"]["examples"] > 0
    assert r0["train"]["first_loss"] == 2.0 and r1["train"]["final_loss"] == pytest.approx(0.9)
    assert r0["progression_mean"] == pytest.approx(20.0) and r0["progression_se"] == pytest.approx(10.0 / 2 ** 0.5)  # population sd
    assert [e["progression"] for e in r0["per_episode"]] == [0.1, 0.3]
    assert r0["hygiene"]["redundant_write_rate"] == 0.5 and r0["hygiene"]["ops_per_step"] == 1.0
    assert r0["hygiene"]["context_tokens_per_step"] == 100.0 and r0["hygiene"]["empty_search_rate"] == 0.0
    assert set(r0["counts"]) >= {"by_phase", "by_decision"} and r0["seconds"]["train"] is not None
    assert r1["seconds"]["train"] is None  # loaded from its DONE marker

    assert loop2.run_loop2(**kw) == rows and calls == {"train": [0, 1], "eval": [0, 1, 1]}
    more = loop2.run_loop2(**{**kw, "iterations": 1, "start_iteration": 2, "reuse_dataset": False})
    assert calls["train"][-1] == 2 and more[0]["dataset_dir"].endswith(os.path.join("datasets", "2"))
    assert [r["iteration"] for r in loop2.read_ledger(workdir)] == [0, 1, 2]


def _turn(role, prompt, response, ops=(), error=None):
    return {"phase": "plan", "model_role": role, "prompt": prompt, "response": response, "ops": list(ops),
            "tool_results": "", "committed_action": None, "error": error}


def _write_run(root, lines_by_episode, finished=(0,)):
    folder = os.path.join(root, "traces", "nethack", "NetHackChallenge-v0")
    os.makedirs(folder)
    for k, lines in lines_by_episode.items():
        with open(os.path.join(folder, f"ep_{k}.jsonl"), "w") as f:
            f.writelines(json.dumps(ln) + "\n" for ln in lines)
        if k in finished:
            json.dump({"seed": 9, "episode_return": 1.5, "progression": 0.25},
                      open(os.path.join(folder, f"ep_{k}.json"), "w"))
    return root


def test_two_model_consultation_stops_at_the_gameplay_model_and_at_errors(tmp_path):
    search = {"op": "SEARCH", "args": ["map.txt", "stairs"], "text": "[No lines matching 'stairs']", "ok": True}
    plan = {"initial_prompt": "p0", "turns": [
        _turn("memory", "p0", "<|SEARCH|>map.txt|stairs<|END|>", [search]),
        _turn("memory", "results", "Nothing. <|ACTION|>search<|END|>"),
        _turn("gameplay", "Now commit your action.", "<|ACTION|>far east<|END|>")]}
    append = {"op": "APPEND", "args": ["notes.txt", "door east"], "text": "[Appended]", "ok": True}
    log = {"initial_prompt": "l0", "turns": [
        {**_turn("memory", "l0", "<|APPEND|>notes.txt|door east<|END|>", [append]), "phase": "log"},
        {**_turn("memory", "more", "", error="timeout"), "phase": "log"}]}
    lines = [{"step": 0, "reward": 0.0, "progression": 0.0, "log": {"turns": []}, "plan": plan,
              "memory_snapshot": {"notes.txt": "door east"}},
             {"step": 1, "reward": 1.0, "progression": 0.25, "log": log,
              "plan": {"turns": [_turn("memory", "x", "", error="boom")]},  # first call failed: nothing to mine
              "memory_snapshot": {"notes.txt": "door east\ndoor east"}}]
    run = _write_run(str(tmp_path / "run"), {0: lines, 1: lines}, finished=(0,))  # episode 1 is unfinished
    cands = _by_id(loop2_mining.extract_candidates(run))
    assert sorted(cands) == ["nethack/NetHackChallenge-v0/ep0/s0/plan", "nethack/NetHackChallenge-v0/ep0/s1/log"]
    p0 = cands["nethack/NetHackChallenge-v0/ep0/s0/plan"]
    # The memory model's turns, up to the gameplay model's: the last one is action-only, so
    # post-processing drops the example, as upstream drops such a PLAN.
    assert [m["content"] for m in p0["messages"]] == ["p0", "<|SEARCH|>map.txt|stairs<|END|>", "results",
                                                      "Nothing. <|ACTION|>search<|END|>"]
    assert PP.postprocess(p0) == (None, "action_only")
    assert p0["empty_searches"] == 1 and p0["seed"] == 9 and p0["episode_progression"] == 0.25
    l1 = cands["nethack/NetHackChallenge-v0/ep0/s1/log"]
    assert len(l1["messages"]) == 2 and l1["redundant_writes"] == 1  # "door east" was already stored
    assert l1["reward"] == 1.0 and l1["progression_delta"] == 0.25
    # the traces folder itself is accepted as well as the run folder
    assert _by_id(loop2_mining.extract_candidates(os.path.join(run, "traces"))).keys() == cands.keys()


def test_dataset_on_gcs(run_dir, gcs_emulator):
    from automem_jax import storage
    out = f"{gcs_emulator}/loop2/datasets/0"
    stats = loop2_data.build_iteration_dataset(run_dir, out, StubJudge(accept_odd_steps), min_examples=1)
    assert storage.exists(f"{out}/DONE") and stats["selected"] > 0
    rows = [json.loads(x) for x in storage.read_text(f"{out}/selected.jsonl").splitlines()]
    assert len(rows) == stats["selected"] and PP.verify(rows) == []
    assert loop2_data.build_iteration_dataset(run_dir, out, StubJudge(lambda b: 1 / 0), min_examples=1) == stats


# ----------------------------------------------------------------------------- cap and decider

def _accept_all(batch):
    return [{"id": c["id"], "decision": "accept", "reason": "ok"} for c in batch]


def _sel(phase, ep, n):
    return [{"id": f"craftax/T/ep{ep}/s{i}/{phase}", "meta": {"env": "craftax", "task": "T", "episode": ep,
                                                              "step": i, "phase": phase}} for i in range(n)]


def test_stratified_cap_keeps_phase_and_episode_shares_and_is_seeded():
    rows = _sel("log", 0, 30) + _sel("log", 1, 10) + _sel("plan", 0, 20) + _sel("plan", 2, 40)
    kept, strata = loop2_data.stratified_cap(rows, 20, seed=3)
    assert len(kept) == 20 and [r for r in rows if r in kept] == kept  # original order kept
    assert strata["log"]["accepted"] == 40 and strata["log"]["kept"] == 8  # 40% of 20
    assert strata["plan"]["kept"] == 12
    assert strata["log"]["by_episode"] == {"craftax/T/ep0": [30, 6], "craftax/T/ep1": [10, 2]}
    assert strata["plan"]["by_episode"] == {"craftax/T/ep0": [20, 4], "craftax/T/ep2": [40, 8]}
    assert loop2_data.stratified_cap(rows, 20, seed=3) == (kept, strata)  # deterministic
    other, _ = loop2_data.stratified_cap(rows, 20, seed=4)
    assert len(other) == 20 and {r["id"] for r in other} != {r["id"] for r in kept}
    assert loop2_data.stratified_cap(rows, 500, seed=3)[0] == rows


def test_build_iteration_dataset_caps_the_selection_and_records_it(run_dir, tmp_path):
    full = loop2_data.build_iteration_dataset(run_dir, str(tmp_path / "all"), StubJudge(_accept_all), min_examples=1)
    n = full["selected"]
    assert n > 4 and full["accepted"] == n and full["cap"]["applied"] is False
    out = str(tmp_path / "cap")
    stats = loop2_data.build_iteration_dataset(run_dir, out, StubJudge(_accept_all), min_examples=1, max_examples=4,
                                      sample_seed=1)
    assert stats["selected"] == 4 and stats["accepted"] == n and stats["cap"]["kept"] == 4
    assert stats["cap"]["applied"] and stats["cap"]["sample_seed"] == 1
    strata = stats["cap"]["strata"]
    assert sum(s["kept"] for s in strata.values()) == 4 and sum(s["accepted"] for s in strata.values()) == n
    assert stats["by_stage"]["cap"] == {"reject": n - 4} and stats["by_reason"]["cap:over_max_examples"] == n - 4
    rows = _read(os.path.join(out, "review_decisions.jsonl"))
    capped = [r for r in rows if r["stage"] == "cap"]
    assert len(capped) == n - 4 and all(r["judge_decision"] == "accept" for r in capped)
    ids = [s["id"] for s in _read(os.path.join(out, "selected.jsonl"))]
    again = loop2_data.build_iteration_dataset(run_dir, str(tmp_path / "cap2"), StubJudge(_accept_all), min_examples=1,
                                      max_examples=4, sample_seed=1)
    assert [s["id"] for s in _read(str(tmp_path / "cap2" / "selected.jsonl"))] == ids
    assert again["cap"]["strata"] == strata


def _fake_eval(progress_by_iter):
    def eval_fn(train_result, eval_dir, it):
        folder = os.path.join(eval_dir, "traces", "craftax", "Craftax-Classic")
        os.makedirs(folder)
        eps = []
        for k in range(2):
            prog = progress_by_iter[it] + 0.01 * k
            ep = {"env": "craftax", "task": "Craftax-Classic", "seed": 42 + k, "episode_idx": k, "num_steps": 4,
                  "episode_return": prog, "progression": prog, "end_reason": "max_steps",
                  "input_tokens": 1, "output_tokens": 1,
                  "hygiene": {"ops": 2, "writes": 1, "redundant_writes": 0, "searches": 1, "empty_searches": 0,
                              "invalid_actions": 0, "context_tokens_per_step": 10.0}}
            json.dump(ep, open(os.path.join(folder, f"ep_{k}.json"), "w"))
            open(os.path.join(folder, f"ep_{k}.jsonl"), "w").close()
            eps.append(ep)
        return summarize(eps)
    return eval_fn


def test_run_loop2_with_the_decider_changes_course_between_iterations(run_dir, tmp_path):
    from automem_jax.loops.decider import Decider, Options
    workdir = str(tmp_path / "work")
    recipes = []

    def train_fn(dataset_dir, out_dir, it, recipe=None):
        recipes.append(recipe)
        n = len(open(os.path.join(dataset_dir, "selected.jsonl")).readlines())
        return {"checkpoint": out_dir, "first_loss": 2.0, "final_loss": 1.0, "steps": 3, "examples": n,
                "recipe": recipe}

    judge = StubJudge(_accept_all)
    opts = Options(lora_rank=16, top_pct=100, min_examples=1, max_examples=4, lr_scales=(0.5, 1))
    kw = dict(workdir=workdir, traces_dir=run_dir, judge=judge, train_fn=train_fn,
              eval_fn=_fake_eval({0: 0.2, 1: 0.1, 2: 0.3}), iterations=2, min_examples=1, max_examples=4,
              decider=Decider(opts, None))
    rows = loop2.run_loop2(**kw)
    r0, r1 = rows
    assert r0["decision"]["by"] == "initial" and r1["decision"]["by"] == "fallback"
    assert r1["decision"]["critic"] == "the critic is offline (heuristic)"
    # the cap cut iteration 0's dataset, so the rule re-samples it and tries the next recipe
    assert r1["decision"]["data"] == "regenerate" and r1["decision"]["sample_seed"] == 1
    assert r1["decision"]["recipe"]["lr_scale"] == 0.5
    assert recipes == [r0["decision"]["recipe"], r1["decision"]["recipe"]]
    assert r0["dataset_dir"] != r1["dataset_dir"] and r0["n_accepted"] > r0["n_examples"] == 4
    sel = [{s["id"] for s in _read(os.path.join(r["dataset_dir"], "selected.jsonl"))} for r in rows]
    assert sel[0] != sel[1]
    # the second dataset reused the first one's judge cache: every candidate was asked once
    asked = sum(len(c) for c in judge.calls)
    assert asked == r0["n_candidates"] - r0["counts"]["by_stage"].get("postprocess", {}).get("reject", 0)
    assert json.load(open(os.path.join(workdir, "loop2", "1", "decision", "decision.json"))) == r1["decision"]
    assert loop2.read_ledger(workdir) == rows

    # iteration 2: progression fell in iteration 1 -> back to iteration 0's recipe, stricter judge
    more = loop2.run_loop2(**{**kw, "iterations": 1, "start_iteration": 2})
    d2 = more[0]["decision"]
    assert d2["judge"] == "strict" and d2["recipe"] == r0["decision"]["recipe"] and "fell" in d2["rationale"]


def test_run_loop2_asks_the_critic_once_per_iteration_and_resumes_its_choice(run_dir, tmp_path):
    from automem_jax.loops.decider import Decider, Options
    workdir = str(tmp_path / "work")
    asked = []

    def chat(messages):
        asked.append(messages)
        return json.dumps({"data": "reuse", "judge": "default", "top_pct": 100, "lr_scale": 2,
                           "epochs_scale": 1, "lora_rank": 16, "rationale": "same data, faster learning"})

    def train_fn(dataset_dir, out_dir, it, recipe=None):
        if it == 1 and not os.path.exists(os.path.join(out_dir, "crashed")):
            open(os.path.join(out_dir, "crashed"), "w").close()
            raise RuntimeError("train crashed")
        return {"checkpoint": out_dir, "first_loss": 2.0, "final_loss": 1.0, "steps": 3, "examples": 1}

    kw = dict(workdir=workdir, traces_dir=run_dir, judge=StubJudge(_accept_all), train_fn=train_fn,
              eval_fn=_fake_eval({0: 0.2, 1: 0.3}), iterations=2, min_examples=1,
              decider=Decider(Options(lora_rank=16, lr_scales=(1, 2)), chat))
    with pytest.raises(RuntimeError, match="train crashed"):
        loop2.run_loop2(**kw)
    rows = loop2.run_loop2(**kw)
    assert len(asked) == 1  # the saved decision is reused on resume
    d = rows[1]["decision"]
    assert d["by"] == "critic" and d["data"] == "reuse" and d["recipe"]["lr_scale"] == 2
    assert rows[1]["dataset_dir"] == rows[0]["dataset_dir"] and rows[1]["dataset_reused_from"] == 0
