"""BALROG's Crafter text from hand-built Craftax-Classic states, and the same text from crafter worlds.

Each scene is written once (cells relative to the player, as (d_row, d_col) with rows growing south)
and built twice: as a Craftax ``EnvState`` and as a crafter world. The expected texts are written out
by hand from BALROG's ``describe_frame`` rules.
"""
from collections import defaultdict
import functools
import re

import numpy as np
import pytest

from automem_jax.envs import describe_crafter as dc

STATUS_FULL = "Your status:\n- health: 9/9\n- food: 9/9\n- drink: 9/9\n- energy: 9/9"
EMPTY_INV = "You have nothing in your inventory."
SLEEP = "You are sleeping, and will not be able take actions until energy is full."

SCENES = {
    "tree_north_west": dict(
        blocks={(-1, -1): "tree"}, facing="east",
        long="You see:\n- grass 1 step to your west\n- tree 2 steps to your north-west\n\n"
             "You face grass at your front.",
        short=f"{STATUS_FULL}\n\n{EMPTY_INV}"),
    "facing_water": dict(
        blocks={(0, 1): "water", (-3, 4): "sand"}, mobs={(2, 0): "cow"}, facing="east",
        vitals=(5, 3, 7, 2), inventory={"wood": 2, "sapling": 1, "wood_pickaxe": 1},
        long="You see:\n- grass 1 step to your west\n- cow 2 steps to your south\n"
             "- water 1 step to your east\n- sand 7 steps to your north-east\n\nYou face water at your front.",
        short="Your status:\n- health: 5/9\n- food: 3/9\n- drink: 7/9\n- energy: 2/9\n\n"
              "Your inventory:\n- sapling: 1\n- wood: 2\n- wood_pickaxe: 1"),
    "sleeping": dict(
        mobs={(0, 3): "zombie"}, facing="north", sleeping=True, vitals=(9, 9, 9, 1),
        long=f"{SLEEP}\n\n\n\nYou see:\n- grass 1 step to your west\n- zombie 3 steps to your east\n\n"
             "You face grass at your front.",
        short="Your status:\n- health: 9/9\n- food: 9/9\n- drink: 9/9\n- energy: 1/9\n\n" + EMPTY_INV),
    "dead": dict(
        mobs={(-1, 0): "cow"}, facing="north", vitals=(0, 2, 0, 5),
        long="You died.\n\n\n\nYou see:\n- grass 1 step to your west\n- cow 1 step to your north\n\n"
             "You face cow at your front.",
        short="Your status:\n- health: 0/9\n- food: 2/9\n- drink: 0/9\n- energy: 5/9\n\n" + EMPTY_INV),
    "many_kinds": dict(
        blocks={(0, -1): "table", (-1, 0): "plant", (3, 0): "stone", (0, 4): "lava"},
        mobs={(-3, 4): "skeleton", (2, -4): "arrow"}, facing="south",
        inventory={"stone": 3, "coal": 1, "iron_sword": 1},
        long="You see:\n- grass 1 step to your south\n- arrow 6 steps to your south-west\n"
             "- table 1 step to your west\n- plant 1 step to your north\n- stone 3 steps to your south\n"
             "- skeleton 7 steps to your north-east\n- lava 4 steps to your east\n\nYou face grass at your front.",
        short=f"{STATUS_FULL}\n\nYour inventory:\n- stone: 3\n- coal: 1\n- iron_sword: 1"),
    # Top edge of the world: rows above it are not in the view, facing north faces nothing.
    "world_edge": dict(
        pos=(0, 2), blocks={(1, -2): "tree"}, facing="north",
        long="You see:\n- grass 1 step to your west\n- tree 3 steps to your south-west\n\n"
             "You face nothing at your front.",
        short=f"{STATUS_FULL}\n\n{EMPTY_INV}"),
}

FACING = {"east": (1, 0), "west": (-1, 0), "north": (0, -1), "south": (0, 1)}


def _scene(name):
    s = dict(pos=(32, 32), blocks={}, mobs={}, sleeping=False, vitals=(9, 9, 9, 9), inventory={})
    s.update(SCENES[name])
    return s


# -- Craftax ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def craftax_batch():
    from automem_jax.envs.craftax import CraftaxClassicBatch

    return CraftaxClassicBatch(num_envs=1)


@functools.lru_cache(maxsize=1)
def _base_world():
    import jax
    from craftax.craftax_classic.envs.craftax_state import EnvParams, StaticEnvParams
    from craftax.craftax_classic.world_gen import generate_world

    return jax.jit(lambda k: generate_world(k, EnvParams(), StaticEnvParams()))(jax.random.PRNGKey(0))


def craftax_state(s, block_override=None):
    import jax
    import jax.numpy as jnp
    from craftax.craftax_classic.constants import Action, BlockType
    from craftax.craftax_classic.envs.craftax_state import Inventory

    names = {"table": "CRAFTING_TABLE", **(block_override or {})}
    base = _base_world()
    m = np.full((64, 64), BlockType.GRASS.value, np.int32)
    r0, c0 = s["pos"]
    for (dr, dc_), b in s["blocks"].items():
        m[r0 + dr, c0 + dc_] = BlockType[names.get(b, b.upper())].value

    def mobs(field, kind):
        old = getattr(base, field)
        n = old.mask.shape[0]
        where = [(r0 + dr, c0 + dc_) for (dr, dc_), k in s["mobs"].items() if k == kind]
        pos = np.zeros((n, 2), np.int32)
        mask = np.zeros(n, bool)
        for j, rc in enumerate(where):
            pos[j], mask[j] = rc, True
        return old.replace(position=jnp.asarray(pos), mask=jnp.asarray(mask))

    direction = {"east": Action.RIGHT, "west": Action.LEFT, "north": Action.UP, "south": Action.DOWN}
    h, f, d, e = s["vitals"]
    state = base.replace(
        map=jnp.asarray(m), player_position=jnp.array(s["pos"], jnp.int32),
        player_direction=direction[s["facing"]].value, is_sleeping=s["sleeping"],
        player_health=h, player_food=f, player_drink=d, player_energy=e,
        inventory=Inventory(**s["inventory"]),
        zombies=mobs("zombies", "zombie"), cows=mobs("cows", "cow"),
        skeletons=mobs("skeletons", "skeleton"), arrows=mobs("arrows", "arrow"))
    return jax.tree.map(lambda x: jnp.asarray(x)[None], state)


@pytest.mark.parametrize("name", sorted(SCENES))
def test_craftax_hand_built_state(craftax_batch, name):
    s = _scene(name)
    (obs,) = craftax_batch.describe_states(craftax_state(s))
    assert obs.long_term == s["long"]
    assert obs.short_term == s["short"]


def test_craftax_ripe_plant_reads_as_plant(craftax_batch):
    s = _scene("tree_north_west")
    s["blocks"] = {(-1, -1): "plant"}
    (young,) = craftax_batch.describe_states(craftax_state(s))
    (ripe,) = craftax_batch.describe_states(craftax_state(s, {"plant": "RIPE_PLANT"}))
    assert "- plant 2 steps to your north-west" in young.long_term
    assert ripe.long_term == young.long_term


# -- crafter ---------------------------------------------------------------------------------------
def crafter_env(s):
    from crafter import objects

    from automem_jax.envs.crafter import CrafterTextEnv

    env = CrafterTextEnv()
    world = env._env._world
    world.reset(seed=0)
    world._mat_map[:] = world._mat_ids["grass"]
    r0, c0 = s["pos"]
    xy = lambda dr, dc_: (c0 + dc_, r0 + dr)  # noqa: E731  crafter is (x, y) = (col, row)
    player = objects.Player(world, xy(0, 0))
    world.add(player)
    env._env._player = player
    for (dr, dc_), b in s["blocks"].items():
        if b == "plant":
            world.add(objects.Plant(world, xy(dr, dc_)))
        else:
            world[xy(dr, dc_)] = b
    for (dr, dc_), k in s["mobs"].items():
        pos = xy(dr, dc_)
        world.add({"cow": lambda: objects.Cow(world, pos),
                   "zombie": lambda: objects.Zombie(world, pos, player),
                   "skeleton": lambda: objects.Skeleton(world, pos, player),
                   "arrow": lambda: objects.Arrow(world, pos, (1, 0))}[k]())
    player.facing = FACING[s["facing"]]
    player.sleeping = s["sleeping"]
    for k, v in zip(dc.VITALS, s["vitals"]):
        player.inventory[k] = v
    player.inventory.update(s["inventory"])
    return env


@pytest.mark.parametrize("name", sorted(SCENES))
def test_crafter_equivalent_world(name):
    s = _scene(name)
    obs = crafter_env(s).observe()
    assert obs.long_term == s["long"]
    assert obs.short_term == s["short"]


# -- the vectorised describer itself ---------------------------------------------------------------
def test_nothing_around():
    local = np.zeros((1, 9, 7), np.int8)
    local[0, 4, 3] = dc.PLAYER
    ((lt, st),) = dc.describe_batch(local, [(0, 1)], [False], [False], [(9, 9, 9, 9)], np.zeros((1, 12)))
    assert lt == "You see nothing away from you.\n\nYou face nothing at your front."
    assert st == f"{STATUS_FULL}\n\n{EMPTY_INV}"


def _loop_reference(local, facing):
    """BALROG's describe_env loop (x outer, y inner; first nearest per kind; order of first sight)."""
    closest = defaultdict(str)
    for i in range(9):
        for j in range(7):
            k = int(local[i, j])
            if k in (dc.PLAYER, dc.NOTHING):
                continue
            dx, dy = i - 4, j - 3
            dirs = (["north"] if dy < 0 else ["south"] if dy > 0 else []) + \
                   (["west"] if dx < 0 else ["east"] if dx > 0 else [])
            d = abs(dx) + abs(dy)
            loc = f"{d} step{'s' if d > 1 else ''} to your {'-'.join(dirs)}"
            cur = closest[dc.NAMES[k]]
            if not cur or d < int(re.match(r"\d+", cur).group()):
                closest[dc.NAMES[k]] = loc
    seen = "\n".join(f"- {n} {loc}" for n, loc in closest.items())
    front = dc.NAMES[int(local[4 + facing[0], 3 + facing[1]])]
    head = f"You see:\n{seen}" if closest else "You see nothing away from you."
    return f"{head}\n\nYou face {front} at your front."


def test_batch_matches_loop_reference():
    rng = np.random.default_rng(0)
    b = 64
    # Few kinds per view, so ties between equally near instances are common.
    local = rng.choice([0, 1, 2, 6, 14, 15, 18], size=(b, 9, 7), p=[.1, .1, .5, .1, .1, .05, .05])
    local[:, 4, 3] = dc.PLAYER
    facing = np.array([(1, 0), (-1, 0), (0, 1), (0, -1)])[rng.integers(0, 4, b)]
    out = dc.describe_batch(local, facing, np.zeros(b, bool), np.zeros(b, bool),
                            np.full((b, 4), 9), np.zeros((b, 12)))
    for i in range(b):
        assert out[i][0] == _loop_reference(local[i], facing[i]), i


# -- shared checks for the Crafter-format envs (used by test_envs_craftax / test_envs_crafter) -------
_DIRS = r"(?:north|south)(?:-(?:west|east))?|west|east"
LONG_RE = re.compile(
    rf"(?:(?:{re.escape(SLEEP)}|You died\.)\n\n\n\n)?"
    rf"(?:You see:(?:\n- [a-z_]+ \d+ steps? to your (?:{_DIRS}))+|You see nothing away from you\.)"
    r"\n\nYou face [a-z_]+ at your front\.")
SHORT_RE = re.compile(r"Your status:\n- health: \d/9\n- food: \d/9\n- drink: \d/9\n- energy: \d/9\n\n"
                      r"(?:Your inventory:(?:\n- [a-z_]+: \d+)+|You have nothing in your inventory\.)")


def assert_crafter_text(obs):
    assert LONG_RE.fullmatch(obs.long_term), obs.long_term
    assert SHORT_RE.fullmatch(obs.short_term), obs.short_term
    kinds = re.findall(r"^- ([a-z_]+) \d", obs.long_term, re.M)
    assert len(kinds) == len(set(kinds)), "one line per kind"
    assert obs.extras["vitals"]["health"] == int(re.search(r"health: (\d)", obs.short_term).group(1))


def test_text_checks_reject_malformed():
    good = _scene("facing_water")
    for bad in (good["long"].replace("You face", "You see"), good["long"].replace("\n\n", "\n"),
                good["long"] + "\n- cow 1 step to your south"):
        assert not LONG_RE.fullmatch(bad)
    assert LONG_RE.fullmatch(good["long"]) and SHORT_RE.fullmatch(good["short"])


# -- NetHack / MiniHack (BALROG's text; the byte-for-byte check against the C++ is test_nle_reference) --
def _screen(rows_at):
    tty = np.full((24, 80), 32, np.uint8)
    for row, col, text in rows_at:
        tty[row, col:col + len(text)] = np.frombuffer(text.encode("latin-1"), np.uint8)
    return tty


def test_nle_message_rules():
    from automem_jax.envs import describe_nle as dn

    assert dn.text_message(_screen([])) == ""
    assert dn.text_message(_screen([(0, 0, "Hello Agent."), (5, 10, "#####")])) == "Hello Agent."
    # A window read from the top line's indent to its pager mark, blank rows skipped.
    menu = [(0, 30, "Things that are here:"), (1, 30, "a dagger"), (3, 30, "a ring"), (4, 30, "--More--")]
    assert dn.text_message(_screen(menu)) == "Things that are here:\na dagger\na ring\n--More--"
    assert dn.text_message(_screen([(0, 2, "Pick one"), (1, 2, "a - x"), (2, 2, "(1 of 2)")])) == \
        "Pick one\na - x\n(1 of 2)"
    # (n of m) counts only with one-digit numbers; without a mark only the top line is the message.
    assert dn.text_message(_screen([(0, 0, "Pick one"), (1, 0, "(12 of 13)")])) == "Pick one"
    # A death screen (Points on row 1) ends after two blank rows, each kept row ending in a newline.
    death = [(0, 0, "Goodbye."), (1, 0, " No  Points  Name"), (2, 0, "  1   123  you"), (6, 0, "later")]
    assert dn.text_message(_screen(death)) == "Goodbye.\nNo  Points  Name\n1   123  you\n"
    # The C++ trim reads a row whose only mark is in the last column as blank.
    assert dn.text_message(_screen([(0, 79, "z")])) == ""


def test_nle_inventory_and_rewrite():
    from automem_jax.envs import describe_nle as dn

    inv = np.zeros((55, 80), np.uint8)
    letters = np.zeros(55, np.uint8)
    for i, (k, s) in enumerate([("a", "a +1 long sword (weapon in hand)"), ("$", "12 gold pieces")]):
        inv[i, :len(s)] = np.frombuffer(s.encode(), np.uint8)
        letters[i] = ord(k)
    assert dn.text_inventory(inv, letters) == "a: a +1 long sword (weapon in hand)\n$: 12 gold pieces"
    assert dn.automem_rewrite("kitten very near northnortheast\ndoor adjacent east and far westsouthwest; "
                              "nearby") == ("kitten 2 steps away between north and northeast\ndoor 1 step "
                                            "away (directly reachable) east and 5-8 steps away between "
                                            "west and southwest; nearby")


def test_nle_text_styles():
    from automem_jax.envs.nethack import NetHackTextEnv

    env, other = NetHackTextEnv("Corridor-R3"), NetHackTextEnv("Corridor-R3", text_style="exact")
    balrog, exact = env.reset(seed=3), other.reset(seed=3)
    env.close()
    other.close()
    with pytest.raises(ValueError, match="text_style"):
        NetHackTextEnv("Corridor-R3", text_style="nle")
    assert len(balrog.extras["map"]) == 23 and all(len(r) == 80 for r in balrog.extras["map"])
    assert balrog.long_term.endswith("\n\n") and balrog.short_term.startswith("inventory:\n")
    # "exact": step counts and hyphenated 16-point directions; BALROG: buckets as AutoMem rewrote them.
    assert "horizontal wall 2 steps north, south, southwest, and northwest" in exact.extras["around"]
    assert "horizontal wall 2 steps away north, south, southwest, and northwest" in balrog.extras["around"]
    assert "closed door 2 steps south-southwest" in exact.extras["around"]
    assert "horizontal closed door 2 steps away between south and southwest" in balrog.long_term
    assert all(r == r.rstrip() for r in exact.extras["map"])
    assert balrog.long_term != exact.long_term
