"""A real model playing through MemoryAgent: does it use the memory-op grammar at all?

    python bench/real_agent.py                                   # packaged Qwen2.5-Coder-0.5B, 4 x 3 Crafter steps
    python bench/real_agent.py --checkpoint preset:tiny --episodes 1 --steps 1      # smoke run
    python bench/real_agent.py --bootstrap_steps 24              # LoRA warm-start on teacher demos first
    python bench/real_agent.py --two_model runs/x/specialist     # specialist: LOG + lookups; base: actions

The model (``--checkpoint``: ``pkg:<name>``, ``preset:<name>``, a HF folder or a .gguf file) plays
``--episodes`` Crafter episodes of ``--steps`` env steps through the Runner with one memory structure
(``--structure``: a default's name such as ``crafter`` or a YAML/JSON file). The peer, measured in the
same run, is the scripted teacher (``loops.teacher.TeacherClient``) on the same seeds, steps, agent and
structure. Every figure is computed from the trace lines the Runner writes; replies are re-parsed with
``memory.ops.parse`` under the structure's per-phase vocabulary, the parser the agent itself runs.

Per phase (LOG, PLAN): replies holding at least one parsable op (a memory op, DONE or ACTION), ops by
type with their failure rate (an executed op whose result has ok=False), how phases ended; per env
step: ACTION commit rate (PLAN committed an action that the env accepts), fallback rate (PLAN
committed nothing, so the structure's fallback ran), invalid-action rate, redundant writes (the
library's HygieneCounter), tokens and wall seconds.

``--bootstrap_steps N``: before playing, the teacher plays ``--bootstrap_episodes`` training seeds
(disjoint from the eval seeds) with the same structure; its phases become SFT chats
(``teacher_examples`` -> ``build_dataset`` with the model's own tokenizer and chat template), the
model gets N LoRA steps (batch 1) and the merged model plays. What it learns is the teacher's grammar
and habits: the data is the scripted teacher's, not the model's.

Everything lands under ``--out``: ``model/`` and ``teacher/`` (run folders: traces, summary.json),
``bootstrap/`` (teacher traces, train log), ``figures.json`` and ``report.txt`` (what was printed).
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import shutil
import sys
import time
from collections import Counter

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PACKAGED = "pkg:qwen2.5-coder-0.5b-instruct"
# The peer structure when the teacher cannot play the chosen one (its small budgets suit it).
PEER_FALLBACK = "crafter_tiny"
# Below this share of PLAN phases committing a valid action the teacher is not a usable peer.
TEACHER_MIN_COMMIT = 0.5


class Report:
    """Prints and keeps every line, so report.txt is exactly what the console showed."""

    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)


# ---------------------------------------------------------------------------------------------- setup


def load_structure(spec: str):
    from automem_jax.memory.structure import MemoryStructure
    if os.path.isfile(spec):
        return MemoryStructure.load(spec)
    return MemoryStructure.default(spec)


def engine_rows(args) -> int:
    # One request in flight per agent, so more rows than agents at once would sit idle.
    return args.max_batch or min(args.num_envs, args.episodes)


def parse_seeds(text: str) -> list[int]:
    from automem_jax.rollout.runner import _parse_seeds
    return _parse_seeds(text)


def load_policy(checkpoint: str, seed: int):
    """(model, model config, tokenizer, sampling defaults) of a checkpoint, for training in place."""
    from automem_jax.models.tokenizer import load_tokenizer
    if checkpoint.startswith("preset:"):
        from automem_jax.models.qwen import init_model
        from automem_jax.models.qwen_presets import preset
        cfg = preset(checkpoint[len("preset:"):])
        return init_model(cfg, seed=seed), cfg, load_tokenizer(), {}
    from automem_jax.llm.sampling import generation_defaults
    from automem_jax.models import hf
    model, cfg = hf.load_pretrained(checkpoint)
    return model, cfg, load_tokenizer(checkpoint), generation_defaults(checkpoint)


def play(client, structure, run_dir: str, args, seeds: list[int], *, two_model: bool) -> dict:
    """One Runner pass from a clean folder: its summary plus every trace line, in episode order."""
    from automem_jax.rollout.runner import Runner
    shutil.rmtree(run_dir, ignore_errors=True)  # a stale folder would be resumed, not replayed
    runner = Runner(client, structure, run_dir, args.env, num_envs=min(args.num_envs, len(seeds)),
                    max_steps=args.steps, two_model=two_model, progress=False)
    runner.run(seeds)
    return load_played(run_dir, args.env)


def load_played(run_dir: str, env_name: str) -> dict:
    """A played run folder: its summary.json and every trace line, in episode order."""
    from automem_jax.rollout.traces import env_task
    env, task = env_task(env_name)
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    folder = os.path.join(run_dir, "traces", env, task)
    episodes = []
    for path in sorted(glob.glob(os.path.join(folder, "ep_*.jsonl")), key=lambda p: int(p.rsplit("_", 1)[1][:-6])):
        with open(path, encoding="ascii") as f:
            episodes.append([json.loads(raw) for raw in f if raw.strip()])
    return {"summary": summary, "episodes": episodes, "stats": summary["run"]}


# ---------------------------------------------------------------------------------------------- figures


def figures(result: dict, structure) -> dict:
    """Per-phase and per-step figures of one played run, from its trace lines alone."""
    from automem_jax.agent.types import PHASES, PHASE_PLAN
    from automem_jax.memory import ops as ops_mod
    from automem_jax.rollout.traces import HygieneCounter

    lines = [ln for ep in result["episodes"] for ln in ep]
    steps = len(lines)
    keyed, limits = structure.keyed_ops, structure.limits
    out: dict = {"steps": steps, "episodes": len(result["episodes"]), "phases": {}}
    for phase in PHASES:
        vocab = structure.phase_ops(phase)
        f = {"phases": 0, "skipped": 0, "phases_with_op": 0, "replies": 0, "replies_with_op": 0,
             "replies_with_memory_op": 0,
             "model_errors": 0, "ops": Counter(), "ops_failed": Counter(), "end_reasons": Counter(),
             "tokens_in": 0, "tokens_out": 0, "roles": Counter(), "examples_without_op": [],
             "examples_with_op": []}
        for line in lines:
            rec = line.get(phase) or {}
            if rec.get("end_reason") == "skipped":
                f["skipped"] += 1  # LOG at step 0: nothing happened yet
                continue
            f["phases"] += 1
            f["end_reasons"][rec.get("end_reason", "")] += 1
            f["tokens_in"] += int(rec.get("tokens_in", 0))
            f["tokens_out"] += int(rec.get("tokens_out", 0))
            phase_has_op = False
            for turn in rec.get("turns", []):
                f["replies"] += 1
                f["roles"][turn.get("model_role", "")] += 1
                if turn.get("error"):
                    f["model_errors"] += 1
                text = turn.get("response") or ""
                parsed = ops_mod.parse(text, vocab, keyed, order=structure.op_order,
                                       max_action_chars=limits.max_action_chars)
                names = [c.op for c in parsed.calls]
                control = (["DONE"] if parsed.done else []) + (["ACTION"] if parsed.action is not None else [])
                f["ops"].update(names + control)
                f["replies_with_memory_op"] += bool(names)
                f["replies_with_op"] += bool(names or control)
                phase_has_op = phase_has_op or bool(names or control)
                # What ran and failed: the agent's own results of the same parse, kept in the trace.
                for r in turn.get("ops", []):
                    if not r.get("ok", True):
                        f["ops_failed"][r.get("op", "?")] += 1
                bucket = f["examples_with_op"] if names or control else f["examples_without_op"]
                if len(bucket) < 3 and not turn.get("error"):
                    bucket.append(text[:240])
            f["phases_with_op"] += phase_has_op
        for k in ("ops", "ops_failed", "end_reasons", "roles"):
            f[k] = dict(f[k])
        f["parsable_op_rate"] = _rate(f["replies_with_op"], f["replies"])
        f["tokens_in_per_step"] = _rate(f["tokens_in"], steps)
        f["tokens_out_per_step"] = _rate(f["tokens_out"], steps)
        f["op_failure_rate"] = _rate(sum(f["ops_failed"].values()),
                                     sum(n for op, n in f["ops"].items() if op not in ("DONE", "ACTION")))
        out["phases"][phase] = f

    committed = sum(1 for ln in lines if not (ln.get(PHASE_PLAN) or {}).get("fallback"))
    valid_commits = sum(1 for ln in lines
                        if not (ln.get(PHASE_PLAN) or {}).get("fallback") and ln.get("action_valid", True))
    writes = redundant = searches = empty = 0
    for ep in result["episodes"]:
        h = HygieneCounter()  # one per episode: its view of the files restarts with the episode
        for ln in ep:
            h.update(ln)
        writes, redundant = writes + h.writes, redundant + h.redundant_writes
        searches, empty = searches + h.searches, empty + h.empty_searches
    stats = result["stats"]
    out.update(
        action_commits=valid_commits, action_commit_rate=_rate(valid_commits, steps),
        committed_any=committed,
        fallbacks=steps - committed, fallback_rate=_rate(steps - committed, steps),
        invalid_actions=sum(1 for ln in lines if not ln.get("action_valid", True)),
        invalid_action_rate=_rate(sum(1 for ln in lines if not ln.get("action_valid", True)), steps),
        writes=writes, redundant_writes=redundant, redundant_write_rate=_rate(redundant, writes),
        searches=searches, empty_searches=empty,
        tokens_in_per_step=_rate(sum(int(ln.get("tokens_in", 0)) for ln in lines), steps),
        tokens_out_per_step=_rate(sum(int(ln.get("tokens_out", 0)) for ln in lines), steps),
        wall_s=stats.get("wall_s"), generate_s=stats.get("generate_s"), env_s=stats.get("env_s"),
        seconds_per_step=_rate(stats.get("wall_s", 0.0), steps),
        actions=dict(Counter(ln.get("validated_action") for ln in lines)),
        progression=result["summary"].get("average_progress"),
        engine=stats.get("engine"),
    )
    return out


def _rate(n, d):
    return n / d if d else None


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _num(x, fmt: str = ".1f") -> str:
    return "n/a" if x is None else format(x, fmt)


def _ops_text(f: dict) -> str:
    if not f["ops"]:
        return "none"
    parts = []
    for op, n in sorted(f["ops"].items(), key=lambda kv: (-kv[1], kv[0])):
        bad = f["ops_failed"].get(op, 0)
        parts.append(f"{op} {n}" + ("" if op in ("DONE", "ACTION") else f" ({bad} failed)"))
    return ", ".join(parts)


def print_table(say: Report, model: dict, teacher: dict, model_label: str) -> None:
    w = 44
    say(f"{'':{w}s}{model_label:>24s}{'teacher':>24s}")
    for phase, f_m in model["phases"].items():
        f_t = teacher["phases"][phase]
        P = phase.upper()
        rows = [
            (f"{P} phases (skipped)", lambda f: f"{f['phases']} ({f['skipped']})"),
            (f"{P} phases with a parsable op", lambda f: f"{f['phases_with_op']}"),
            (f"{P} replies", lambda f: str(f["replies"])),
            (f"{P} replies with a parsable op",
             lambda f: f"{f['replies_with_op']} ({_pct(f['parsable_op_rate'])})"),
            (f"{P} replies with a memory op", lambda f: f"{f['replies_with_memory_op']}"),
            (f"{P} op failure rate", lambda f: _pct(f["op_failure_rate"])),
            (f"{P} model errors", lambda f: str(f["model_errors"])),
            (f"{P} tokens in / out per env step",
             lambda f: f"{_num(f['tokens_in_per_step'], '.0f')} / {_num(f['tokens_out_per_step'], '.0f')}"),
        ]
        for label, fn in rows:
            say(f"{label:{w}s}{fn(f_m):>24s}{fn(f_t):>24s}")
        for who, f in ((model_label, f_m), ("teacher", f_t)):
            say(f"  {P} ops, {who}: {_ops_text(f)}")
            if len(f["roles"]) > 1:
                say(f"  {P} replies by role, {who}: " + ", ".join(f"{k} {v}" for k, v in sorted(f["roles"].items())))
            say(f"  {P} phase ends, {who}: " + (", ".join(f"{k} {v}" for k, v in sorted(f["end_reasons"].items()))
                                               or "none"))
    step_rows = [
        ("env steps", lambda r: str(r["steps"])),
        ("ACTION commit rate (valid action)", lambda r: f"{r['action_commits']} ({_pct(r['action_commit_rate'])})"),
        ("fallback rate", lambda r: f"{r['fallbacks']} ({_pct(r['fallback_rate'])})"),
        ("invalid-action rate", lambda r: f"{r['invalid_actions']} ({_pct(r['invalid_action_rate'])})"),
        ("redundant writes / writes", lambda r: f"{r['redundant_writes']} / {r['writes']}"),
        ("empty searches / searches", lambda r: f"{r['empty_searches']} / {r['searches']}"),
        ("tokens in / out per env step",
         lambda r: f"{_num(r['tokens_in_per_step'], '.0f')} / {_num(r['tokens_out_per_step'], '.0f')}"),
        ("seconds per env step (wall)", lambda r: _num(r["seconds_per_step"], ".2f")),
        ("progression (mean %)", lambda r: _num(r["progression"], ".2f")),
    ]
    for label, fn in step_rows:
        say(f"{label:{w}s}{fn(model):>24s}{fn(teacher):>24s}")


def print_ratios(say: Report, m: dict, t: dict, label: str) -> None:
    for phase in m["phases"]:
        say(f"parsable-op rate, {phase.upper()}: {label} {_pct(m['phases'][phase]['parsable_op_rate'])} vs "
            f"teacher {_pct(t['phases'][phase]['parsable_op_rate'])}")
    say(f"ACTION commit rate: {label} {_pct(m['action_commit_rate'])} vs teacher {_pct(t['action_commit_rate'])}")
    say(f"fallback rate: {label} {_pct(m['fallback_rate'])} vs teacher {_pct(t['fallback_rate'])}")
    say(f"invalid-action rate: {label} {_pct(m['invalid_action_rate'])} vs teacher {_pct(t['invalid_action_rate'])}")
    say(f"redundant writes: {label} {m['redundant_writes']} of {m['writes']} vs teacher "
        f"{t['redundant_writes']} of {t['writes']}")
    ratio = _rate(m["seconds_per_step"] or 0.0, t["seconds_per_step"] or 0.0)
    say(f"seconds per env step: {label} {_num(m['seconds_per_step'], '.2f')} vs teacher "
        f"{_num(t['seconds_per_step'], '.3f')}" + (f" ({ratio:.0f}x)" if ratio else ""))


# ---------------------------------------------------------------------------------------------- bootstrap


def bootstrap(args, structure, say: Report, eval_seeds: list[int]):
    """Teacher demonstrations -> LoRA SFT -> merged model. Returns (engine, info)."""
    from automem_jax.llm.engine import Engine
    from automem_jax.loops.teacher import TeacherClient, teacher_examples
    from automem_jax.models import lora
    from automem_jax.training.data import DataConfig, build_dataset
    from automem_jax.training.trainer import TrainConfig, Trainer

    seeds = list(range(args.bootstrap_seed, args.bootstrap_seed + args.bootstrap_episodes))
    overlap = sorted(set(seeds) & set(eval_seeds))
    if overlap:
        raise SystemExit(f"--bootstrap_seed: training seeds {overlap} are also eval seeds; pick a disjoint range")
    t0 = time.perf_counter()
    model, mcfg, tok, sampling = load_policy(args.checkpoint, args.seed)
    load_s = time.perf_counter() - t0

    folder = os.path.join(args.out, "bootstrap")
    demo_args = argparse.Namespace(**{**vars(args), "steps": args.bootstrap_max_steps})
    teacher = TeacherClient(seed=args.seed, tokenizer=tok, structure=structure)
    played = play(teacher, structure, os.path.join(folder, "teacher"), demo_args, seeds, two_model=False)
    examples = teacher_examples(os.path.join(folder, "teacher"))
    data = build_dataset(examples, tok, DataConfig(cutoff_len=args.max_len, loss_on="all", seed=args.seed),
                         source="scripted teacher")
    lengths = [it.length for it in data.items]
    info = {"seeds": seeds, "max_steps": args.bootstrap_max_steps, "structure": structure.label,
            "examples": len(data), "example_tokens": [min(lengths), max(lengths)], "manifest": data.manifest,
            "teacher_progression": played["summary"]["average_progress"], "lora_rank": args.lora_rank,
            "lora_targets": args.lora_targets, "lr": args.lr, "load_s": load_s,
            "data_source": "scripted teacher (automem_jax.loops.teacher.TeacherClient)"}
    say(data_line(info))

    tcfg = TrainConfig(mode="lora", lora_rank=args.lora_rank, lora_alpha=2.0 * args.lora_rank,
                       lora_targets=args.lora_targets, learning_rate=args.lr, warmup_ratio=0.1,
                       batch_size=1, grad_accum=1, max_steps=args.bootstrap_steps, log_every=1,
                       target_multiple=64, remat="full", keep=1, seed=args.seed)
    train_dir = os.path.join(folder, "train")
    shutil.rmtree(train_dir, ignore_errors=True)  # a fresh fit, not a resume of an older one
    t0 = time.perf_counter()
    res = Trainer(model, mcfg, tcfg, train_dir, base_ref=args.checkpoint).fit(data)
    info.update(steps=res.steps, losses=[round(r["loss"], 4) for r in res.history], first_loss=res.first_loss,
                last_loss=res.final_loss, train_s=time.perf_counter() - t0)
    say(train_line(info))
    lora.merge_lora(res.model, inplace=True)
    engine = Engine(res.model, tok, max_batch=engine_rows(args), max_len=args.max_len,
                    seed=args.seed, model_name=f"{args.checkpoint}+teacher-lora{res.steps}",
                    sampling_defaults=sampling)
    return engine, info


def data_line(b: dict) -> str:
    seeds = b["seeds"]
    return (f"bootstrap data: the SCRIPTED TEACHER's LOG/PLAN chats ({len(seeds)} episodes x {b['max_steps']} "
            f"steps, seeds {seeds[0]}-{seeds[-1]}, structure {b.get('structure', '?')}): {b['examples']} examples, "
            f"{b['example_tokens'][0]}-{b['example_tokens'][1]} tokens, "
            f"{b['manifest'].get('tokens', {}).get('target', 0)} target tokens; "
            f"teacher progression {b['teacher_progression']:.2f}%")


def train_line(b: dict) -> str:
    losses = b["losses"]
    k = min(3, len(losses))
    # Batch 1 makes single steps noisy (each is one example): the 3-step means say more.
    return (f"bootstrap LoRA (rank {b['lora_rank']}, {b['lora_targets']}, lr {b['lr']:g}, batch 1): {b['steps']} "
            f"steps in {b['train_s']:.0f} s; training loss first {b['first_loss']:.3f} -> last {b['last_loss']:.3f}, "
            f"mean of first {k} {sum(losses[:k]) / k:.3f} -> last {k} {sum(losses[-k:]) / k:.3f} "
            f"(per step: {losses})")


# ---------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=PACKAGED, help="pkg:<name>, preset:<name>, a HF folder or a .gguf file")
    ap.add_argument("--env", default="crafter", help="crafter (the original game) or craftax")
    ap.add_argument("--structure", default="crafter",
                    help="a default's name (crafter, crafter_tiny) or a YAML/JSON file")
    ap.add_argument("--episodes", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="env steps per episode")
    ap.add_argument("--seeds", default=None, help="eval seeds, '42-45' or '1,5,9' (default: 42 on, one per episode)")
    ap.add_argument("--num_envs", type=int, default=8, help="episodes played at once")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--max_tokens", type=int, default=256, help="cap on tokens per model reply")
    ap.add_argument("--max_len", type=int, default=4096, help="engine context (prompt + reply)")
    ap.add_argument("--max_batch", type=int, default=0, help="engine rows (0: as many as episodes at once)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--two_model", default=None, metavar="SPECIALIST",
                    help="checkpoint of a memory specialist: it runs LOG and the PLAN lookups, --checkpoint "
                         "commits actions")
    ap.add_argument("--bootstrap_steps", type=int, default=0,
                    help="LoRA steps of --checkpoint on teacher demonstrations before playing (0: none)")
    ap.add_argument("--bootstrap_episodes", type=int, default=4)
    ap.add_argument("--bootstrap_max_steps", type=int, default=6, help="env steps per teacher demonstration episode")
    ap.add_argument("--bootstrap_seed", type=int, default=1000, help="first training seed (disjoint from eval seeds)")
    ap.add_argument("--lora_rank", type=int, default=16)
    ap.add_argument("--lora_targets", default="ALL", help="ATTN | QV | MLP | ALL | 'q,v,down'")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--out", default="runs/bench_real_agent")
    ap.add_argument("--rescore", action="store_true",
                    help="play nothing: recompute and print the figures from the traces already under --out")
    args = ap.parse_args(argv)
    if args.episodes < 1 or args.steps < 1:
        ap.error("--episodes and --steps must be >= 1")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("automem_jax.training.trainer").setLevel(logging.INFO)  # one line per LoRA step

    from automem_jax.llm.client import EngineClient, RouterClient, load_engine
    from automem_jax.loops.teacher import TeacherClient
    from automem_jax.models.tokenizer import load_tokenizer

    os.makedirs(args.out, exist_ok=True)
    old = None
    if args.rescore:  # the settings the traces were played with, not this command line's
        with open(os.path.join(args.out, "figures.json")) as f:
            old = json.load(f)
        args = argparse.Namespace(**{**old["args"], "out": args.out, "rescore": True})
    say = Report()
    t_start = time.perf_counter()
    structure = load_structure(args.structure)
    seeds = parse_seeds(args.seeds) if args.seeds else list(range(42, 42 + args.episodes))
    if len(seeds) != args.episodes:
        ap.error(f"--seeds lists {len(seeds)} seeds for --episodes {args.episodes}")
    two = args.two_model is not None
    pair = f" (policy) + {args.two_model} (memory specialist)" if two else ""
    say(f"real agent bench: {args.checkpoint}{pair}; "
        f"env {args.env}, structure {structure.label}, {args.episodes} episodes x {args.steps} steps "
        f"(seeds {seeds[0]}-{seeds[-1]}), temperature {args.temperature}, max_tokens {args.max_tokens}, "
        f"max_len {args.max_len}; budgets {structure.budgets}")

    if old is not None:
        peer_structure = load_structure(PEER_FALLBACK) if old["peer_note"] else structure
        teacher = figures(load_played(os.path.join(args.out, "teacher"), args.env), peer_structure)
        model = figures(load_played(os.path.join(args.out, "model"), args.env), structure)
        say(f"(rescored from the traces under {args.out}; no episode was played again)")
        if old["peer_note"]:
            say("NOTE: " + old["peer_note"])
        if old.get("bootstrap"):
            old["bootstrap"].setdefault("structure", old["structure"])
            say(data_line(old["bootstrap"]))
            say(train_line(old["bootstrap"]))
        finish(say, args, structure, peer_structure, old["peer_note"], old["model_label"], model, teacher,
               old.get("bootstrap"), seeds, t_start - old.get("total_s", 0.0))
        return 0

    # The peer first: it is fast, and it tells whether the teacher can play this structure at all.
    tok = load_tokenizer(None if args.checkpoint.startswith("preset:") else args.checkpoint)
    peer_structure, peer_note = structure, ""
    teacher_run = play(TeacherClient(seed=args.seed, tokenizer=tok, structure=structure), structure,
                       os.path.join(args.out, "teacher"), args, seeds, two_model=two)
    teacher = figures(teacher_run, structure)
    if (teacher["action_commit_rate"] or 0.0) < TEACHER_MIN_COMMIT:
        peer_note = (f"the scripted teacher cannot drive {structure.label} (it committed a valid action on "
                     f"{_pct(teacher['action_commit_rate'])} of steps), so the peer plays {PEER_FALLBACK}: the "
                     f"same game and op grammar with the small budgets the teacher was written against")
        say("NOTE: " + peer_note)
        peer_structure = load_structure(PEER_FALLBACK)
        teacher_run = play(TeacherClient(seed=args.seed, tokenizer=tok, structure=peer_structure), peer_structure,
                           os.path.join(args.out, "teacher"), args, seeds, two_model=two)
        teacher = figures(teacher_run, peer_structure)

    boot = None
    if args.bootstrap_steps > 0:
        engine, boot = bootstrap(args, structure, say, seeds)
        label = "model+bootstrap"
    else:
        t0 = time.perf_counter()
        engine = load_engine(args.checkpoint, max_batch=engine_rows(args),
                             max_len=args.max_len, seed=args.seed)
        say(f"model loaded in {time.perf_counter() - t0:.0f} s")
        label = "model"
    client = EngineClient(engine, temperature=args.temperature, max_tokens=args.max_tokens, seed=None)
    if two:
        label = "two-model" + label[len("model"):]
        specialist = load_engine(args.two_model, max_batch=engine_rows(args),
                                 max_len=args.max_len, seed=args.seed)
        client = RouterClient(memory=EngineClient(specialist, temperature=args.temperature,
                                                  max_tokens=args.max_tokens), gameplay=client)
    model_run = play(client, structure, os.path.join(args.out, "model"), args, seeds, two_model=two)
    model = figures(model_run, structure)
    finish(say, args, structure, peer_structure, peer_note, label, model, teacher, boot, seeds, t_start)
    return 0


def finish(say: Report, args, structure, peer_structure, peer_note: str, label: str, model: dict, teacher: dict,
           boot: dict | None, seeds: list[int], t_start: float) -> None:
    """Prints the comparison and writes figures.json and report.txt."""
    say()
    say(f"figures ({label}: {args.checkpoint}; teacher: scripted TeacherClient, same seeds and steps"
        f"{', structure ' + peer_structure.label if peer_note else ''}):")
    print_table(say, model, teacher, label)
    say()
    print_ratios(say, model, teacher, label)
    for phase in model["phases"]:
        shown = model["phases"][phase]["examples_without_op"][:2]
        for text in shown:
            say(f"{label} {phase.upper()} reply without a parsable op: {text[:160]!r}")
    if boot:
        say(f"bootstrap: the warm-start data is the scripted teacher's demonstrations, so the model is "
            f"trained to imitate the teacher's op grammar and habits; training loss {boot['first_loss']:.3f} -> "
            f"{boot['last_loss']:.3f} over {boot['steps']} LoRA steps ({boot['train_s']:.0f} s)")
    eng = model.get("engine") or {}
    say(f"{label} wall time {model['wall_s']:.0f} s over {model['steps']} env steps (generation "
        f"{model['generate_s']:.0f} s, env {model['env_s']:.1f} s; includes JIT compilation"
        f"{', ' + str(eng.get('compiles')) + ' compiles' if eng.get('compiles') is not None else ''}); "
        f"total bench time {time.perf_counter() - t_start:.0f} s")

    doc = {"args": vars(args), "structure": structure.label, "peer_structure": peer_structure.label,
           "peer_note": peer_note, "seeds": seeds, "model_label": label, "model": model, "teacher": teacher,
           "bootstrap": boot, "total_s": time.perf_counter() - t_start}
    with open(os.path.join(args.out, "figures.json"), "w") as f:
        json.dump(doc, f, indent=2, default=str)
    with open(os.path.join(args.out, "report.txt"), "w") as f:
        f.write("\n".join(say.lines) + "\n")
    print(f"-> {os.path.join(args.out, 'figures.json')}, {os.path.join(args.out, 'report.txt')}")


if __name__ == "__main__":
    sys.exit(main())
