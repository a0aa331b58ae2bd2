"""SFT data pipeline: chat -> ids + loss mask with the real Qwen3 tokenizer, batches, save/load."""

import json

import numpy as np
import pytest

from automem_jax.models.tokenizer import apply_chat_template, load_tokenizer
from automem_jax.training.data import (DataConfig, DataError, SFTDataset, bucket, build_dataset, length_bucket,
                                       max_target_positions, tokenize_conversation)

EOT = "<|im_end|>"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def conv(n_turns=3, system=True, tool_role="tool", words=5, tag=""):
    """A LOG-phase-like conversation with n_turns assistant turns."""
    msgs = [{"role": "system", "content": "You play Crafter. Keep notes."}] if system else []
    msgs.append({"role": "user", "content": f"Observation{tag}: " + "tree to the north. " * words})
    for k in range(n_turns):
        msgs.append({"role": "assistant", "content": f"<|SEARCH|>notes.md|wood {k}{tag}<|END|>"})
        if k < n_turns - 1:
            msgs.append({"role": tool_role, "content": f"result {k}: wood at 3,4" + " more" * words})
    return msgs


def spans(mask):
    """(start, end) of each run of True."""
    edges = np.diff(np.concatenate([[0], mask.astype(int), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def assistant_texts(msgs):
    return [m["content"] for m in msgs if m["role"] == "assistant"]


@pytest.mark.parametrize("tool_role", ["tool", "user"])
def test_masks_cover_each_assistant_turn_and_prefixes_match_inference(tok, tool_role):
    msgs = conv(3, tool_role=tool_role)
    ex = tokenize_conversation(tok, msgs, DataConfig())
    assert ex.ids.dtype == np.int32 and ex.loss_mask.dtype == bool and ex.ids.shape == ex.loss_mask.shape
    runs = spans(ex.loss_mask)
    assert [tok.decode(ex.ids[a:b]) for a, b in runs] == [c + EOT for c in assistant_texts(msgs)]
    assert ex.target_turns == 3 and ex.unaligned_turns == 0 and not ex.truncated
    # the tokens before each target are exactly what the model is prompted with at inference
    a_idx = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    for (start, _), k in zip(runs, a_idx):
        assert ex.ids[:start].tolist() == apply_chat_template(tok, msgs[:k])
    # system, user and tool text sits only in unmasked tokens
    masked_text = tok.decode(ex.ids[ex.loss_mask])
    unmasked_text = tok.decode(ex.ids[~ex.loss_mask])
    for m in msgs:
        if m["role"] != "assistant":
            assert m["content"] in unmasked_text and m["content"] not in masked_text
    assert "<|im_start|>" not in masked_text and "assistant\n" not in masked_text


def test_loss_on_last_marks_only_the_last_turn(tok):
    msgs = conv(3)
    ex = tokenize_conversation(tok, msgs, DataConfig(loss_on="last"))
    runs = spans(ex.loss_mask)
    assert len(runs) == 1 and tok.decode(ex.ids[runs[0][0]:runs[0][1]]) == msgs[-1]["content"] + EOT
    assert runs[0][1] == len(ex.ids)
    full = tokenize_conversation(tok, msgs, DataConfig())
    assert np.array_equal(full.ids, ex.ids)


def test_earlier_turn_the_template_renders_differently_stays_masked(tok):
    msgs = conv(2)
    msgs[2]["content"] = "\n" + msgs[2]["content"]  # merges with the header's newline in later prompts
    ex = tokenize_conversation(tok, msgs, DataConfig())
    assert ex.unaligned_turns == 1 and ex.target_turns == 1
    (a, b), = spans(ex.loss_mask)
    assert tok.decode(ex.ids[a:b]) == msgs[-1]["content"] + EOT


def test_truncation_drops_oldest_exchanges_and_keeps_last_target(tok):
    msgs = conv(4, words=40)
    full = tokenize_conversation(tok, msgs, DataConfig(cutoff_len=100_000))
    cutoff = full.length - 60
    ex = tokenize_conversation(tok, msgs, DataConfig(cutoff_len=cutoff))
    assert ex.truncated and ex.length <= cutoff and ex.removed_turns >= 1
    kept = assistant_texts(msgs)[ex.removed_turns:]
    assert [tok.decode(ex.ids[a:b]) for a, b in spans(ex.loss_mask)] == [c + EOT for c in kept]
    # what is left is the template's rendering of the shorter conversation
    a_idx = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    reduced = msgs[:a_idx[0]] + msgs[a_idx[ex.removed_turns]:]
    assert ex.ids[:spans(ex.loss_mask)[-1][0]].tolist() == apply_chat_template(tok, reduced[:-1])
    assert ex.ids[-1] == tok.convert_tokens_to_ids(EOT)
    # no more exchanges were removed than needed
    fewer = msgs[:a_idx[0]] + msgs[a_idx[ex.removed_turns - 1]:]
    assert tokenize_conversation(tok, fewer, DataConfig(cutoff_len=100_000)).length > cutoff


def test_truncation_cuts_middle_of_prompt_when_needed(tok):
    msgs = conv(2, words=300)
    cutoff = 64
    ex = tokenize_conversation(tok, msgs, DataConfig(cutoff_len=cutoff))
    assert ex.truncated and ex.length == cutoff and ex.removed_turns == 1
    (a, b), = spans(ex.loss_mask)
    assert b == cutoff and tok.decode(ex.ids[a:b]) == msgs[-1]["content"] + EOT
    head = tok.decode(ex.ids[:8])
    assert head.startswith("<|im_start|>system")
    assert tok.decode(ex.ids[:a]).endswith("<|im_start|>assistant\n")


def test_target_longer_than_cutoff_is_dropped_counted_or_raises(tok):
    long_ex = {"id": "big", "conversations": [{"role": "user", "content": "go"},
                                              {"role": "assistant", "content": "wood " * 200}]}
    ok = {"conversations": conv(1)}
    cfg = DataConfig(cutoff_len=120)
    ex = tokenize_conversation(tok, long_ex, cfg)
    assert ex.drop_reason == "target_exceeds_cutoff" and ex.length == 0
    ds = build_dataset([ok, long_ex], tok, cfg, source="t")
    assert len(ds) == 1
    c = ds.manifest["counts"]
    assert c["examples_in"] == 2 and c["kept"] == 1 and c["dropped"] == {"target_exceeds_cutoff": 1}
    with pytest.raises(DataError, match="example 1 .*big"):
        build_dataset([ok, long_ex], tok, cfg, strict=True)
    # on_overlong="drop" drops anything over the cutoff
    ds = build_dataset([ok, {"conversations": conv(3, words=100)}], tok, DataConfig(cutoff_len=200,
                                                                                      on_overlong="drop"))
    assert ds.manifest["counts"]["dropped"] == {"overlong": 1}


@pytest.mark.parametrize("bad, match", [
    ([], "empty conversation"),
    ([{"role": "user", "content": "hi"}], "no assistant turn"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "x"}],
     "last message must be an assistant"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": 3}], "content must be a string"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"},
      {"role": "assistant", "content": "b"}], "must follow a user or tool"),
    ([{"role": "assistant", "content": "a"}], "must follow a user or tool"),
    ([{"role": "tool", "content": "r"}, {"role": "assistant", "content": "a"}], "first non-system"),
    ([{"role": "bot", "content": "hi"}], "role 'bot'"),
    ([{"role": "user", "content": "hi"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
     "only the first message may be system"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}], "empty content"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a<|im_end|>b"}], "end-of-turn"),
    ("not a list", "must be a list"),
])
def test_bad_inputs_name_the_example(tok, bad, match):
    examples = [{"conversations": conv(1)}, {"id": "ep3-step7-log", "conversations": bad}]
    with pytest.raises(DataError, match=match) as e:
        build_dataset(examples, tok)
    assert "example 1" in str(e.value) and "ep3-step7-log" in str(e.value)


def test_missing_conversations_and_bad_config(tok):
    with pytest.raises(DataError, match="example 0: missing 'conversations'"):
        build_dataset([{"messages": []}], tok)
    with pytest.raises(ValueError, match="DataConfig.loss_on"):
        DataConfig(loss_on="first")
    with pytest.raises(ValueError, match="DataConfig.cutoff_len"):
        DataConfig(cutoff_len=0)
    with pytest.raises(ValueError, match="DataConfig.on_overlong"):
        DataConfig(on_overlong="skip")


def make_examples(n):
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        turns, words = int(rng.integers(1, 4)), int(rng.integers(1, 60))
        out.append({"id": f"ex{i}", "meta": {"phase": "LOG", "step": i},
                    "conversations": conv(turns, system=bool(i % 2), words=words, tag=f"#{i}")})
    return out


@pytest.fixture(scope="module")
def dataset(tok):
    return build_dataset(make_examples(23), tok, DataConfig(cutoff_len=1024, bucket_multiple=32, seed=3),
                         source="unit")


def test_batches_are_deterministic_and_cover_each_example_once_per_epoch(tok, dataset):
    B = 4
    nb = dataset.num_batches(B)
    assert nb == 6
    for epoch in range(2):
        seen = []
        for i in range(nb):
            b = dataset.batch_at(epoch * nb + i, B)
            T = b["input_ids"].shape[1]
            assert b["input_ids"].shape == b["loss_mask"].shape == b["attention_mask"].shape == (B, T)
            assert b["input_ids"].dtype == np.int32 and b["loss_mask"].dtype == bool
            assert T % 32 == 0 and T == length_bucket(int(b["attention_mask"].sum(1).max()), dataset.cfg)
            assert b["num_targets"] == int(b["loss_mask"].sum())
            assert not (b["loss_mask"] & ~b["attention_mask"]).any()
            for r, idx in enumerate(b["example_index"]):
                if idx < 0:  # padding row of the short last batch
                    assert not b["loss_mask"][r].any() and not b["attention_mask"][r].any()
                    continue
                item = dataset.items[[it.index for it in dataset.items].index(idx)]
                assert np.array_equal(b["input_ids"][r, :item.length], item.ids)
                assert not b["attention_mask"][r, item.length:].any()  # right padding
                seen.append(int(idx))
        assert sorted(seen) == list(range(23))
    # a fresh dataset object (a resumed trainer) returns identical batches at the same step
    again = build_dataset(make_examples(23), tok, dataset.cfg, source="unit")
    for step in (0, 5, 7, 13):
        a, b = dataset.batch_at(step, B), again.batch_at(step, B)
        assert all(np.array_equal(a[k], b[k]) for k in a)
    orders = [tuple(dataset.batch_at(e * nb, B)["example_index"]) for e in range(3)]
    assert len(set(orders)) > 1  # epochs are reshuffled
    assert max_target_positions(dataset.batch_at(0, B), 16) % 16 == 0


def test_length_bucketing_pads_less_than_random_batches(dataset):
    B = 4
    length = {it.index: it.length for it in dataset.items}
    pad = 0
    for i in range(dataset.num_batches(B)):
        batch = dataset.batch_at(i, B)
        real = [length[int(j)] for j in batch["example_index"] if j >= 0]
        pad += batch["input_ids"].shape[1] * len(real) - sum(real)
    lengths = np.array(list(length.values()))[np.random.default_rng(0).permutation(len(length))]
    rand_pad = sum(length_bucket(int(c.max()), dataset.cfg) * len(c) - int(c.sum())
                   for c in np.split(lengths, range(B, len(lengths), B)))
    assert pad <= rand_pad


def test_bucket_helpers():
    assert bucket(1, 128) == 128 and bucket(128, 128) == 128 and bucket(129, 128) == 256 and bucket(0, 8) == 8
    cfg = DataConfig(cutoff_len=16384, bucket_multiple=128)
    rungs = sorted({length_bucket(n, cfg) for n in range(1, 16385, 7)})
    assert rungs == [128 * r for r in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)]
    assert length_bucket(16384, DataConfig(cutoff_len=16384, bucket_multiple=1000)) == 17000
    assert length_bucket(300, DataConfig(bucket_ladder=False)) == 384


def test_manifest_and_save_load_round_trip(tok, dataset, tmp_path):
    m = dataset.manifest
    assert m["counts"]["examples_in"] == m["counts"]["kept"] == 23
    assert m["tokens"]["total"] == sum(it.length for it in dataset.items)
    assert 0 < m["tokens"]["target"] < m["tokens"]["total"]
    assert m["cutoff_len"] == 1024 and m["loss_on"] == "all" and m["hash"].startswith("sha256:")
    path = str(tmp_path / "ds")
    dataset.save(path)
    lines = (tmp_path / "ds" / "data.jsonl").read_text().splitlines()
    assert json.loads(lines[4]) == make_examples(23)[4]  # id and meta preserved
    loaded = SFTDataset.load(path, tok)
    assert loaded.manifest == m
    assert all(np.array_equal(loaded.batch_at(3, 4)[k], dataset.batch_at(3, 4)[k]) for k in ("input_ids", "loss_mask"))
    # edited data (or another tokenizer) no longer matches the manifest's hash
    (tmp_path / "ds" / "data.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(DataError, match="does not match the manifest"):
        SFTDataset.load(path, tok)
    with pytest.raises(DataError, match="no manifest"):
        SFTDataset.load(str(tmp_path / "nowhere"), tok)


def test_split_is_deterministic_and_partitions(dataset):
    tr, ev = dataset.split(0.2, seed=5)
    tr2, ev2 = dataset.split(0.2, seed=5)
    ids = lambda d: [it.index for it in d.items]  # noqa: E731
    assert ids(tr) == ids(tr2) and ids(ev) == ids(ev2)
    assert len(ev) == 5 and sorted(ids(tr) + ids(ev)) == list(range(23))
    assert tr.manifest["counts"]["kept"] == 18 and ev.manifest["hash"] == ev2.manifest["hash"]
    assert ids(dataset.split(0.2, seed=6)[1]) != ids(ev)
    with pytest.raises(ValueError, match="eval_fraction"):
        dataset.split(1.0)


def test_saved_split_reloads_with_same_hash(tok, dataset, tmp_path):
    _, ev = dataset.split(0.3, seed=1)
    ev.save(str(tmp_path / "eval"))
    again = SFTDataset.load(str(tmp_path / "eval"), tok)
    assert again.manifest["hash"] == ev.manifest["hash"] and len(again) == len(ev)
