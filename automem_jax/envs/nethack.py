"""NetHack (``NetHackChallenge-v0``) and MiniHack tasks as text, one episode per ``NetHackTextEnv``.

Actions are BALROG's strings. NetHack: BALROG's 248 (its 86 named commands, the letters a-z / A-Z
for menu and item answers, digits 0-9 and 00-99 for counts; a two-digit string is two keystrokes,
where BALROG's step fails), plus any ``extra_commands`` asked for; default ``esc``. MiniHack: the
task's own actions among BALROG's 33 MiniHack names; default ``north``.
``--More--`` is answered automatically (BALROG's ``skip_more``), the messages joined. Progression is
BALROG's (see ``progression.py``). Defaults follow BALROG's and AutoMem's configs: NetHack runs up to
100,000 steps and aborts after 150 steps without game time passing; MiniHack runs 100 steps with a
-0.01 penalty for steps where no game time passes and autopickup on (AutoMem; BALROG had it off).

Seeds: NetHack's two RNGs are seeded from the episode seed with re-seeding off, so an episode is a
function of (seed, actions); that is what lets the worker pool rebuild an episode after a crash.
NetHackChallenge forbids seeding through its API (a competition rule); we set the seeds on the game
underneath. A seed of None draws a fresh one, reported in ``info["seed"]``.
"""
from __future__ import annotations

import os
import random
import secrets
import warnings
import zlib
from collections.abc import Sequence

from . import describe_nle as dn
from .base import EpisodeOverError, Obs, TextEnv, resolve_action
from .progression import BL_DEPTH, BL_XP, MiniHackProgress, NetHackProgress

NETHACK_TASK = "NetHackChallenge-v0"
# The paper's (and BALROG's) eight MiniHack tasks.
MINIHACK_TASKS = ("MazeWalk-9x9", "MazeWalk-15x15", "Corridor-R3", "CorridorBattle-Dark",
                  "Quest-Easy", "Quest-Medium", "Boxoban-Medium", "Boxoban-Hard")
BOXOBAN_ENV_VAR = "AUTOMEM_BOXOBAN_LEVELS"
OBS_KEYS = ("glyphs", "blstats", "tty_chars", "tty_cursor", "inv_strs", "inv_letters")

NETHACK_DEFAULTS = {"character": "@", "max_episode_steps": 100_000, "no_progress_timeout": 150}
MINIHACK_DEFAULTS = {"character": "@", "max_episode_steps": 100, "penalty_step": -0.01,
                     "penalty_time": 0.0, "penalty_mode": "constant", "autopickup": True}

# Short help for each named action (ours); the names are BALROG's.
ACTION_HELP = {
    "north": "move one step north", "east": "move one step east", "south": "move one step south",
    "west": "move one step west", "northeast": "move one step northeast",
    "southeast": "move one step southeast", "southwest": "move one step southwest",
    "northwest": "move one step northwest",
    **{f"far {d}": f"run {d} until something interesting happens" for d in (
        "north", "east", "south", "west", "northeast", "southeast", "southwest", "northwest")},
    "up": "climb up a staircase or ladder you stand on", "down": "go down a staircase or ladder you stand on",
    "wait": "do nothing for one turn", "more": "show the next part of a long message",
    "adjust": "change an item's inventory letter", "annotate": "write a note for this dungeon level",
    "apply": "use a tool", "attributes": "show your attributes", "call": "give a name to a monster or object type",
    "cast": "cast a known spell", "chat": "talk to someone", "close": "close an adjacent door",
    "dip": "dip an object into something", "drop": "drop an item", "droptype": "drop items of chosen types",
    "eat": "eat something", "engrave": "write on the floor (Elbereth scares many monsters)",
    "enhance": "advance weapon skills", "esc": "cancel a prompt or close a menu",
    "fight": "attack in a direction even if nothing is seen there", "fire": "fire from your quiver",
    "force": "force a lock open", "inventory": "show your inventory", "inventtype": "show items of one type",
    "invoke": "invoke an object's special power", "jump": "jump to a nearby spot",
    "kick": "kick something (a locked door, a box, a monster)", "look": "look at what is here",
    "loot": "open a container on the floor", "monster": "use a monster ability while polymorphed",
    "move": "move without picking up or fighting", "movefar": "run without picking up or fighting",
    "offer": "sacrifice a corpse at an altar", "open": "open an adjacent door",
    "overview": "list the dungeon levels you know", "pay": "pay a shopkeeper",
    "pickup": "pick up things here", "pray": "pray for help (rarely, and when in trouble)",
    "puton": "put on a ring or amulet", "quaff": "drink a potion or from a fountain",
    "quiver": "choose what to fire", "read": "read a scroll or spellbook", "remove": "take off a ring or amulet",
    "ride": "ride a saddled creature", "rub": "rub a lamp or stone", "rush": "run in a direction",
    "rush2": "run in a direction (stops at more things)", "search": "search around you for hidden passages",
    "seeamulet": "show the amulet you wear", "seearmor": "show worn armor", "seegold": "count your gold",
    "seerings": "show worn rings", "seespells": "list the spells you know", "seetools": "show tools in use",
    "seetrap": "identify an adjacent trap", "seeweapon": "show wielded weapon", "shell": "(unused here)",
    "sit": "sit down", "swap": "swap primary and secondary weapon", "takeoff": "take off armor",
    "takeoffall": "take off all armor", "teleport": "teleport, if you can", "throw": "throw something",
    "tip": "empty a container", "travel": "travel to a map spot (next answer: < or > for stairs, _ altar)",
    "turnundead": "turn undead (priests, knights)", "twoweapon": "fight with two weapons",
    "untrap": "disarm a trap", "versionshort": "show the game version", "wear": "put on armor",
    "wield": "wield a weapon", "wipe": "wipe your face", "zap": "zap a wand",
    "plus": "the + key (spell list, or an answer)", "minus": "the - key (e.g. bare hands)",
    "space": "the space key (dismiss or page a window)", "apos": "the ' key", "quote": "the \" key",
    "dollar": "the $ key (gold)",
}
# BALROG's MiniHack action vocabulary; a task offers those of its own actions that are listed here.
MINIHACK_ACTION_NAMES = (
    "north", "east", "south", "west", "northeast", "southeast", "southwest", "northwest",
    "far north", "far east", "far south", "far west", "far northeast", "far southeast",
    "far southwest", "far northwest", "up", "down", "wait", "more", "apply", "close", "open", "eat",
    "force", "kick", "loot", "pickup", "pray", "puton", "quaff", "search", "zap",
)
# Opt-in additions to BALROG's NetHack actions (``extra_commands``): commands its instruction text
# names but its action space lacks (NLE leaves them out of USEFUL_ACTIONS), and the raw minus,
# apostrophe, plus, quote and dollar keys (the last three send the keys of seespells, seeamulet and
# seegold under another name). Appended after BALROG's named commands, in the order given.
EXTRA_COMMANDS = ("annotate", "overview", "teleport", "travel", "minus", "apos", "plus", "quote", "dollar")
_EXTRA_KEYS = ("minus", "apos", "plus", "quote", "dollar")  # NLE TextCharacters; the rest are Commands


def parse_extra_commands(extra: Sequence[str] | str | None) -> list[str]:
    """A list of EXTRA_COMMANDS names from a sequence or a comma-separated string (a config value)."""
    items = extra.split(",") if isinstance(extra, str) else list(extra or ())
    names = [x.strip().lower() for x in items if x and x.strip()]
    bad = [x for x in names if x not in EXTRA_COMMANDS]
    if bad:
        raise ValueError(f"unknown extra_commands {bad}; known: {', '.join(EXTRA_COMMANDS)}")
    return list(dict.fromkeys(names))


def _balrog_named_actions():
    """BALROG's named NetHack actions, in its order.

    BALROG walks NLE's language-wrapper action table (compass moves, far moves, up/down/wait, more,
    the commands, then the text keys) and keeps the entries equal to one of USEFUL_ACTIONS. NLE
    actions compare by key code, so the commands that share a key with a text key NLE keeps
    (seespells '+', seeamulet '"', seegold '$') are in, under their command names. The table lists
    the commands in NLE's enum order except that esc comes before engrave and fire before fight.
    """
    from nle.nethack import USEFUL_ACTIONS
    from nle.nethack import actions as A

    commands = list(A.Command)
    for first, second in ((A.Command.ESC, A.Command.ENGRAVE), (A.Command.FIRE, A.Command.FIGHT)):
        commands.remove(first)
        commands.insert(commands.index(second), first)
    text_keys = [A.TextCharacters.MINUS, A.TextCharacters.SPACE, A.TextCharacters.APOS]
    text_keys += [A.TextCharacters[f"NUM_{d}"] for d in range(10)]
    table = (list(A.CompassDirection) + list(A.CompassDirectionLonger) + list(A.MiscDirection)
             + list(A.MiscAction) + commands + text_keys)
    useful = {int(a) for a in USEFUL_ACTIONS}
    names, seen = [], set()
    for a in table:
        if int(a) in useful and int(a) not in seen:
            seen.add(int(a))
            names.append((_action_name(a), a))
    return names


def _action_name(a) -> str:
    from nle.nethack import actions as A

    dirs = {"N": "north", "E": "east", "S": "south", "W": "west", "NE": "northeast",
            "SE": "southeast", "SW": "southwest", "NW": "northwest"}
    if isinstance(a, (A.CompassDirection, A.CompassCardinalDirection, A.CompassIntercardinalDirection)):
        return dirs[a.name]
    if isinstance(a, (A.CompassDirectionLonger, A.CompassCardinalDirectionLonger,
                      A.CompassIntercardinalDirectionLonger)):
        return "far " + dirs[a.name]
    if isinstance(a, A.TextCharacters):
        return {"APOS": "apos"}.get(a.name, a.name[4:] if a.name.startswith("NUM_") else a.name.lower())
    if isinstance(a, A.Command) and a.name == "TURN":
        return "turnundead"
    return a.name.lower()


def _import_minihack():
    # minihack 1.0.2 imports pkg_resources, whose deprecation warning is noise to our users.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
        import minihack  # noqa: F401  (registers the MiniHack ids)


def resolve_task(task: str) -> tuple[str, str]:
    """('nethack' | 'minihack', gym id) for a task name such as 'Corridor-R3' or 'MiniHack-Corridor-R3-v0'."""
    import gymnasium as gym
    import nle  # noqa: F401

    _import_minihack()

    if task in (NETHACK_TASK, "NetHackChallenge", "nethack"):
        return "nethack", NETHACK_TASK
    gym_id = task if task.startswith("MiniHack-") else f"MiniHack-{task}"
    if not gym_id.endswith(("-v0", "-v1")):
        gym_id += "-v0"
    if gym_id in gym.registry:
        return "minihack", gym_id
    known = sorted(k[len("MiniHack-"):-3] for k in gym.registry if k.startswith("MiniHack-"))
    raise ValueError(f"unknown MiniHack task {task!r}. The paper's tasks: {', '.join(MINIHACK_TASKS)}; "
                     f"all {len(known)} registered: {', '.join(known)}")


def _boxoban_levels(gym_id: str, levels: str | None) -> str:
    """The Boxoban levels folder to use, or a ValueError that says what to pass."""
    import minihack.envs.boxohack as bx

    sub = {"MiniHack-Boxoban-Medium-v0": ("medium", "train"), "MiniHack-Boxoban-Hard-v0": ("hard", ""),
           "MiniHack-Boxoban-Unfiltered-v0": ("unfiltered", "train")}[gym_id]
    candidates = [levels] if levels else [os.environ.get(BOXOBAN_ENV_VAR), bx.LEVELS_PATH]
    for root in candidates:
        if root and os.path.isdir(os.path.join(root, *sub)):
            return root
    where = f"{levels!r} has no {'/'.join(p for p in sub if p)!r} folder" if levels else "no levels path given"
    raise ValueError(
        f"{gym_id} needs the Boxoban level files ({where}). Pass boxoban_levels='/path/to/boxoban-levels' "
        f"(a copy of github.com/deepmind/boxoban-levels: the folder holding medium/train/*.txt and "
        f"hard/*.txt) to make(), or set {BOXOBAN_ENV_VAR}.")


def minihack_goal(task: str) -> str:
    t = task.lower()
    if "corridor" in t:
        return "Find your way through the corridors and reach the staircase down ('>')."
    if "quest" in t:
        return ("Cross the level, dealing with the monsters and obstacles on the way, and reach the "
                "staircase down ('>').")
    if "boxoban" in t:
        return ("This is Boxoban, a Sokoban-like puzzle: push every boulder ('`' or '0') onto a fountain "
                "('{') by walking into it; a boulder moves only if the cell behind it is free.")
    if "mazewalk" in t:
        return "Find the way through the maze to the staircase down ('>')."
    return "Get as far as you can."


class NetHackTextEnv(TextEnv):
    """One NetHack or MiniHack episode as text (runs in this process; ``workers.py`` runs many)."""

    def __init__(self, task: str = NETHACK_TASK, *, skip_more: bool = True,
                 boxoban_levels: str | None = None, extra_commands: Sequence[str] | str = (),
                 text_style: str = "balrog", **env_kwargs):
        import gymnasium as gym
        from gymnasium.envs.registration import load_env_creator
        from nle.nethack import actions as A

        self.family, self.task = resolve_task(task)
        if text_style not in dn.TEXT_STYLES:
            raise ValueError(f"text_style must be one of {dn.TEXT_STYLES}, got {text_style!r}")
        self.text_style = text_style
        extra = parse_extra_commands(extra_commands)
        if extra and self.family != "nethack":
            raise ValueError("extra_commands applies to NetHack only; MiniHack keeps its task's BALROG actions")
        kwargs = dict(NETHACK_DEFAULTS if self.family == "nethack" else MINIHACK_DEFAULTS)
        kwargs.update(env_kwargs)
        spec = gym.spec(self.task)
        if boxoban_levels is not None and "Boxoban" not in self.task:
            raise ValueError(f"boxoban_levels only applies to Boxoban tasks, not {self.task}")
        make_env = load_env_creator(spec.entry_point)
        try:
            if "Boxoban" in self.task:
                import minihack.envs.boxohack as bx

                # BoxoHack reads this module-level path when constructed; put it back afterwards.
                default = bx.LEVELS_PATH
                bx.LEVELS_PATH = _boxoban_levels(self.task, boxoban_levels)
                try:
                    self._env = make_env(**{**spec.kwargs, **kwargs, "observation_keys": OBS_KEYS})
                finally:
                    bx.LEVELS_PATH = default
            else:
                self._env = make_env(**{**spec.kwargs, **kwargs, "observation_keys": OBS_KEYS})
        except TypeError as e:
            raise ValueError(f"bad keyword for {self.task}: {e}") from None
        self.skip_more = skip_more
        self._keys = {"glyphs": 0, "blstats": 1, "tty_chars": 2, "tty_cursor": 3,
                      "inv_strs": 4, "inv_letters": 5}
        env_actions = list(self._env.actions)
        index_of = {}
        for i, a in enumerate(env_actions):
            index_of.setdefault(int(a), i)
        self._more = index_of.get(int(A.MiscAction.MORE))

        if self.family == "minihack":
            names = []
            for a in env_actions:
                n = _action_name(a)
                if n in MINIHACK_ACTION_NAMES and n not in names:
                    names.append(n)
            self.default_action = "north"
            self._named = names
            keys = {n: (index_of[int(a)],) for a in env_actions if (n := _action_name(a)) in names}
        else:
            named = _balrog_named_actions()
            for x in extra:
                named.append((x, A.TextCharacters[x.upper()] if x in _EXTRA_KEYS else A.Command[x.upper()]))
            keys = {n: (index_of[int(a)],) for n, a in named}
            self._named = list(keys)  # what the instruction lists one by one
            chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + \
                    [chr(c) for c in range(ord("A"), ord("Z") + 1)] + [str(d) for d in range(10)]
            two = [f"{d:02d}" for d in range(100)]
            names = list(keys) + chars + two
            keys.update({c: (index_of[ord(c)],) for c in chars})
            keys.update({t: (index_of[ord(t[0])], index_of[ord(t[1])]) for t in two})
            self.default_action = "esc"
        self.actions = names
        self._action_keys = keys
        self.instruction = self._instruction()
        self.seed: int | None = None
        self._raw = None
        self._done = True
        self._steps = 0
        self._progress = None
        self._message = ""

    # -- TextEnv -------------------------------------------------------------------------------------
    def reset(self, seed: int | None = None, render: bool = True) -> Obs | None:
        self.seed = secrets.randbits(31) if seed is None else int(seed)
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        core, disp = self.seed, (self.seed * 0x9E3779B1 + 0x7F4A7C15) % (1 << 62)
        env = self._env
        if self.family == "nethack":
            env.nethack._pynethack.set_initial_seeds(core, disp, False, None)
            self._raw, _ = env.reset()
        else:
            env.seed(core, disp, reseed=False)
            if "Boxoban" in self.task and not hasattr(env, "_goal_pos_set"):
                # minihack 1.0.2's BoxoHack checks its goal set during its first reset, before it
                # sets it; an empty set reads as "not solved" until the reset fills it in.
                env._goal_pos_set = set()
            state = random.getstate()
            random.seed(self.seed)  # some tasks (Boxoban) pick their level with the random module
            try:
                self._raw, _ = env.reset()
            finally:
                random.setstate(state)
        self._progress = NetHackProgress() if self.family == "nethack" else MiniHackProgress()
        self._done, self._steps = False, 0
        # BALROG's AutoMore reads the message of the reset screen without pressing MORE.
        self._message = dn.read_message(self._raw["tty_chars"], self._text_style())
        self._end_status = 0
        return self.observe() if render else None

    def step(self, action: str):
        if self._done:
            raise EpisodeOverError(f"the {self.task} episode is over (or was never reset); call reset()")
        executed, info = resolve_action(action, self._action_keys, self.default_action)
        reward, terminated, truncated = self._apply(executed)
        obs = self.observe()
        info.update(step=self._steps, seed=self.seed, end_status=self._end_status,
                    progression=self._progress.progression)
        if self.family == "nethack":
            info["milestone"] = self._progress.highest
        return obs, reward, terminated, truncated, info

    def progression(self) -> float:
        return self._progress.progression if self._progress is not None else 0.0

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None

    # -- internals -----------------------------------------------------------------------------------
    def _apply(self, executed: str) -> tuple[float, bool, bool]:
        """Send the keystrokes of one action (answering --More--), update progress; no text."""
        with warnings.catch_warnings():
            # NLE warns whenever an aborted game cannot be quit "smoothly"; the episode ends either way.
            warnings.filterwarnings("ignore", message="Warning: smooth quitting", category=UserWarning)
            return self._apply_keys(executed)

    def _apply_keys(self, executed: str) -> tuple[float, bool, bool]:
        total, done, truncated = 0.0, False, False
        for key in self._action_keys[executed]:
            raw, r, done, truncated, info = self._env.step(key)
            total += r
            message = dn.read_message(raw["tty_chars"], self._text_style())
            # --More-- pages are joined into one message, as BALROG's AutoMore does.
            # No cap of our own beyond a guard: BALROG keeps pressing MORE (a counted command can
            # take thousands of pages); the episode's step limit ends the loop.
            for _ in range(1_000_000):
                # BALROG's old-gym `done` also covered truncation.
                if not (self.skip_more and self._more is not None and "--More--" in message) or done \
                        or truncated:
                    break
                message = message.replace("--More--", "\n")
                raw, r, done, truncated, info = self._env.step(self._more)
                total += r
                message += dn.read_message(raw["tty_chars"], self._text_style())
            if done:
                break
        self._raw, self._message, self._steps = raw, message, self._steps + 1
        self._end_status = int(info["end_status"])
        truncated = bool(truncated) or self._end_status == int(self._env.StepStatus.ABORTED)
        terminated = bool(done) and not truncated
        self._done = terminated or truncated
        if self.family == "nethack":
            self._progress.update(raw["blstats"])
        else:
            self._progress.update(total)
        return float(total), terminated, truncated

    def replay(self, seed: int, actions) -> int:
        """Rebuild an episode from its seed and executed actions; returns the state hash."""
        self.reset(seed, render=False)
        for a in actions:
            self._apply(a)
        return self.state_hash()

    def state_hash(self) -> int:
        raw = self._raw
        h = zlib.crc32(raw["tty_chars"].tobytes())
        h = zlib.crc32(raw["blstats"].tobytes(), h)
        return zlib.crc32(raw["inv_strs"].tobytes(), h)

    @property
    def done(self) -> bool:
        return self._done

    def _text_style(self) -> str:
        # "balrog": BALROG's text + AutoMem's rewrite (the paper's); "exact": our older describer.
        return self.text_style

    def observe(self) -> Obs:
        raw = self._raw
        bl = raw["blstats"]
        long_term, short_term, parts = dn.hybrid_text(
            self._message, raw["glyphs"], bl, raw["tty_chars"], raw["tty_cursor"],
            raw["inv_strs"], raw["inv_letters"], text_style=self._text_style())
        stats = {"x": int(bl[0]), "y": int(bl[1]), "hp": int(bl[10]), "max_hp": int(bl[11]),
                 "depth": int(bl[BL_DEPTH]), "gold": int(bl[13]), "ac": int(bl[16]),
                 "xp_level": int(bl[BL_XP]), "time": int(bl[20]), "hunger": int(bl[21]),
                 "score": int(bl[9])}
        extras = {"message": self._message, "map": parts["map"], "around": parts["around"],
                  "inventory": parts["inventory"], "stats": stats,
                  "cursor": (int(raw["tty_cursor"][1]), int(raw["tty_cursor"][0])),
                  "step": self._steps, "seed": self.seed, "task": self.task}
        return Obs(long_term, short_term, extras)

    def _instruction(self) -> str:
        if self.family == "minihack":
            acts = "\n".join(f"{a}: {ACTION_HELP[a]}" for a in self.actions)
            short = self.task[len("MiniHack-"):-3]
            return (f"You are playing MiniHack ({short}), a small NetHack level seen as text. Each step, "
                    f"answer with exactly one of these actions:\n\n{acts}\n\n"
                    "Repeating an action that changes nothing wastes a step.\n\n"
                    f"Goal: {minihack_goal(short)}")
        acts = "\n".join(f"{a}: {ACTION_HELP[a]}" for a in self._named)
        return (
            "You are playing NetHack, a dungeon-crawling game, seen as text (a message, what is around "
            "you, the screen map and your inventory). Each step, answer with exactly one action:\n\n"
            f"{acts}\n\nAlso valid: a single letter a-z or A-Z (to pick an item or a menu entry), a digit "
            "0-9, or a two-digit number 00-99 (a count or a menu choice).\n\n"
            "Hints:\n"
            "- When asked \"What do you want to eat? [fg or ?*]\", answer with one of the listed letters.\n"
            "- When asked \"In what direction?\", answer with a direction such as west.\n"
            "- Attack a monster by moving into it.\n"
            "- 'It's a wall' or 'It's solid stone' means that way is blocked: try another direction.\n"
            "- To descend, stand on '>' and use down.\n\n"
            "Goal: get as deep into the dungeon and as experienced as you can.")
