"""MemoryStore and the op parser against upstream AutoMem's op table (reference §1.2)."""
import os

import pytest

from automem_jax.memory import ops
from automem_jax.memory.ops import KeyedOp
from automem_jax.memory.schema import Limits, PruneRule
from automem_jax.memory.store import MemoryStore, format_results
from automem_jax.memory.structure import MemoryStructure

UPSERT = KeyedOp("UPSERT_MAP", "dungeon_map.txt", "coord", result="[Updated map entry for {key}]")


def store(files=None, **kw):
    return MemoryStore({"notes.txt": "Wood at north\nstone east\nWOOD again\n", "empty.txt": "",
                        **(files or {})}, **kw)


def run(s, text, phase="log"):
    return [(r.op, r.args, r.text) for r in s.execute(text, phase)]


def one(s, text, phase="log"):
    res = [r for r in s.execute(text, phase) if not r.is_control]
    assert len(res) == 1, res
    return res[0].text


# ----------------------------------------------------------------------------- op semantics


def test_read():
    s = store({"blank.txt": "  \n\n"})
    assert one(s, "<|READ|>notes.txt<|END|>") == "Wood at north\nstone east\nWOOD again\n"
    assert one(s, "<|READ|>empty.txt<|END|>") == "[FILE IS EMPTY]"
    assert one(s, "<|READ|>blank.txt<|END|>") == "[FILE IS EMPTY]"
    assert one(s, "<|READ|>nope.txt<|END|>") == "[ERROR: file 'nope.txt' does not exist]"
    assert one(s, "<|READ|>  notes.txt \n<|END|>").startswith("Wood")  # names are stripped


def test_search_is_case_insensitive_substring():
    s = store()
    assert one(s, "<|SEARCH|>notes.txt|wood<|END|>") == "Wood at north\nWOOD again"
    assert one(s, "<|SEARCH|>notes.txt|ST EA<|END|>") == "[No lines matching 'ST EA']"
    assert one(s, "<|SEARCH|>notes.txt|one ea<|END|>") == "stone east"
    assert one(s, "<|SEARCH|>empty.txt|x<|END|>") == "[FILE IS EMPTY \u2014 no matches]"
    assert one(s, "<|SEARCH|>gone.txt|x<|END|>") == "[ERROR: file 'gone.txt' does not exist]"


def test_search_keeps_the_last_k_matches():
    s = MemoryStore({"log.txt": "".join(f"hit {i}\n" for i in range(5))},
                    limits=Limits(max_search_results=2))
    assert one(s, "<|SEARCH|>log.txt|HIT<|END|>") == \
        "[Showing last 2 of 5 matches for 'HIT']\nhit 3\nhit 4"
    assert one(s, "<|SEARCH|>log.txt|hit 1<|END|>") == "hit 1"


def test_tail():
    s = store()
    assert one(s, "<|TAIL|>notes.txt|2<|END|>") == "stone east\nWOOD again"
    assert one(s, "<|TAIL|>notes.txt| 10 <|END|>") == "Wood at north\nstone east\nWOOD again"
    assert one(s, "<|TAIL|>empty.txt|3<|END|>") == "[FILE IS EMPTY]"
    assert one(s, "<|TAIL|>notes.txt|0<|END|>").startswith("[ERROR: TAIL needs a positive")
    # a non-integer N drops the op silently, as upstream does
    assert run(s, "<|TAIL|>notes.txt|two<|END|>") == []
    assert run(s, "<|TAIL|>notes.txt<|END|>") == []


def test_count():
    s = store()
    assert one(s, "<|COUNT|>notes.txt|wood<|END|>") == "[2 line(s) matching 'wood']"
    assert one(s, "<|COUNT|>notes.txt|zebra<|END|>") == "[0 line(s) matching 'zebra']"
    assert one(s, "<|COUNT|>empty.txt|wood<|END|>") == "[0 matches for 'wood' \u2014 file is empty]"


def test_append():
    s = store({"raw.txt": "no newline"})
    assert one(s, "<|APPEND|>notes.txt|Step 3 action 'Do': got wood<|END|>") == \
        "[Appended to notes.txt]"
    assert s.files["notes.txt"].endswith("WOOD again\nStep 3 action 'Do': got wood\n")
    assert one(s, "<|APPEND|>new.txt|line one\nline two\n\n<|END|>") == "[Appended to new.txt]"
    assert s.files["new.txt"] == "line one\nline two\n"  # created, payload stripped
    one(s, "<|APPEND|>raw.txt|second<|END|>")
    assert s.files["raw.txt"] == "no newline\nsecond\n"
    assert run(s, "<|APPEND|>notes.txt|   <|END|>") == []  # empty note: dropped


def test_write_and_create():
    s = store()
    assert one(s, "<|WRITE|>notes.txt|  fresh start  \n\n<|END|>") == "[Wrote to notes.txt]"
    assert s.files["notes.txt"] == "fresh start\n"
    assert one(s, "<|WRITE|>notes.txt|<|END|>") == "[Wrote to notes.txt]"
    assert s.files["notes.txt"] == ""
    assert one(s, "<|CREATE|>plan.txt<|END|>") == "[Created plan.txt]"
    assert s.files["plan.txt"] == ""
    assert one(s, "<|CREATE|>plan.txt<|END|>") == "[File 'plan.txt' already exists]"


def test_args_split_on_first_pipe():
    s = store()
    one(s, "<|APPEND|>notes.txt|a | b | c<|END|>")
    assert s.files["notes.txt"].endswith("a | b | c\n")
    assert one(s, "<|SEARCH|>notes.txt|b | c<|END|>") == "a | b | c"


def test_upsert_map_keeps_one_line_per_coordinate():
    s = MemoryStore({"dungeon_map.txt": "(1,1): start\n(10,1): far\n"},
                    keyed_ops={"UPSERT_MAP": UPSERT})
    res = s.execute("<|UPSERT_MAP|>1,1|floor\ncorridor N<|END|>", "log")
    assert [(r.op, r.args, r.text, r.header) for r in res] == [
        ("UPSERT_MAP", ("(1,1)", "floor\ncorridor N"), "[Updated map entry for (1,1)]",
         "UPSERT_MAP (1,1)")]
    assert s.files["dungeon_map.txt"] == "(10,1): far\n(1,1): floor corridor N\n"
    one(s, "<|UPSERT_MAP|>( 4 , 5 )|door<|END|>")
    assert s.files["dungeon_map.txt"].endswith("(4,5): door\n")
    assert run(s, "<|UPSERT_MAP|>4;5|door<|END|>") == []  # not a coordinate: dropped
    assert run(s, "<|UPSERT_MAP|>4,5|door<|END|>", phase="plan") == []  # writes: not in PLAN


def test_text_keyed_op_creates_its_file():
    goal = KeyedOp("SET", "goals.txt", "text")
    s = MemoryStore({}, keyed_ops={"SET": goal})
    assert one(s, "<|SET|>current  goal|get wood<|END|>") == \
        "[Updated goals.txt entry for current goal]"
    one(s, "<|SET|>current goal|make a table<|END|>")
    one(s, "<|SET|>next|stone<|END|>")
    assert s.files["goals.txt"] == "current goal: make a table\nnext: stone\n"


# ----------------------------------------------------------------------------- parsing


def test_lenient_tags():
    s = store()
    for text in ["<READ>notes.txt<END>", "<|READ>notes.txt<|END}", "<READ|>notes.txt<END|>",
                 "<|READ|>notes.txt<|END|}", "<|READ|>notes.txt<END}"]:
        assert run(s, text) == [("READ", ("notes.txt",), s.files["notes.txt"])], text
    # op tags are case-sensitive upstream; unterminated ops are ignored
    assert run(s, "<|read|>notes.txt<|END|>") == []
    assert run(s, "<|READ|>notes.txt") == []
    assert run(s, "<<|READ|>notes.txt<|END|>>")[0][0] == "READ"


def test_execution_order_is_by_op_type():
    s = store()
    text = ("<|CREATE|>new.txt<|END|> <|WRITE|>w.txt|x<|END|> <|APPEND|>new.txt|note<|END|> "
            "<|COUNT|>notes.txt|wood<|END|> <|TAIL|>notes.txt|1<|END|> "
            "<|SEARCH|>new.txt|note<|END|> <|READ|>new.txt<|END|> <|DONE|>")
    res = s.execute(text, "log")
    assert [r.op for r in res] == ["READ", "SEARCH", "TAIL", "COUNT", "APPEND", "WRITE",
                                   "CREATE", "DONE"]
    # reads ran before the APPEND created new.txt, and CREATE ran after it
    assert res[0].text == "[ERROR: file 'new.txt' does not exist]"
    assert res[1].text == "[ERROR: file 'new.txt' does not exist]"
    assert res[6].text == "[File 'new.txt' already exists]"


def test_keyed_ops_run_between_append_and_write():
    s = MemoryStore({}, keyed_ops={"UPSERT_MAP": UPSERT})
    res = s.execute("<|WRITE|>dungeon_map.txt|reset<|END|><|UPSERT_MAP|>1,2|x<|END|>"
                    "<|APPEND|>a.txt|y<|END|>", "log")
    assert [r.op for r in res] == ["APPEND", "UPSERT_MAP", "WRITE"]
    assert s.files["dungeon_map.txt"] == "reset\n"


def test_text_order_option():
    s = store(order="text")
    res = s.execute("<|CREATE|>new.txt<|END|><|APPEND|>new.txt|x<|END|><|READ|>new.txt<|END|>",
                    "log")
    assert [(r.op, r.text) for r in res] == [("CREATE", "[Created new.txt]"),
                                             ("APPEND", "[Appended to new.txt]"),
                                             ("READ", "x\n")]


def test_plan_phase_is_read_only_and_control_ops_come_last():
    s = store()
    before = dict(s.files)
    res = run(s, "<|WRITE|>notes.txt|gone<|END|><|APPEND|>x.txt|y<|END|><|CREATE|>z.txt<|END|>"
                 "<|DONE|><|ACTION|>Move West<|END|><|COUNT|>notes.txt|wood<|END|>", "plan")
    assert res == [("COUNT", ("notes.txt", "wood"), "[2 line(s) matching 'wood']"),
                   ("ACTION", ("Move West",), "")]
    assert dict(s.files) == before
    # ACTION is not a LOG op; DONE is
    assert run(s, "<|ACTION|>Move West<|END|><|DONE|>", "log") == [("DONE", (), "")]


@pytest.mark.parametrize("text,action", [
    ("think...\n<|ACTION|> Move West <|END|>", "Move West"),
    ("<|action|>noop<|end|>", "noop"),
    ("<ACTION>Do</ACTION>", "Do"),
    ("I will go.\n  ACTION: Move North\n", "Move North"),
    ("ACTION: Sleep", "Sleep"),
    ("x ACTION: Sleep", None),  # must start its own line
    ("<|ACTION|>" + "a" * 60 + "<|END|>\nACTION: Do", "Do"),  # too long: next form is tried
    ("<|ACTION|>" + "a" * 59 + "<|END|>", "a" * 59),
    ("<|ACTION|>   <|END|>", None),
    ("<|ACTION|>first<|END|><|ACTION|>second<|END|>", "first"),
    ("no action here", None),
])
def test_action_extraction(text, action):
    assert ops.extract_action(text) == action


def test_strip_action_removes_every_form():
    text = "I read the map.\n<|ACTION|>north<|END|>\n<ACTION>x</ACTION>\nACTION: south\nbye"
    assert ops.strip_action(text) == "I read the map.\n\n\nbye"
    assert ops.strip_action("<|ACTION|>north<|END|>") == ""


def test_results_format_and_index():
    s = store()
    res = s.execute("<|READ|>empty.txt<|END|><|APPEND|>notes.txt|z<|END|><|DONE|>", "log")
    assert format_results(res) == ("\u2500\u2500 READ empty.txt \u2500\u2500\n[FILE IS EMPTY]\n\n"
                                   "\u2500\u2500 APPEND to notes.txt \u2500\u2500\n"
                                   "[Appended to notes.txt]")
    assert s.index() == "  - empty.txt (0 lines)\n  - notes.txt (4 lines)"
    assert MemoryStore({}).index() == "  (no files yet)"
    headers = [r.header for r in s.execute(
        "<|SEARCH|>a|k<|END|><|TAIL|>a|3<|END|><|COUNT|>a|k<|END|><|WRITE|>a|x<|END|>"
        "<|CREATE|>b<|END|>", "log")]
    assert headers == ["SEARCH a for 'k'", "TAIL a (last 3 lines)", "COUNT a for 'k'",
                       "WRITE to a", "CREATE b"]


# ----------------------------------------------------------------------------- safety and limits


@pytest.mark.parametrize("name", ["../x.txt", "..", "/etc/passwd", "a/b.txt", "a\\b.txt",
                                  "x\x00y.txt", "n" * 101, ".hidden", "C:evil.txt", "tab\tname",
                                  "\u00e9" * 99 + "\U0001f600" * 1])
def test_unsafe_names_are_refused(tmp_path, name):
    mirror = tmp_path / "mem"
    s = MemoryStore({"a.txt": "x\n"}, mirror_dir=mirror)
    for op in (f"<|WRITE|>{name}|pwned<|END|>", f"<|APPEND|>{name}|pwned<|END|>",
               f"<|CREATE|>{name}<|END|>", f"<|READ|>{name}<|END|>"):
        text = one(s, op)
        assert text.startswith("[ERROR: invalid file name"), (name, text)
    assert dict(s.files) == {"a.txt": "x\n"}
    assert sorted(os.listdir(tmp_path)) == ["mem"]
    assert sorted(os.listdir(mirror)) == ["a.txt"]


def test_limits_return_errors_and_leave_files_alone():
    lim = Limits(max_files=3, max_file_lines=3, max_file_bytes=40, max_payload_bytes=20,
                 max_ops_per_turn=2)
    s = MemoryStore({"a.txt": "1\n2\n", "b.txt": ""}, limits=lim)
    assert one(s, "<|APPEND|>a.txt|3<|END|>") == "[Appended to a.txt]"
    assert "would have 4 lines (limit 3)" in one(s, "<|APPEND|>a.txt|4<|END|>")
    assert one(s, "<|WRITE|>b.txt|" + "y" * 21 + "<|END|>") == \
        "[ERROR: command text is 21 bytes; the limit is 20 bytes]"
    assert one(s, "<|CREATE|>c.txt<|END|>") == "[Created c.txt]"
    assert one(s, "<|CREATE|>d.txt<|END|>") == \
        "[ERROR: cannot create 'd.txt': memory already holds 3 files (limit 3)]"
    res = s.execute("<|READ|>a.txt<|END|>" * 3, "log")
    assert [r.op for r in res] == ["READ", "READ", "LIMIT"]
    assert res[-1].text.startswith("[ERROR: only the first 2 commands")
    assert dict(s.files) == {"a.txt": "1\n2\n3\n", "b.txt": "", "c.txt": ""}


def test_file_bytes_limit():
    s = MemoryStore({"a.txt": ""}, limits=Limits(max_file_bytes=10))
    assert one(s, "<|WRITE|>a.txt|0123456789<|END|>") == \
        "[ERROR: 'a.txt' would be 11 bytes (limit 10); file unchanged. Summarize it with WRITE]"
    assert s.files["a.txt"] == ""


def test_mirror_and_reset(tmp_path):
    s = MemoryStore({"a.txt": "seed\n"}, mirror_dir=tmp_path / "ep_00")
    s.execute("<|APPEND|>a.txt|more<|END|><|CREATE|>b.txt<|END|>"
              "<|WRITE|>c.txt|\u00e9t\u00e9<|END|>", "log")
    disk = {p.name: p.read_text(encoding="utf-8") for p in (tmp_path / "ep_00").iterdir()}
    assert disk == dict(s.files) == {"a.txt": "seed\nmore\n", "b.txt": "",
                                     "c.txt": "\u00e9t\u00e9\n"}
    (tmp_path / "ep_00" / "keep.me").write_text("not ours")
    s.reset()
    assert dict(s.files) == {"a.txt": "seed\n"}
    assert sorted(p.name for p in (tmp_path / "ep_00").iterdir()) == ["a.txt", "keep.me"]


def test_prune_rule():
    s = MemoryStore({"log.txt": "".join(f"{i}\n" for i in range(10))},
                    pruning=[PruneRule("log.txt", max_lines=8, keep_lines=3)])
    assert s.prune() == ["log.txt: pruned 7 lines, kept 3"]
    assert s.files["log.txt"] == "[... 7 older entries pruned at step boundary ...]\n7\n8\n9\n"
    assert s.prune() == []


def test_from_structure_follows_the_document():
    st = MemoryStructure.default("nethack")
    st.doc["ops"]["log"].insert(-1, "UPSERT_MAP")
    st.doc["limits"]["max_search_results"] = 1
    s = MemoryStore.from_structure(st.validate())
    assert set(s.files) == {f["name"] for f in st.doc["files"]}
    assert "UPSERT_MAP" in s.ops_for("log") and "UPSERT_MAP" not in s.ops_for("plan")
    assert one(s, "<|UPSERT_MAP|>3,4|stairs<|END|>") == "[Updated map entry for (3,4)]"
    assert one(s, "<|SEARCH|>game_rules.txt|eat<|END|>").startswith("[Showing last 1 of ")
    with pytest.raises(ValueError):
        s.execute("<|DONE|>", "act")
