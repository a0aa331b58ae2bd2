"""Loop 1 with a real LLM critic: `python -m automem_jax.llm.server` serving the packaged
Qwen2.5-Coder-0.5B-Instruct is the critic endpoint of a `launch.tpu_run` baseline,loop1 run.

The policy is the random tiny preset (bootstrap off, 1 seed x 2 steps); the critic gets 16 tokens
per reply, so its replies are real model text that (almost surely) holds no complete structure.
What must hold either way is asserted, branching on the recorded status: every reply the server
sent is in the candidate's transcript, the errors went back to the model in the next request, the
token counts are the server's, and the loop recorded its decision. A recording proxy between the
critic and the server (bench/loop1_real_critic.py) keeps each exchange as it crossed the wire.
"""
import json
import os

import pytest

from automem_jax.critic.protocol import parse_proposal
from bench.loop1_real_critic import (CriticServer, RecordingProxy, counts, llm_overrides, read_archive, reply_error,
                                     reply_text, run_launcher)

pytestmark = pytest.mark.slow

MAX_TOKENS = 16
REPAIR = "Your answer could not be used: "


def _user_text(body: dict) -> str:
    return "\n".join(m["content"] for m in body["messages"] if m["role"] == "user")


def test_loop1_with_the_packaged_model_as_critic(tmp_path):
    workdir = str(tmp_path / "work")
    with CriticServer(str(tmp_path / "server.log"), max_len=4096) as srv, RecordingProxy(srv.base_url) as proxy:
        ov = llm_overrides(proxy.base_url, srv.model, max_tokens=MAX_TOKENS, attempts=1, timeout_s=600)
        rc, _secs, _cmd = run_launcher(workdir, "baseline,loop1", ov, str(tmp_path / "job.log"), timeout_s=900)
        chats = proxy.chats()
    assert rc == 0, open(tmp_path / "job.log").read()[-4000:]

    # The server answered every critic request, as the model configured, within the token cap.
    assert chats and all(c["status"] == 200 for c in chats), [c["status"] for c in chats]
    for c in chats:
        assert c["request"]["model"] == srv.model == "qwen2.5-coder-0.5b-instruct"
        assert c["request"]["max_tokens"] == MAX_TOKENS and "tools" not in c["request"]
        assert 1 <= c["response"]["usage"]["completion_tokens"] <= MAX_TOKENS
    replies = [reply_text(c) for c in chats]

    rows = read_archive(workdir)
    assert [r["id"] for r in rows] == ["v0", "r1a1"]
    row = rows[1]
    assert row["status"] in ("invalid", "accepted", "rejected"), row  # never "error": the endpoint answered

    # The transcript holds exactly the replies the server sent, in order.
    assert row["transcript"] and os.path.isfile(row["transcript"])
    rounds = json.load(open(row["transcript"]))
    said = [m["content"] for r in rounds for m in r["transcript"] if m["role"] == "assistant"]
    assert said == replies
    cdir = os.path.dirname(row["transcript"])
    assert open(os.path.join(cdir, "reply.txt")).read() == replies[-1]
    # Token accounting is the server's.
    assert row["usage"]["calls"] == len(chats)
    assert row["usage"]["prompt_tokens"] == sum(c["response"]["usage"]["prompt_tokens"] for c in chats)
    assert row["usage"]["completion_tokens"] == sum(c["response"]["usage"]["completion_tokens"] for c in chats)

    # Feedback: each unusable reply's error reached the model in the very next request.
    k = 0  # index into chats
    for i, rnd in enumerate(rounds):
        if i > 0:
            prev_error = rounds[i - 1]["error"]
            assert prev_error in rnd["feedback"] and "NOT evaluated" in rnd["feedback"]
            assert prev_error in _user_text(chats[k]["request"])  # the next round's first request
        msgs = rnd["transcript"]
        n_replies = sum(m["role"] == "assistant" for m in msgs)
        for j in range(n_replies - 1):  # the critic's repair turns inside one round
            err = reply_error(replies[k + j])
            assert err is not None
            nxt = chats[k + j + 1]["request"]["messages"]
            assert nxt[-2] == {"role": "assistant", "content": replies[k + j]}
            assert nxt[-1]["role"] == "user" and nxt[-1]["content"].startswith(REPAIR + err)
        k += n_replies
    assert k == len(chats)

    # The loop's decision, either way.
    best = json.load(open(os.path.join(workdir, "structures", "best.json")))
    result = json.load(open(os.path.join(workdir, "stages", "loop1", "result.json")))
    assert os.path.isfile(os.path.join(workdir, "stages", "loop1", "DONE")) and result["candidates"] == 2
    if row["status"] == "invalid":
        assert len(rounds) == 2 and row["feedback_rounds"] == 1  # fed back once, then archived
        assert row["error"] == rounds[-1]["error"] == row["invalid_errors"][-1]
        assert row["metric"] is None and row["run_dir"] is None and not os.path.exists(os.path.join(cdir, "eval"))
        assert best["version"] == 0 and best["id"] == "v0" and counts(rows) == (1, 0, 0)
    else:
        doc, _ = parse_proposal(replies[-1], validate=True)
        assert os.path.isfile(os.path.join(cdir, "eval", "summary.json")) and row["metric"]["episodes"] == 1
        assert row["diff"] and "error" not in rounds[-1]
        accepted = row["status"] == "accepted"
        assert best["version"] == (1 if accepted else 0) and result["accepted"] == 1 + accepted
