"""import-upstream: a structure built at run time from a user's own AutoMem checkout.

The scaffolds here are synthetic: upstream's file layout and constant names, our own made-up
text. The last test imports the real scaffolds when a checkout (or the bare mirror) is around.
"""
import hashlib
import json
import os
import shutil
import string
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from automem_jax.agent.memory_agent import MemoryAgent, drive
from automem_jax.agent.context import BLOCKS
from automem_jax.memory.cli import main
from automem_jax.memory.schema import PROMPT_PLACEHOLDERS
from automem_jax.memory.structure import MemoryStructure
from automem_jax.memory.template import render
from automem_jax.memory.upstream import (_ENTRY_RE, PLACEHOLDER_MAP, Scaffold, UpstreamError,
                                         check_sources, import_scaffold)

REPO = Path(__file__).resolve().parents[1]
SCAFFOLD = "crafter_synth"
AGENT = f"scaffolds/{SCAFFOLD}/agents/memory_agent.py"

# Made-up text in upstream's layout: module-level constants, a listing of commands in the
# templates, str.format placeholders. The module would fail if it were ever executed.
AGENT_SOURCE = textwrap.dedent('''\
    import os
    from omegaconf import OmegaConf
    from agents.base import BaseAgent
    from agents.lore import ORCHARD_LORE

    raise SystemExit("this module must never be executed by the importer")

    MAX_LOG_ITERATIONS = 3
    MAX_VALIDATE_ITERATIONS = 4
    MAX_SEARCH_RESULTS = 77

    FALLBACK_ACTIONS = {"crafter": "Noop", "nle": "search", "minihack": "search"}
    FALLBACK_ACTION_DEFAULT = "wait"
    _DIRECTION_COMMANDS = frozenset(["nudge", "poke"])
    _ITEM_COMMANDS = frozenset(["munch"])
    _TWO_STEP_COMMANDS = _DIRECTION_COMMANDS | _ITEM_COMMANDS

    CRAFTER_MEMORY_SYSTEM_PROMPT = """\\
    You tend a PAPAYA ORCHARD. Pick one action per turn."""

    CRAFTER_LOG_INSTRUCTIONS = "ORCHARD LOGGING: write down every ripe papaya you see."

    SEED_NOTES = "row 1: saplings\\n" + "row 2: " + "young trees\\n"

    INITIAL_FILES_BY_ENV = {
        "crafter": {
            "orchard_lore.txt": ORCHARD_LORE,
            "seed_notes.txt": SEED_NOTES,
            "harvest_log.txt": "",
        },
    }
    INITIAL_FILES_DEFAULT = {"scratch.txt": ""}

    SPATIAL_GUIDANCE = {
        "crafter": (
            "ORCHARD GUIDANCE: papayas ripen in the sun; "
            "count the rows before you move."
        ),
    }
    SPATIAL_GUIDANCE_DEFAULT = ("GENERIC GUIDANCE: look around.")

    LOG_SYSTEM = """\\
    ZEBRA LOG HEADER: keep the orchard ledger.

    {action_description}

    {diff_notice}

    {spatial_guidance}

    {map_analysis}

    {env_specific_logging}

    {threat_warning}

    WHAT YOU SEE NOW:
    {observation}

    LEDGER FILES:
    {file_index}

    TOOLS:
      <|SEARCH|>file.txt|word<|END|>        Look for a word in a ledger
      <|READ|>file.txt<|END|>               Read a ledger
      <|APPEND|>file.txt|note<|END|>        Add a ledger line
      <|DONE|>                              Stop writing

    Braces stay literal: {{like this}}. End with <|DONE|>."""

    LOG_CONTINUE = """\\
    ZEBRA LOG RESULTS:
    {results}

    {file_index}"""

    PLAN_SYSTEM = """\\
    {instruction_prompt}

    ZEBRA PLAN HEADER: consult the ledger before you pick.

    {spatial_guidance}

    {stuckness_warning}

    {vital_urgency}

    LEDGER FILES:
    {file_index}

    WHAT YOU SEE NOW:
    {observation}

    TOOLS (read only):
      <|SEARCH|>file.txt|word<|END|>        Find a word
      <|ACTION|>the_action<|END|>           Pick the action

    Pick exactly one action."""

    PLAN_CONTINUE = """\\
    ZEBRA PLAN RESULTS:
    {results}"""

    class MemoryAgent(BaseAgent):
        def _get_instruction_prompt_override(self):
            if self._env_name == "crafter":
                return CRAFTER_MEMORY_SYSTEM_PROMPT
            return None

        def prune(self):
            self.memory.auto_prune("harvest_log.txt", max_lines=40, keep_lines=20)
    ''')
LORE_SOURCE = 'ORCHARD_LORE = "Papayas grow on the sunny side.\\n"\n'


def make_checkout(root: Path, agent_source: str = AGENT_SOURCE) -> Path:
    agents = root / "scaffolds" / SCAFFOLD / "agents"
    agents.mkdir(parents=True, exist_ok=True)
    (agents / "__init__.py").write_text("")
    (agents / "memory_agent.py").write_text(agent_source, encoding="utf-8")
    (agents / "lore.py").write_text(LORE_SOURCE, encoding="utf-8")
    return root


def edit_agent(root: Path, old: str, new: str) -> None:
    p = root / AGENT
    text = p.read_text(encoding="utf-8")
    assert old in text
    p.write_text(text.replace(old, new), encoding="utf-8")


def rendered_prompts(s: MemoryStructure) -> tuple[str, str]:
    """(LOG prompt, PLAN prompt) of step 1 of a real MemoryAgent using the structure."""
    agent = MemoryAgent(s, actions=["Noop", "Move Left"], default_action="Noop",
                        instruction="THE ENV'S OWN INSTRUCTION")

    def respond(req):
        return "<|DONE|>" if req.phase == "log" else "<|ACTION|>Noop<|END|>"

    drive(agent.act("You see grass.\nhealth: 9/9"), respond)
    _, rec = drive(agent.act("You see a papaya tree.\nhealth: 9/9"), respond)
    return rec.log.initial_prompt, rec.plan.initial_prompt


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "automem_jax.memory.structure", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


# --------------------------------------------------------------------------- happy path


def test_cli_subprocess_builds_a_valid_structure_that_renders_the_scaffold_text(tmp_path):
    root = make_checkout(tmp_path / "AutoMem")
    out = tmp_path / "out" / "synth.json"
    r = run_cli("import-upstream", str(root), "--scaffold", SCAFFOLD, "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    sha = hashlib.sha256((root / AGENT).read_bytes()).hexdigest()
    assert f"sha256={sha}" in r.stdout and "{threat_warning}" in r.stdout  # dropped: reported

    s = MemoryStructure.load(out).validate()
    assert run_cli("validate", str(out)).returncode == 0
    assert s.env == "crafter" and s.name == f"upstream-{SCAFFOLD}-crafter"
    # Provenance: the checkout, every file read and its sha256 (the lore module too).
    assert f"upstream-root: {root.resolve()}" in s.doc["notes"]
    assert f"upstream-file: {AGENT} sha256={sha}" in s.doc["notes"]
    assert f"scaffolds/{SCAFFOLD}/agents/lore.py sha256=" in s.doc["notes"]

    assert s.initial_files() == {"orchard_lore.txt": "Papayas grow on the sunny side.\n",
                                 "seed_notes.txt": "row 1: saplings\nrow 2: young trees\n",
                                 "harvest_log.txt": ""}
    assert s.phase_ops("log") == ("SEARCH", "READ", "APPEND", "DONE")
    assert s.phase_ops("plan") == ("SEARCH", "ACTION")
    assert s.budgets["log_turns"] == 3 and s.budgets["plan_turns"] == 4
    assert s.limits.max_search_results == 77 and s.fallback_action == "Noop"
    assert [(r.file, r.max_lines, r.keep_lines) for r in s.pruning] == [("harvest_log.txt", 40,
                                                                         20)]
    assert [n for n, _ in s.context_blocks("log")] == ["unchanged_observation"]
    assert [n for n, _ in s.context_blocks("plan")] == ["unchanged_observation",
                                                        "vitals_urgency"]

    log, plan = rendered_prompts(s)
    assert log.startswith("ZEBRA LOG HEADER")
    assert "ORCHARD GUIDANCE: papayas ripen in the sun; count the rows" in log
    assert "ORCHARD LOGGING: write down every ripe papaya" in log  # inlined constant
    assert "Braces stay literal: {like this}." in log  # str.format escapes undone
    assert "WHAT YOU SEE NOW:\nYou see a papaya tree." in log
    assert '"Noop"' in log  # our action_description
    assert "<|APPEND|>file.txt|note<|END|>" in log and "Add a ledger line" in log
    assert "{" + "threat_warning}" not in log and "\n\n\n" not in log
    assert plan.startswith("You tend a PAPAYA ORCHARD.")
    assert "ZEBRA PLAN HEADER" in plan and "<|ACTION|>the_action<|END|>" in plan
    assert "<|APPEND|>" not in plan


def test_cli_in_process_matches_subprocess(tmp_path, capsys):
    root = make_checkout(tmp_path / "AutoMem")
    a, b = tmp_path / "a.json", tmp_path / "b.yaml"
    assert main(["import-upstream", str(root), "--scaffold", SCAFFOLD, "--out", str(a)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert run_cli("import-upstream", str(root), "--scaffold", SCAFFOLD, "--env", "crafter",
                   "--out", str(b)).returncode == 0
    assert MemoryStructure.load(a) == MemoryStructure.load(b)
    assert json.loads(a.read_text())["prompts"]["log"].startswith("ZEBRA LOG HEADER")


def test_text_is_read_at_run_time_and_a_changed_file_is_reported(tmp_path, capsys):
    root = make_checkout(tmp_path / "AutoMem")
    out = tmp_path / "s.json"
    assert main(["import-upstream", str(root), "--scaffold", SCAFFOLD, "--out", str(out)]) == 0
    assert main(["check-upstream", str(out)]) == 0
    assert "unchanged" in capsys.readouterr().out

    edit_agent(root, "ZEBRA LOG HEADER", "GIRAFFE LOG HEADER")
    assert main(["check-upstream", str(out)]) == 1
    msg = capsys.readouterr().out
    assert f"{AGENT}: sha256 mismatch" in msg and "run import-upstream again" in msg
    assert rendered_prompts(MemoryStructure.load(out))[0].startswith("ZEBRA")  # the saved copy

    assert main(["import-upstream", str(root), "--scaffold", SCAFFOLD, "--out", str(out)]) == 0
    assert main(["check-upstream", str(out)]) == 0
    assert rendered_prompts(MemoryStructure.load(out))[0].startswith("GIRAFFE LOG HEADER")

    moved = tmp_path / "moved"
    shutil.move(str(root), moved)
    assert check_sources(MemoryStructure.load(out))[0].startswith(f"{AGENT}: missing")
    assert check_sources(MemoryStructure.load(out), moved) == []


def test_nle_env_uses_defaults_and_keeps_map_analysis(tmp_path):
    root = make_checkout(tmp_path / "AutoMem")
    s = import_scaffold(root, SCAFFOLD, "nle").validate()
    assert s.env == "nethack" and s.initial_files() == {"scratch.txt": ""}
    assert s.prompts["guidance"] == "GENERIC GUIDANCE: look around."
    assert s.prompts["instruction"] is None  # no NLE override: the env's own instruction
    assert "{map_analysis}" in s.prompts["log"]
    assert "ORCHARD LOGGING" not in s.prompts["log"]  # crafter-only text
    assert s.two_step_commands == ("munch", "nudge", "poke")
    assert s.fallback_action == "search"


# --------------------------------------------------------------------------- errors


def _fails(tmp_path, capsys, root, *extra) -> str:
    out = tmp_path / "never.json"
    rc = main(["import-upstream", str(root), "--scaffold", SCAFFOLD, "--out", str(out), *extra])
    msg = capsys.readouterr().out
    assert rc != 0 and msg.startswith("error: ") and not out.exists()
    return msg


def test_missing_scaffold(tmp_path, capsys):
    root = make_checkout(tmp_path / "AutoMem")
    rc = main(["import-upstream", str(root), "--scaffold", "nope_v9", "--out",
               str(tmp_path / "x.json")])
    msg = capsys.readouterr().out
    assert rc == 1 and "scaffold 'nope_v9' not found" in msg and SCAFFOLD in msg
    assert "does not exist" in _fails(tmp_path, capsys, tmp_path / "no_checkout_here")
    r = run_cli("import-upstream", str(root), "--scaffold", "nope_v9", "--out",
                str(tmp_path / "x.json"))
    assert r.returncode == 1 and "not found" in r.stdout


def test_missing_constant(tmp_path, capsys):
    root = make_checkout(tmp_path / "AutoMem")
    edit_agent(root, "PLAN_SYSTEM = ", "PLAN_SYSTEM_OLD = ")
    msg = _fails(tmp_path, capsys, root)
    assert "constant PLAN_SYSTEM not found" in msg and "memory_agent.py" in msg


def test_missing_constant_used_by_a_placeholder(tmp_path, capsys):
    root = make_checkout(tmp_path / "AutoMem")
    edit_agent(root, "CRAFTER_LOG_INSTRUCTIONS = ", "OTHER = ")
    assert "constant CRAFTER_LOG_INSTRUCTIONS not found" in _fails(tmp_path, capsys, root)


def test_unknown_placeholder(tmp_path, capsys):
    root = make_checkout(tmp_path / "AutoMem")
    edit_agent(root, "{threat_warning}", "{weather_report}")
    msg = _fails(tmp_path, capsys, root)
    assert "LOG_SYSTEM: placeholder {weather_report} cannot be mapped" in msg


@pytest.mark.parametrize("old,new,expect", [
    ("{threat_warning}", "{threat_warning!r}", "LOG_SYSTEM: placeholder {threat_warning!r}"),
    ("{{like this}}", "{{observation}}", "LOG_SYSTEM: literal text"),
    ('LOG_CONTINUE = """', 'LOG_CONTINUE = os.environ.get("X") or """',
     "constant LOG_CONTINUE"),
    ('PLAN_CONTINUE = """', 'PLAN_CONTINUE = f"""', "f-string"),
    ("<|READ|>file.txt<|END|>   ", "<|FROB|>file.txt<|END|>   ", "command FROB has no"),
    ("  <|SEARCH|>file.txt|word<|END|>        Find a word\n", "",  # still has ACTION
     None),
])
def test_bad_constants(tmp_path, capsys, old, new, expect):
    root = make_checkout(tmp_path / "AutoMem")
    edit_agent(root, old, new)
    if expect is None:
        assert import_scaffold(root, SCAFFOLD).phase_ops("plan") == ("ACTION",)
        return
    assert expect in _fails(tmp_path, capsys, root)


def test_template_without_a_command_listing(tmp_path, capsys):
    root = make_checkout(tmp_path / "AutoMem")
    edit_agent(root, "  <|SEARCH|>file.txt|word<|END|>        Find a word\n"
                     "  <|ACTION|>the_action<|END|>           Pick the action\n", "")
    assert "PLAN_SYSTEM: no command listing found" in _fails(tmp_path, capsys, root)


def test_not_python(tmp_path, capsys):
    root = make_checkout(tmp_path / "AutoMem")
    (root / AGENT).write_text("LOG_SYSTEM = '''never closed\n  def (\n", encoding="utf-8")
    assert "is not a Python file" in _fails(tmp_path, capsys, root)
    (root / AGENT).write_bytes(b"\xff\xfe\x00binary\x00")
    assert "is not a Python file" in _fails(tmp_path, capsys, root)


def test_refuses_to_write_into_the_repository(tmp_path, capsys):
    root = make_checkout(tmp_path / "AutoMem")
    target = REPO / "automem_jax" / "memory" / "defaults" / "from_upstream.json"
    rc = main(["import-upstream", str(root), "--scaffold", SCAFFOLD, "--out", str(target)])
    assert rc == 2 and not target.exists()
    assert "inside the automem_jax repository" in capsys.readouterr().out


def test_validation_problems_name_the_upstream_constant(tmp_path):
    root = make_checkout(tmp_path / "AutoMem")
    edit_agent(root, "WHAT YOU SEE NOW:\n{observation}\n\nLEDGER FILES:\n{file_index}\n\nTOOLS:",
               "TOOLS:")
    with pytest.raises(UpstreamError, match=r"prompts\.log \(from LOG_SYSTEM\): must contain"):
        import_scaffold(root, SCAFFOLD)


# --------------------------------------------------------------------------- real upstream

MIRROR = Path("/work/.mirror/autoLearnMem+AutoMem/repo")
REAL = {"crafter_v5": ["crafter"], "minihack_v4": ["minihack"], "nethack_v2": ["nle"],
        "inner_agent_v0": ["crafter", "minihack", "nle"]}


@pytest.fixture(scope="module")
def upstream_checkout(tmp_path_factory):
    env = os.environ.get("AUTOMEM_UPSTREAM")
    if env:
        if not (Path(env) / "scaffolds").is_dir():
            pytest.skip(f"AUTOMEM_UPSTREAM={env} has no scaffolds/ folder")
        return Path(env)
    if not MIRROR.is_dir() or shutil.which("git") is None:
        pytest.skip("no upstream AutoMem checkout (set AUTOMEM_UPSTREAM) and no local mirror")
    root = tmp_path_factory.mktemp("automem_upstream")
    for name in REAL:
        archive = subprocess.run(["git", "--git-dir", str(MIRROR), "archive", "HEAD",
                                  f"scaffolds/{name}"], capture_output=True, timeout=120)
        if archive.returncode != 0:
            pytest.skip(f"git archive of scaffolds/{name} failed: {archive.stderr[:200]!r}")
        subprocess.run(["tar", "-x", "-C", str(root)], input=archive.stdout, check=True)
    return root


@pytest.mark.parametrize("scaffold,env", [(s, e) for s, envs in REAL.items() for e in envs])
def test_real_upstream_scaffolds_import_and_validate(upstream_checkout, tmp_path, scaffold, env):
    agent_file = upstream_checkout / "scaffolds" / scaffold / "agents" / "memory_agent.py"
    if not agent_file.is_file():
        pytest.skip(f"{agent_file} is not in this checkout")
    out = tmp_path / f"{scaffold}.json"
    assert main(["import-upstream", str(upstream_checkout), "--scaffold", scaffold, "--env", env,
                 "--out", str(out)]) == 0
    s = MemoryStructure.load(out).validate()
    sha = hashlib.sha256(agent_file.read_bytes()).hexdigest()
    assert f"sha256={sha}" in s.doc["notes"]
    assert check_sources(s) == []
    log, plan = rendered_prompts(s)
    assert log.strip() and plan.strip()

    # Fidelity, checked against the checkout at test time: upstream's own str.format with marker
    # values gives the same non-blank lines as our template (empty blocks drop their blank
    # lines; PLAN's command listing uses LOG's descriptions, see the structure's notes).
    sc = Scaffold.open(upstream_checkout, scaffold)
    ours_of = {"LOG_SYSTEM": "log", "LOG_CONTINUE": "log_continue", "PLAN_SYSTEM": "plan",
               "PLAN_CONTINUE": "plan_continue"}
    for const, ours in ours_of.items():
        template = sc.text(const)
        values = {}
        for _, name, _, _ in string.Formatter().parse(template):
            if name:
                kind = PLACEHOLDER_MAP[name]
                mapped = kind[0] in ("ph", "block") and not (name == "map_analysis"
                                                           and env == "crafter")
                values[name] = f"<<{kind[1]}>>" if mapped else (
                    sc.text(kind[1][env]) if kind[0] == "const" and env in kind[1] else "")
        theirs = template.format(**values)
        mine = render(s.prompts[ours], {
            **{p: f"<<{p}>>" for p in PROMPT_PLACEHOLDERS[ours] | set(BLOCKS)},
            "commands": s.commands_text(ours) if ours in ("log", "plan") else ""})

        def lines(text, skip_listing):
            return [ln for ln in text.splitlines() if ln.strip()
                    and not (skip_listing and (_ENTRY_RE.match(ln) or ln.startswith(" " * 20)))]

        plan_listing = const == "PLAN_SYSTEM"
        assert lines(mine, plan_listing) == lines(theirs, plan_listing), const
