"""Property tests: any model text is safe for the parser and the store."""
import os
import re
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from automem_jax.memory import ops
from automem_jax.memory.ops import KeyedOp
from automem_jax.memory.schema import Limits, name_problem
from automem_jax.memory.store import MemoryStore, OpResult

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

OPS = ["READ", "SEARCH", "TAIL", "COUNT", "APPEND", "WRITE", "CREATE", "DONE", "ACTION",
       "UPSERT_MAP", "END"]
BAD_NAMES = ["../secret.txt", "../../etc/passwd", "/etc/passwd", "/tmp/x", "a/b", "..\\x",
             "C:\\x", "x\x00y", "\x00", "n" * 300, ".bashrc", "..", ".", "~/x", " lead.txt"]
GOOD_NAMES = ["notes.txt", "actions_log.txt", "a", "map notes.txt", "x.txt"]


def _tag(name: str) -> st.SearchStrategy:
    return st.sampled_from([f"<|{name}|>", f"<{name}>", f"<|{name}>", f"<{name}|>"])


_end = st.sampled_from(["<|END|>", "<END>", "<|END|}", "<END}", "<|END>", "</ACTION>"])
_name = st.one_of(st.sampled_from(BAD_NAMES + GOOD_NAMES), st.text(max_size=30))
_payload = st.one_of(st.text(max_size=40), st.sampled_from(["", "|", "3", "-2", "1,2", "(4, 5)",
                                                            "x" * 200, "\n\n", "\x00"]))
_op = st.builds(lambda o, n, sep, p, e: o + n + sep + p + e,
                st.sampled_from(OPS).flatmap(_tag), _name, st.sampled_from(["|", "", "||"]),
                _payload, _end)
_bytes_text = st.binary(max_size=300).map(lambda b: b.decode("utf-8", "surrogateescape"))
model_text = st.one_of(
    st.text(max_size=300),
    _bytes_text,
    st.lists(st.one_of(_op, st.text(max_size=20), _bytes_text, _end), max_size=12).map("".join),
)


def _store(mirror: Path) -> MemoryStore:
    return MemoryStore({"notes.txt": "wood north\nstone\n", "empty.txt": ""},
                       limits=Limits(max_files=8, max_file_lines=50, max_file_bytes=2000,
                                     max_payload_bytes=300, max_ops_per_turn=20),
                       keyed_ops={"UPSERT_MAP": KeyedOp("UPSERT_MAP", "dungeon_map.txt")},
                       mirror_dir=mirror)


@SETTINGS
@given(texts=st.lists(model_text, min_size=1, max_size=4), phases=st.lists(
    st.sampled_from(["log", "plan"]), min_size=4, max_size=4))
def test_any_text_is_safe(texts, phases):
    with tempfile.TemporaryDirectory() as root:
        sandbox = Path(root)
        mirror = sandbox / "episode"
        s = _store(mirror)
        for text, phase in zip(texts, phases):
            before = dict(s.files)
            results = s.execute(text, phase)
            assert all(isinstance(r, OpResult) and isinstance(r.text, str) for r in results)
            for r in results:
                if r.op in ("READ", "SEARCH", "TAIL", "COUNT", "APPEND", "WRITE", "CREATE") \
                        and name_problem(r.args[0]) is not None:
                    assert r.text.startswith("[ERROR: invalid file name"), r
            if phase == "plan":
                assert dict(s.files) == before  # PLAN can never write
            assert all(name_problem(n) is None for n in s.files)
            assert len(s.files) <= 8
            assert all(len(c.splitlines()) <= 50 for c in s.files.values())
            # nothing outside the episode directory, and the directory mirrors memory exactly
            assert os.listdir(sandbox) == ["episode"]
            on_disk = {}
            for p in mirror.iterdir():
                assert p.is_file() and not p.name.startswith(".")
                on_disk[p.name] = p.read_bytes().decode("utf-8", "surrogatepass")
            assert on_disk == dict(s.files)
            s.index()
            s.snapshot()


# The parser re-implements upstream's regexes in linear time; check it agrees with them.
_REF_END = r"<\|?END\|?[>}]"


def _ref_tagged(text, name):
    return [(m.start(), m.group(1)) for m in
            re.finditer(r"<\|?" + name + r"\|?>(.*?)" + _REF_END, text, re.DOTALL)]


def _ref_action(text):
    for pat in (re.compile(r"<\|?ACTION\|?>(.*?)<\|?END\|?[>}]", re.DOTALL | re.IGNORECASE),
                re.compile(r"<ACTION>(.*?)</ACTION>", re.DOTALL | re.IGNORECASE),
                re.compile(r"(?:^|\n)\s*ACTION:\s*([^\n]{1,40})\s*(?:\n|$)", re.IGNORECASE)):
        m = pat.search(text)
        if m:
            cand = m.group(1).strip()
            if cand and len(cand) < 60:
                return cand
    return None


_fragments = st.lists(st.one_of(
    st.sampled_from(["<|READ|>", "<READ>", "<|READ>", "<|END|>", "<END}", "<|END", "|", "\n",
                     " ", "a.txt", "<|ACTION|>", "<action>", "</ACTION>", "ACTION:", "action: ",
                     "\n  ", "x" * 45, "north", "<|", "|>"]),
    st.text(max_size=5)), max_size=25).map("".join)


@settings(max_examples=300, deadline=None)
@given(text=_fragments)
def test_linear_parser_matches_upstream_regexes(text):
    assert ops.find_tagged(text, "READ") == _ref_tagged(text, "READ")
    assert ops.extract_action(text) == _ref_action(text)


@SETTINGS
@given(text=model_text)
def test_parse_only_yields_enabled_ops(text):
    for phase_ops in (["READ", "SEARCH", "ACTION"], ["APPEND", "DONE"], []):
        parsed = ops.parse(text, phase_ops)
        assert {c.op for c in parsed.calls} <= set(phase_ops)
        assert parsed.done is ("DONE" in phase_ops and ops.has_done(text))
        if "ACTION" not in phase_ops:
            assert parsed.action is None
        elif parsed.action is not None:
            assert 0 < len(parsed.action) < 60
