"""automem_jax.envs.nle_glyphs: BALROG's C++ glyph / cursor text, on hand-made glyph maps.

Every expected string below was produced by the compiled C++ ``NLELanguageObsv`` (balrog-nle 0.9.0
main.cpp, built against nle 1.3.0's glyph numbering) on these same arrays; the C++ build itself is
not needed to run these tests.
"""
import numpy as np
import pytest

nh = pytest.importorskip("nle.nethack")

from automem_jax.envs.nle_glyphs import (  # noqa: E402
    pluralize, position_words, text_cursor, text_glyphs)

C = nh.GLYPH_CMAP_OFF
DARK, VWALL, HWALL, NWCORN, NECORN, SWCORN, SECORN = (C + i for i in range(7))
VCDOOR, BARS, FLOOR, CORR, FOUNTAIN = C + 15, C + 17, C + 19, C + 21, C + 31


def mon(name):
    return next(i for i in range(nh.NUMMONS) if nh.permonst(i).mname == name)


def obj(name, cls):
    return nh.GLYPH_OBJ_OFF + next(
        i for i in range(nh.NUM_OBJECTS)
        if nh.objdescr.from_idx(i).oc_name == name and ord(nh.objclass(i).oc_class) == cls)


def blstats(x, y):
    b = np.zeros(nh.NLE_BLSTATS_SIZE, np.int64)
    b[0], b[1] = x, y
    return b


def floor_map():
    return np.full((21, 79), FLOOR, np.int16)


def room_map():
    """A lit room x 20..39, y 3..11 in unexplored surroundings."""
    g = np.full((21, 79), DARK, np.int16)
    g[3:12, 20:40] = FLOOR
    g[3, 20:40] = g[11, 20:40] = HWALL
    g[3:12, 20] = g[3:12, 39] = VWALL
    g[3, 20], g[3, 39], g[11, 20], g[11, 39] = NWCORN, NECORN, SWCORN, SECORN
    return g


def test_player_in_room_wall_rays():
    g = room_map()
    g[6, 23] = mon("valkyrie")
    b = blstats(23, 6)
    assert text_glyphs(g, b) == (
        "horizontal wall near north, northeast, southeast, and south\n"
        "vertical wall near southwest and west\n"
        "northwest room corner near northwest")
    assert text_cursor(g, b, np.array([7, 23])) == "Yourself a valkyrie"


def test_ray_passes_closed_door_and_monster_behind_it():
    g = room_map()
    g[7, 36] = mon("valkyrie")
    g[7, 39] = VCDOOR
    g[7, 40:50] = CORR
    g[7, 42] = mon("jackal")
    g[7, 44] = VWALL  # reached through the door
    b = blstats(36, 7)
    assert text_glyphs(g, b) == (
        "jackal far east\n"
        "vertical wall far east\n"
        "horizontal wall near north, south, southwest, and northwest\n"
        "vertical wall near northeast and southeast\n"
        "vertical closed door near east")
    assert text_cursor(g, b, np.array([8, 42])) == "far east jackal"


def test_distance_buckets():
    g = floor_map()
    for x in (6, 7, 9, 12, 30):  # 1, 2, 4, 7 and 25 steps east
        g[10, x] = mon("newt")
    b = blstats(5, 10)
    assert text_glyphs(g, b) == (
        "newt very far east\nnewt far east\nnewt near east\nnewt very near east\n"
        "newt adjacent east")
    assert text_cursor(g, b, np.array([11, 30])) == "very far east newt"
    assert text_cursor(g, b, np.array([11, 7])) == "very near east newt"


def test_sixteen_directions():
    g = floor_map()
    for dx, dy in [(0, -4), (1, -4), (4, -4), (4, -1), (4, 0), (4, 1), (4, 4), (1, 4), (0, 4),
                   (-1, 4), (-4, 4), (-4, 1), (-4, 0), (-4, -1), (-4, -4), (-1, -4)]:
        g[10 + dy, 40 + dx] = FOUNTAIN
    assert text_glyphs(g, blstats(40, 10)) == (
        "fountain near north, northnortheast, northeast, eastnortheast, east, eastsoutheast, "
        "southeast, southsoutheast, south, southsouthwest, southwest, westsouthwest, west, "
        "westnorthwest, northwest, and northnorthwest")
    assert position_words(3, 1) == ("near", "eastnortheast")
    assert position_words(-1, -7) == ("far", "southsouthwest")


def test_plurals_and_key_collision():
    g = floor_map()
    g[10, 43] = g[10, 44] = g[7, 40] = mon("newt")
    # "bars" is its own plural: the C++ lists the (bars, far) key twice with its last value.
    g[10, 50] = g[10, 52] = g[5, 45] = g[2, 40] = BARS
    b = blstats(40, 10)
    assert text_glyphs(g, b) == (
        "bars far east\nbars far east\nnewt near north\nnewts near east\nbars near northeast")
    assert text_cursor(g, b, np.array([11, 40])) == "Yourself a "


def test_odd_plurals_warning_swallow():
    g = floor_map()
    g[10, 30] = g[10, 31] = mon("lich")
    g[12, 41] = g[12, 42] = nh.GLYPH_WARNING_OFF + 2
    g[15, 40] = g[16, 40] = nh.GLYPH_SWALLOW_OFF + 3
    b = blstats(40, 10)
    assert text_glyphs(g, b) == (
        "swallow middle left far south\n"
        "lichs far west\n"
        "swallow middle left near south\n"
        "unknown creature causing you anxiety very near southeast and southsoutheast")
    assert text_cursor(g, b, np.array([12, 41])) == "adjacent southeast "


def test_object_names():
    g = floor_map()
    row = [
        obj("luckstone", nh.GEM_CLASS), obj("dilithium crystal", nh.GEM_CLASS),
        obj("worthless piece of red glass", nh.GEM_CLASS), obj("healing", nh.POTION_CLASS),
        obj("identify", nh.SCROLL_CLASS), obj("digging", nh.WAND_CLASS),
        obj("levitation", nh.RING_CLASS), obj("elven boots", nh.ARMOR_CLASS),
        obj("amulet of life saving", nh.AMULET_CLASS), obj("Amulet of Yendor", nh.AMULET_CLASS),
        obj("can of grease", nh.TOOL_CLASS),
    ]
    for k, glyph in enumerate(row):
        g[10, 42 + 2 * k] = glyph
    g[12, 40] = nh.GLYPH_STATUE_OFF + mon("newt")
    g[13, 40] = nh.GLYPH_BODY_OFF + mon("newt")
    g[14, 40] = nh.GLYPH_PET_OFF + mon("little dog")
    # Unidentified objects are named by appearance (the static, unshuffled table).
    assert text_glyphs(g, blstats(40, 10)) == (
        "Amulet of Yendor very far east\n"
        "can of grease very far east\n"
        "worthless piece of red glass far east\n"
        "purple-red potion far east\n"
        "scroll labeled KERNOD WEL far east\n"
        "iron wand far east\n"
        "agate ring far east\n"
        "mud boots far east\n"
        "spherical amulet far east\n"
        "white dilithium crystal near east\n"
        "newt corpse near south\n"
        "tame little dog near south\n"
        "gray luckstone very near east\n"
        "newt statue very near south")


def test_cursor_off_map_and_wrap():
    g = floor_map()
    g[11, 0] = mon("newt")
    b = blstats(5, 10)
    assert text_cursor(g, b, np.array([0, 5])) == ""     # message line
    assert text_cursor(g, b, np.array([22, 5])) == ""    # status lines
    assert text_cursor(g, b, np.array([1, 0])) == ""     # map index 0 is never described
    assert text_cursor(g, b, np.array([3, 6])) == "far northnortheast "  # floor: empty name
    # Column 79 is past the map: the C++ index wraps to column 0 of the next row.
    assert text_cursor(g, b, np.array([11, 79])) == "very far east newt"


def test_pluralize():
    assert pluralize("newt") == "newts"
    assert pluralize("jelly") == "jellies"
    assert pluralize("box") == "boxes"
    assert pluralize("wolf") == "wolves"
    assert pluralize("quarterstaff") == "quarterstaves"
    assert pluralize("mud boots") == "mud boots"
    assert pluralize("scroll labeled FOO") == "scrolls labeled FOO"
    assert pluralize("lava") == "area of lava"
    assert pluralize("lich") == "lichs"  # the C++'s "ch" test never fires
