"""Loop 2's decider (automem_jax/loops/decider.py): the critic's reply parsed strictly, the fallback
rule when it is offline or unusable, datasets that really differ, judge strictness and recipes."""

import json

import pytest

from automem_jax.loops import decider as D

OPTS = D.Options(lora_rank=16, top_pct=100, min_examples=10, max_examples=50, sample_seed=7,
                 lr_scales=(0.5, 1, 2), epochs_scales=(1, 2), lora_ranks=(8, 16), top_pcts=(100, 50))


def row(it, mean, n=40, accepted=None, judge="default", top=100, recipe=None, data="regenerate", se=1.0):
    recipe = recipe or {"lr_scale": 1.0, "epochs_scale": 1.0, "lora_rank": 16}
    return {"iteration": it, "progression_mean": mean, "progression_se": se, "n_examples": n,
            "n_accepted": n if accepted is None else accepted, "n_candidates": 200,
            "dataset_dir": f"/w/datasets/{it}", "dataset_version": it,
            "counts": {"by_phase": {"log": {"candidates": 100}}, "by_decision": {"accept": n}},
            "train": {"first_loss": 2.0, "final_loss": 1.0, "steps": 5},
            "decision": {"by": "initial" if it == 0 else "fallback", "data": data, "judge": judge, "top_pct": top,
                         "sample_seed": 7 + it, "recipe": recipe}}


def reply(**over):
    obj = {"data": "regenerate", "judge": "strict", "top_pct": 50, "lr_scale": 2, "epochs_scale": 1,
           "lora_rank": 8, "rationale": "progression rose; try a tighter filter"}
    obj.update(over)
    return json.dumps(obj)


class Chat:
    def __init__(self, text):
        self.text, self.messages = text, []

    def __call__(self, messages):
        self.messages.append(messages)
        if isinstance(self.text, Exception):
            raise self.text
        return type("Reply", (), {"content": self.text})()


def test_options_put_the_configured_values_first_and_list_one_knob_recipes():
    assert OPTS.lora_ranks == (16, 8) and OPTS.lr_scales == (1.0, 0.5, 2) and OPTS.top_pcts == (100.0, 50)
    assert OPTS.recipes()[0] == {"lr_scale": 1.0, "epochs_scale": 1.0, "lora_rank": 16}
    assert len(OPTS.recipes()) == 1 + 2 + 1 + 1
    with pytest.raises(ValueError, match="lr_scales"):
        D.Options(lr_scales=(0,))
    with pytest.raises(ValueError, match="top_pcts"):
        D.Options(top_pcts=(150,))


def test_first_iteration_is_the_configured_one():
    d = D.Decider(OPTS, Chat("unused")).decide([], 0)
    assert d["by"] == "initial" and d["judge"] == "default" and d["sample_seed"] == 7 and d["data"] == "regenerate"


def test_critic_reply_is_parsed_and_recorded():
    chat = Chat("```json\n" + reply() + "\n```")
    d = D.Decider(OPTS, chat).decide([row(0, 10.0, accepted=80)], 1)
    assert d["by"] == "critic" and "invalid_reply" not in d
    assert (d["data"], d["judge"], d["top_pct"]) == ("regenerate", "strict", 50)
    assert d["recipe"] == {"lr_scale": 2, "epochs_scale": 1.0, "lora_rank": 8}
    assert d["sample_seed"] == 8 and d["rationale"].startswith("progression rose")
    prompt = chat.messages[0][0]["content"]
    assert '"iteration": 0' in prompt and '"lenient", "default", "strict"' in prompt and "max_examples=50" in prompt


@pytest.mark.parametrize("text, why", [
    ("I would regenerate with a strict judge.", "not a JSON object"),
    (json.dumps([json.loads(reply())]), "expected a JSON object"),
    (reply(extra=1), "unexpected ['extra']"),
    (json.dumps({k: v for k, v in json.loads(reply()).items() if k != "lora_rank"}), "missing ['lora_rank']"),
    (reply(judge="harsh"), "judge='harsh' is not one of"),
    (reply(lr_scale=3), "lr_scale=3 is not one of"),
    (reply(lora_rank=True), "lora_rank=True is not a number"),
    (reply(rationale=" "), "rationale must be a non-empty string"),
    ("Here it is: " + reply(), "not a JSON object"),
    ("", "empty reply"),
])
def test_an_invalid_reply_falls_back_and_says_why(text, why):
    hist = [row(0, 10.0, accepted=80)]
    d = D.Decider(OPTS, Chat(text)).decide(hist, 1)
    assert d["by"] == "fallback" and why in d["invalid_reply"]
    assert {k: d[k] for k in ("data", "judge", "recipe")} == {k: v for k, v in D.fallback(hist, OPTS).items()
                                                             if k in ("data", "judge", "recipe")}


def test_a_failed_critic_call_falls_back():
    d = D.Decider(OPTS, Chat(ConnectionError("refused"))).decide([row(0, 10.0)], 1)
    assert d["by"] == "fallback" and d["invalid_reply"] == "critic call failed: ConnectionError: refused"


def test_offline_decider_records_why_the_rule_decided():
    d = D.Decider(OPTS, None, offline_reason="the critic is heuristic (offline)").decide([row(0, 10.0)], 1)
    assert d["by"] == "fallback" and d["critic"] == "the critic is heuristic (offline)"


def test_fallback_relaxes_when_too_few_examples():
    d = D.fallback([row(0, 10.0, n=3, judge="strict", top=50)], OPTS)
    assert (d["data"], d["judge"], d["top_pct"]) == ("regenerate", "default", 100.0)
    assert "fewer than min_examples=10" in d["rationale"]
    # already as lenient as it goes: the other rules decide
    d = D.fallback([row(0, 10.0, n=3, judge="lenient")], OPTS)
    assert d["judge"] == "lenient" and "next recipe" in d["rationale"]


def test_fallback_goes_back_to_the_best_recipe_with_a_stricter_judge_when_progression_fell():
    best = {"lr_scale": 0.5, "epochs_scale": 1.0, "lora_rank": 16}
    hist = [row(0, 10.0), row(1, 14.0, recipe=best), row(2, 9.0, recipe={**best, "lr_scale": 2})]
    d = D.fallback(hist, OPTS)
    assert d["recipe"] == best and d["judge"] == "strict" and d["data"] == "regenerate"
    assert "iteration 2" in d["rationale"] and "iteration 1" in d["rationale"]
    # the best was strict already: the episode filter tightens instead
    hist[1]["decision"]["judge"] = "strict"
    d = D.fallback(hist, OPTS)
    assert d["judge"] == "strict" and d["top_pct"] == 50


def test_fallback_tries_the_next_recipe_and_reuses_or_resamples_the_data():
    d = D.fallback([row(0, 10.0)], OPTS)
    assert d["recipe"] == {"lr_scale": 0.5, "epochs_scale": 1.0, "lora_rank": 16} and d["data"] == "reuse"
    d = D.fallback([row(0, 10.0, n=50, accepted=120)], OPTS)  # the cap cut it: a fresh sample differs
    assert d["data"] == "regenerate" and "fresh stratified sample" in d["rationale"]
    tried = [row(i, 10.0 + i, recipe=r) for i, r in enumerate(OPTS.recipes())]
    d = D.fallback(tried, OPTS)
    assert d["recipe"] == OPTS.recipes()[-1] and "every recipe is tried" in d["rationale"]


def test_reuse_points_at_the_previous_dataset_and_a_useless_regenerate_becomes_a_reuse():
    dec = D.Decider(OPTS, None)
    d = dec.decide([row(0, 10.0)], 1)
    assert d["data"] == "reuse" and d["dataset_dir"] == "/w/datasets/0" and d["dataset_from"] == 0
    # the critic asks to regenerate what already exists (same judge and filter, not capped)
    d = D.Decider(OPTS, Chat(reply(judge="default", top_pct=100))).decide([row(0, 10.0)], 1)
    assert d["by"] == "critic" and d["data"] == "reuse" and "reused instead" in d["adjusted"][0]
    # capped before: the same judge and filter with a new seed is a different dataset
    d = D.Decider(OPTS, Chat(reply(judge="default", top_pct=100))).decide([row(0, 10.0, accepted=90)], 1)
    assert d["data"] == "regenerate" and d["sample_seed"] == 8 and "adjusted" not in d
    # a reuse keeps the dataset's own judge and filter
    d = D.Decider(OPTS, Chat(reply(data="reuse"))).decide([row(0, 10.0)], 1)
    assert (d["judge"], d["top_pct"]) == ("default", 100) and "are unused" in d["adjusted"][0]


def test_rows_without_a_decision_read_as_the_configured_choice():
    old = {"iteration": 0, "progression_mean": 5.0, "n_examples": 30, "config": {"top_pct": 100}}
    d = D.Decider(OPTS, None).decide([old], 1)
    assert d["by"] == "fallback" and d["recipe"]["lr_scale"] == 0.5


class Heuristic:
    def judge(self, batch):
        return [{"id": c["id"], "decision": "accept", "reason": "fine"} for c in batch]


class WithInstructions(Heuristic):
    instructions = "Judge."


def test_strict_judge_rejects_flawed_accepts_and_notes_reach_llm_judges():
    batch = [{"id": "a", "redundant_writes": 1}, {"id": "b", "edits": ["tail_trimmed"]},
             {"id": "c", "edits": ["action_cut"]}, {"id": "d", "empty_searches": 2}]
    got = D.StrictnessJudge(Heuristic(), "strict").judge(batch)
    assert [g["decision"] for g in got] == ["reject", "reject", "accept", "reject"]
    assert got[0]["reason"] == "strict: redundant writes 1" and got[1]["reason"] == "strict: edit tail_trimmed"
    assert [g["decision"] for g in D.StrictnessJudge(Heuristic(), "lenient").judge(batch)] == ["accept"] * 4
    inner = WithInstructions()
    assert "LENIENT" in D.StrictnessJudge(inner, "lenient")._judge.instructions and inner.instructions == "Judge."
    assert D.Decider(OPTS).judge(inner, "default") is inner
    with pytest.raises(ValueError):
        D.StrictnessJudge(inner, "harsh")


def test_apply_recipe_scales_the_train_config():
    t = {"learning_rate": 1e-3, "epochs": 3.0, "max_steps": 6, "lora_rank": 16, "lora_alpha": 32.0}
    out = D.apply_recipe(t, {"lr_scale": 0.5, "epochs_scale": 2, "lora_rank": 8})
    assert out == {"learning_rate": 5e-4, "epochs": 6.0, "max_steps": 12, "lora_rank": 8, "lora_alpha": 16.0}
    assert D.apply_recipe(t, None) == t and t["lora_rank"] == 16


def test_a_critic_without_instructions_judges_through_llm_judge_with_the_note():
    from automem_jax.loops.judging import LLMJudge

    class Critic:  # LLMCritic's shape: a chat client, a fixed system prompt of its own
        client = type("Client", (), {"chat": lambda self, messages: "[]"})()

        def judge(self, batch):
            raise AssertionError("the strict judge must not use the critic's fixed prompt")

    wrapped = D.StrictnessJudge(Critic(), "strict")._judge
    assert isinstance(wrapped, LLMJudge) and wrapped.instructions.endswith(D.JUDGE_NOTES["strict"])
