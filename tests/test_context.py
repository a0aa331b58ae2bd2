"""Deterministic context blocks."""
import pytest

from automem_jax.agent import context
from automem_jax.agent.context import BLOCKS, EpisodeHistory, render_block
from automem_jax.memory.schema import CONTEXT_BLOCKS

NLE_MAP = "\n".join([
    "message:",
    "You see here a dagger.",
    "",
    "map:",
    "                                   ",
    "   ------------                    ",
    "   |..........|          >         ",
    "   |....@+....|                    ",
    "   |...d}.....                     ",
    "   ------------                    ",
    "Agent the Stripling  St:16 Dx:14 Co:17 In:8 Wi:9 Ch:7 Lawful",
    "Dlvl:1 $:0 HP:5(16) Pw:2(2) AC:6 Xp:1/0 T:40 Hungry",
    "inventory:",
    "a: a +1 long sword (weapon in hand)",
])


def block(name, h, phase="plan", **params):
    return render_block(name, h, phase, params)


def test_registry_has_the_issue_blocks():
    assert {"unchanged_observation", "repetition", "inventory_change", "vitals_urgency",
            "recent_actions", "map_analysis", "stuck_counter"} <= set(BLOCKS)
    for b in BLOCKS.values():
        assert b.doc and set(b.phases) <= {"log", "plan"}


def test_every_declared_block_is_implemented_as_declared():
    assert list(BLOCKS) == list(CONTEXT_BLOCKS)
    for name, spec in CONTEXT_BLOCKS.items():
        b = BLOCKS[name]
        assert (b.params, b.phases, b.doc) == (dict(spec.params), spec.phases, spec.doc)


def test_an_undeclared_block_is_refused():
    with pytest.raises(ImportError, match="not declared"):
        context.register("not_in_the_schema")(lambda h, phase: "")
    assert "not_in_the_schema" not in BLOCKS


def test_unchanged_observation_warns_then_escalates():
    h = EpisodeHistory.from_steps(["a", "b"], ["Move West"])
    assert block("unchanged_observation", h) == ""
    h = EpisodeHistory.from_steps(["a", "a  "], ["Do"])  # compared after strip, like upstream
    log = block("unchanged_observation", h, "log")
    assert log.startswith("WARNING") and "Do" not in log
    assert block("unchanged_observation", h, "plan").endswith(
        "The last action the game executed was 'Do'. Do NOT repeat it; pick something else.")
    h = EpisodeHistory.from_steps(["a"] * 4, ["Do"] * 3)
    assert h.unchanged_streak == 3
    assert block("unchanged_observation", h).startswith(
        "CRITICAL WARNING: the observation has not changed for 3 actions in a row.")
    assert block("unchanged_observation", h, critical_after=5).startswith("WARNING")


def test_repetition_and_oscillation():
    h = EpisodeHistory.from_steps(["a", "b", "b", "b"], ["Do", "Do", "Do"])
    out = block("repetition", h)
    assert out.startswith("=== REPETITION ALERT ===")
    assert "'Do' 3 times in a row, and 2 of those changed nothing." in out
    assert block("repetition", EpisodeHistory.from_steps(["a", "b", "c"], ["Do", "Noop"])) == ""
    moves = ["Move West", "Move East", "Move West", "Move North"]
    h = EpisodeHistory.from_steps(list("abcde"), moves)
    out = block("repetition", h)
    assert "OSCILLATION WARNING" in out and "west -> east -> west -> north" in out
    assert block("repetition", h, oscillation_flips=3) == ""
    assert context.move_direction("far north east") == "northeast"
    assert context.move_direction("Place Table") is None


def test_inventory_change_crafter_and_nethack():
    before = "Your status:\n- health: 9/9\n\nYour inventory:\n- wood: 1\n- sapling: 1\n"
    after = "Your status:\n- health: 9/9\n\nYour inventory:\n- wood: 3\n- stone: 1\n"
    h = EpisodeHistory.from_steps([("view", before), ("view", after)], ["Do"])
    assert block("inventory_change", h) == \
        "=== INVENTORY CHANGES ===\nGAINED: stone +1, wood +2\nLOST: sapling -1"
    h = EpisodeHistory.from_steps([("v", before), ("v", "You have nothing in your inventory.")])
    assert "LOST: sapling -1, wood -1" in block("inventory_change", h)
    nle1 = "inventory:\na: a long sword\nb: 2 food rations"
    nle2 = "inventory:\na: a long sword\nb: a food ration"
    h = EpisodeHistory.from_steps([("m", nle1), ("m", nle2)], ["eat"])
    assert block("inventory_change", h) == ("=== INVENTORY CHANGES ===\nGAINED: a food ration +1"
                                            "\nLOST: 2 food rations -1")
    assert block("inventory_change", EpisodeHistory.from_steps([("m", nle1), ("m", nle1)])) == ""


def test_vitals_urgency():
    text = "Your status:\n- health: 9/9\n- food: 2/9\n- drink: 1/9\n- energy: 5/9\n"
    out = block("vitals_urgency", EpisodeHistory.from_steps([("", text)]))
    assert out.splitlines() == [
        "=== SURVIVAL URGENCY ===",
        "- food is 2/9: low, eat (a cow, or a ripe plant) soon.",
        "- drink is 1/9: CRITICAL, drink from water right now.",
    ]
    out = block("vitals_urgency", EpisodeHistory.from_steps([NLE_MAP]))
    assert "- HP is 5 of 16" in out and "- You are Hungry: eat something now." in out
    assert block("vitals_urgency", EpisodeHistory.from_steps(["- food: 9/9 HP:16(16)"])) == ""


def test_recent_actions_numbering():
    h = EpisodeHistory.from_steps(list("abcdef"), ["w", "x", ("jump", "Noop"), "y", "z"])
    assert block("recent_actions", h, n=3) == (
        "=== RECENT ACTIONS (oldest first) ===\n"
        "step 2: Noop (you wrote 'jump', which was not valid)\nstep 3: y\nstep 4: z")
    assert block("recent_actions", EpisodeHistory.from_steps(["a"])) == ""


@pytest.mark.parametrize("style", ["upstream", "corrected"])
def test_map_analysis_reads_the_map_section(style):
    out = block("map_analysis", EpisodeHistory.from_steps([NLE_MAP]), style=style)
    lines = out.splitlines()
    assert lines[0] == "=== MAP ANALYSIS ==="
    assert "*** STAIRS ON MAP: '>' about 17 tiles northeast" in out
    assert "MONSTERS ADJACENT: southwest -> 'd' monster (move into it to attack)" in out
    assert "DOORS: east -> '+' closed door (use 'open')" in out
    assert "DANGER: south -> '}' DANGEROUS" in out
    can = next(ln for ln in lines if ln.startswith("CAN MOVE: "))
    assert {"north ('.')", "west ('.')", "east (door '+')", "southwest (monster 'd')",
            "northwest ('.')", "northeast ('.')", "southeast ('.')"} == set(
        can[len("CAN MOVE: "):].split(", "))
    assert "BLOCKED" not in out


SMALL_MAP = "map:\n ----\n\n |@.\ninventory:\na: x"


def _dirs(out, head):
    line = next((ln for ln in out.splitlines() if ln.startswith(head + ": ")), "")
    return sorted(part.split(" ")[0] for part in line[len(head) + 2:].split(", ") if part)


def test_map_analysis_keeps_geometry_and_edges():
    # corrected: the blank row above '@' is rock, not the wall two rows up (upstream dropped blank rows)
    out = block("map_analysis", EpisodeHistory.from_steps([SMALL_MAP]), style="corrected")
    assert "north (rock/void)" in out and "northeast (rock/void)" in out
    assert "west (wall '|')" in out and "CAN MOVE: east ('.')" in out
    assert "south (edge of map)" in out
    for style in ("upstream", "corrected"):
        stairs = block("map_analysis", EpisodeHistory.from_steps(["map:\n.@>\n..."]), style=style)
        assert "*** STAIRS ADJACENT: east -> '>' STAIRS DOWN, go there" in stairs
        assert block("map_analysis", EpisodeHistory.from_steps(["You see a tree."]), style=style) == ""


def test_map_analysis_upstream_quirks():
    # The default is upstream's parse_nle_map, quirks kept.
    h = EpisodeHistory.from_steps([SMALL_MAP])
    assert block("map_analysis", h) == block("map_analysis", h, style="upstream")
    out = block("map_analysis", h)
    # The blank row is dropped, so the wall two rows up reads as north; "a: x" (half letters) is kept
    # as the row below '@', so south is its blank, southeast the letter x and southwest the ':'.
    assert _dirs(out, "BLOCKED") == ["north", "northeast", "northwest", "south", "southwest", "west"]
    assert "north (wall '-')" in out and "south (rock/void)" in out and "southwest (':')" in out
    assert "MONSTERS ADJACENT: southeast -> 'x' monster" in out
    assert _dirs(out, "CAN MOVE") == ["east", "southeast"]
    # Past the end of a (right-stripped) row is the map's edge, and another '@' is an unknown tile.
    short = EpisodeHistory.from_steps(["map:\n..\n.@@\n..."])
    up = block("map_analysis", short)
    fixed = block("map_analysis", short, style="corrected")
    assert "northeast (edge of map)" in up and "east ('@')" in up
    assert "northeast (rock/void)" in fixed and "MONSTERS ADJACENT: east -> '@'" in fixed
    # The player's row is found anywhere in the text, not only in the map: section.
    loose = block("map_analysis", EpisodeHistory.from_steps(["...\n.@>"]))
    assert "*** STAIRS ADJACENT: east" in loose
    with_header = block("map_analysis", EpisodeHistory.from_steps(["...\n.@>"]), style="corrected")
    assert "*** STAIRS ADJACENT: east" in with_header  # no map: header, any row with '@' will do
    assert block("map_analysis", h, style="sideways").startswith("[context block map_analysis failed")


def test_stuck_counter():
    at = "cursor:\nYou\n(x=5, y=7)"
    h = EpisodeHistory.from_steps([at.replace("5", "4"), at, at, at, at + " msg"])
    assert block("stuck_counter", h) == ("=== STUCK COUNTER ===\nYou have stayed at (x=5, y=7) "
                                         "for 3 steps. Move somewhere new.")
    assert block("stuck_counter", h, threshold=4) == ""
    h = EpisodeHistory.from_steps(["same"] * 4)
    assert block("stuck_counter", h) == ("=== STUCK COUNTER ===\nNothing in the observation has "
                                         "changed for 3 steps.")


def test_history_is_bounded():
    h = EpisodeHistory(window=4)
    for i in range(100):
        h.observe(str(i % 3), "")
        h.record_action("a", "a")
    assert len(h.observations) == 4 and len(h.actions) == 4 and h.step == 99


def test_a_failing_block_does_not_raise(monkeypatch):
    def broken(h, phase):
        raise KeyError("boom")
    monkeypatch.setitem(BLOCKS, "broken", context.Block("broken", broken, {}, ("plan",), "x"))
    assert render_block("broken", EpisodeHistory(), "plan") == \
        "[context block broken failed: KeyError]"


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_blocks_are_pure(name):
    h = EpisodeHistory.from_steps([NLE_MAP, NLE_MAP, ("a", "Your inventory:\n- wood: 1")],
                                  ["west", "east"])
    snapshot = (list(h.observations), list(h.actions), h.unchanged_streak, h.step)
    first = block(name, h)
    assert block(name, h) == first
    assert (list(h.observations), list(h.actions), h.unchanged_streak, h.step) == snapshot
