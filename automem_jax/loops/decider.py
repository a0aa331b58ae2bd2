"""Loop 2's decider: what the next iteration changes, chosen from the ledger of the earlier ones.

Before every iteration after the first, the ledger rows so far (progression ± SE, examples,
phase/decision counts, losses, the choices made) go to the critic, which picks one option per
knob from a bounded menu:

    data       reuse (train on the previous iteration's dataset) | regenerate (a new dataset)
    judge      lenient | default | strict        (regenerate only: the judge that selects it)
    top_pct    one of loop2.decider.top_pcts     (regenerate only: the episode filter)
    lr_scale, epochs_scale, lora_rank            (the training recipe, from the config's lists)

A regenerated dataset always differs from the ones before it: another judge level, another
episode filter, or (when the loop2.max_examples cap cut the last one) a new sample seed. When the
critic is offline (heuristic) or its reply is not exactly the JSON object asked for, a fixed rule
decides instead (``fallback``) and the row records why. Every choice lands in the ledger row's
``decision``: {by: initial|critic|fallback, data, dataset_from, dataset_dir, judge, top_pct,
sample_seed, recipe, rationale, invalid_reply?, adjusted?}.
"""
from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["JUDGE_LEVELS", "DATA_ACTIONS", "DecisionError", "Options", "Decider", "StrictnessJudge",
           "fallback", "parse_reply", "decision_of", "apply_recipe", "parse_list"]

JUDGE_LEVELS = ("lenient", "default", "strict")
DATA_ACTIONS = ("reuse", "regenerate")
REPLY_KEYS = ("data", "judge", "top_pct", "lr_scale", "epochs_scale", "lora_rank", "rationale")

# Added to an LLM judge's instructions; "default" leaves them as they are.
JUDGE_NOTES = {
    "lenient": ("\nStrictness for this round: LENIENT. Too few examples were accepted last time. Accept a phase "
                "whose memory commands are sound and useful even if not ideal; reject only clear mistakes "
                "(invented facts, duplicates of stored lines, broken command syntax, purposeless lookups).\n"),
    "strict": ("\nStrictness for this round: STRICT. Accept only phases that are exemplary: every note new, "
               "specific and correct, every lookup targeted and fruitful, nothing written past the final "
               "terminator. When in doubt, reject.\n"),
}
# Post-process edits that mean the model wrote past its terminator: a strict judge drops them.
SLOPPY_EDITS = ("done_cut", "tail_trimmed")


class DecisionError(ValueError):
    """A critic reply that is not the decision object asked for."""


def parse_list(text: Any, kind: type = float) -> tuple:
    """'0.5,1,2' (or a number, or a list) -> a tuple of ``kind``; '' -> ()."""
    if isinstance(text, (list, tuple)):
        items = list(text)
    else:
        items = [p for p in str(text if text is not None else "").replace(" ", "").split(",") if p]
    out = []
    for p in items:
        v = float(p)
        if kind is int:
            if v != int(v):
                raise ValueError(f"{p!r} is not an integer")
            v = int(v)
        out.append(v)
    return tuple(out)


def _num_eq(a, b) -> bool:
    try:
        return abs(float(a) - float(b)) < 1e-9
    except (TypeError, ValueError):
        return False


@dataclass(frozen=True)
class Options:
    """The bounded menu. The configured values (scale 1, train.lora_rank, loop2.top_pct) are
    always among the choices and form iteration 0's recipe."""

    lora_rank: int = 8
    top_pct: float = 100.0
    min_examples: int = 0
    max_examples: int = 0
    sample_seed: int = 0
    lr_scales: tuple = (0.5, 1.0, 2.0)
    epochs_scales: tuple = (1.0,)
    lora_ranks: tuple = ()
    top_pcts: tuple = (100.0,)
    judges: tuple = JUDGE_LEVELS

    def __post_init__(self):
        # Normalise: configured values first, duplicates dropped, order kept.
        def uniq(xs, first):
            out = [first]
            for x in xs:
                if not any(_num_eq(x, y) for y in out):
                    out.append(x)
            return tuple(out)
        object.__setattr__(self, "lr_scales", uniq(self.lr_scales, 1.0))
        object.__setattr__(self, "epochs_scales", uniq(self.epochs_scales, 1.0))
        object.__setattr__(self, "lora_ranks", tuple(int(r) for r in uniq(self.lora_ranks, int(self.lora_rank))))
        object.__setattr__(self, "top_pcts", uniq(self.top_pcts, float(self.top_pct)))
        for name in ("lr_scales", "epochs_scales"):
            if any(not v > 0 for v in getattr(self, name)):
                raise ValueError(f"decider {name} must all be > 0, got {getattr(self, name)}")
        if any(r < 1 for r in self.lora_ranks):
            raise ValueError(f"decider lora_ranks must all be >= 1, got {self.lora_ranks}")
        if any(not 0 < p <= 100 for p in self.top_pcts):
            raise ValueError(f"decider top_pcts must be in (0, 100], got {self.top_pcts}")

    @classmethod
    def from_config(cls, loop2, lora_rank: int) -> "Options":
        d = loop2.get("decider") or {}
        return cls(lora_rank=int(lora_rank), top_pct=float(loop2.top_pct), min_examples=int(loop2.min_examples),
                   max_examples=int(loop2.get("max_examples", 0) or 0), sample_seed=int(loop2.get("sample_seed", 0)),
                   lr_scales=parse_list(d.get("lr_scales", "1")), epochs_scales=parse_list(d.get("epochs_scales", "1")),
                   lora_ranks=parse_list(d.get("lora_ranks", ""), int), top_pcts=parse_list(d.get("top_pcts", "")))

    def base_recipe(self) -> dict:
        return {"lr_scale": 1.0, "epochs_scale": 1.0, "lora_rank": self.lora_ranks[0]}

    def recipes(self) -> list[dict]:
        """The recipe menu in the order the fallback tries it: the configured one, then one knob at a time."""
        base = self.base_recipe()
        out = [base]
        for key, values in (("lr_scale", self.lr_scales), ("epochs_scale", self.epochs_scales),
                            ("lora_rank", self.lora_ranks)):
            out += [{**base, key: v} for v in values[1:]]
        return out

    def initial(self) -> dict:
        return {"by": "initial", "data": "regenerate", "dataset_from": None, "judge": "default",
                "top_pct": self.top_pct, "sample_seed": self.sample_seed, "recipe": self.base_recipe(),
                "rationale": "first iteration: the configured judge, episode filter and recipe"}

    def menu(self) -> dict:
        return {"data": list(DATA_ACTIONS), "judge": list(self.judges), "top_pct": list(self.top_pcts),
                "lr_scale": list(self.lr_scales), "epochs_scale": list(self.epochs_scales),
                "lora_rank": list(self.lora_ranks)}


# ----------------------------------------------------------------------------- reading the ledger

def decision_of(row: Mapping, opts: Options) -> dict:
    """A ledger row's choices; rows written before the decider existed read as the initial choice."""
    d = row.get("decision") if isinstance(row.get("decision"), Mapping) else {}
    base = opts.initial()
    recipe = {**base["recipe"], **(d.get("recipe") or {})}
    cfg = row.get("config") or {}
    return {"judge": d.get("judge", "default"), "top_pct": float(d.get("top_pct", cfg.get("top_pct", opts.top_pct))),
            "sample_seed": d.get("sample_seed", opts.sample_seed), "recipe": recipe}


def _mean(row: Mapping) -> float:
    v = row.get("progression_mean")
    return float(v) if isinstance(v, (int, float)) else float("-inf")


def _best(history: Sequence[Mapping]) -> Mapping:
    # Highest progression; ties go to the earlier iteration (as launch.stages.best_iteration would
    # break them by hygiene, but the decider only needs a stable anchor).
    return max(reversed(list(history)), key=_mean)


def _capped(row: Mapping) -> bool:
    acc = row.get("n_accepted")
    return isinstance(acc, int) and acc > int(row.get("n_examples") or 0)


def _step(level: str, by: int) -> str:
    i = JUDGE_LEVELS.index(level) if level in JUDGE_LEVELS else 1
    return JUDGE_LEVELS[min(max(i + by, 0), len(JUDGE_LEVELS) - 1)]


def _same_recipe(a: Mapping, b: Mapping) -> bool:
    return all(_num_eq(a.get(k), b.get(k)) for k in ("lr_scale", "epochs_scale", "lora_rank"))


def _fmt_row(r: Mapping) -> str:
    se = r.get("progression_se")
    return f"{_mean(r):.2f}" + (f" ± {se:.2f}" if isinstance(se, (int, float)) else "")


# ----------------------------------------------------------------------------- the offline rule

def fallback(history: Sequence[Mapping], opts: Options) -> dict:
    """The deterministic choice: (1) too few examples last time -> relax the judge and the episode
    filter; (2) progression fell below the best iteration -> the best one's recipe with a stricter
    judge; (3) otherwise keep data and judge and try the next recipe not tried yet."""
    last = history[-1]
    ld = decision_of(last, opts)
    best = _best(history)
    bd = decision_of(best, opts)
    n = int(last.get("n_examples") or 0)
    top_max = max(opts.top_pcts)
    tried = [decision_of(r, opts)["recipe"] for r in history]
    untried = [r for r in opts.recipes() if not any(_same_recipe(r, t) for t in tried)]
    it_l, it_b = last.get("iteration"), best.get("iteration")

    if n < opts.min_examples and (ld["judge"] != "lenient" or ld["top_pct"] < top_max):
        judge = _step(ld["judge"], -1)
        return {"data": "regenerate", "judge": judge, "top_pct": top_max, "recipe": dict(ld["recipe"]),
                "rationale": (f"iteration {it_l} kept {n} examples, fewer than min_examples={opts.min_examples}: "
                              f"relax the judge ({ld['judge']} -> {judge}) and the episode filter "
                              f"(top {ld['top_pct']:g}% -> {top_max:g}%), same recipe")}
    if best is not last and _mean(last) < _mean(best):
        judge = _step(bd["judge"], +1)
        top = bd["top_pct"]
        why = (f"progression fell: iteration {it_l} {_fmt_row(last)} is below the best, iteration {it_b} "
               f"{_fmt_row(best)}; back to its recipe with a stricter judge ({bd['judge']} -> {judge})")
        if judge == bd["judge"]:
            # Already strict: a tighter episode filter is the next lever, if the menu has one.
            lower = sorted(p for p in opts.top_pcts if p < top)
            if lower:
                top = lower[-1]
                why += f" (already strict: episode filter top {bd['top_pct']:g}% -> {top:g}%)"
            else:
                why += " (already strict, filter at its tightest: a fresh sample)"
        return {"data": "regenerate", "judge": judge, "top_pct": top, "recipe": dict(bd["recipe"]), "rationale": why}
    recipe = untried[0] if untried else dict(bd["recipe"])
    data = "regenerate" if _capped(last) else "reuse"
    why = (f"progression held or rose (iteration {it_l}: {_fmt_row(last)}, {n} examples): keep the judge and "
           + ("try the next recipe" if untried else "every recipe is tried, so back to the best one's")
           + (", on a fresh stratified sample (the cap cut the last dataset)" if data == "regenerate"
              else ", on the same dataset"))
    return {"data": data, "judge": ld["judge"], "top_pct": ld["top_pct"], "recipe": dict(recipe), "rationale": why}


# ----------------------------------------------------------------------------- the critic

PROMPT = """\
You steer the training loop of a game-playing agent's memory specialist. Each iteration selects \
fine-tuning examples from a fixed set of game traces (a judge accepts or rejects every memory phase; \
at most {max_examples} accepted examples are kept by a stratified sample), trains a LoRA adapter on \
them and measures game progression on fixed evaluation seeds. Choose what iteration {iteration} changes.

Iterations so far (one JSON object each):
{rows}

Settings: min_examples={min_examples} (fewer makes training unreliable), max_examples={max_examples} \
(0 = no cap). The knobs and their allowed values:
- data: "reuse" trains on iteration {prev}'s dataset again (judge and top_pct then stay as they were); \
"regenerate" selects a new dataset with the judge and top_pct below (and a new sample when the cap applies).
- judge: how strict the judge is when regenerating: {judges}.
- top_pct: keep only candidates from the best X% of episodes: {top_pcts}.
- lr_scale: learning-rate multiplier: {lr_scales}.
- epochs_scale: multiplier of the training length: {epochs_scales}.
- lora_rank: adapter rank: {lora_ranks}.

Reply with one JSON object and nothing else, every key present, each value exactly one of the allowed values:
{{"data": ..., "judge": ..., "top_pct": ..., "lr_scale": ..., "epochs_scale": ..., "lora_rank": ..., \
"rationale": "<one or two sentences citing the numbers above>"}}
"""


def _row_digest(r: Mapping, opts: Options) -> dict:
    d = decision_of(r, opts)
    train = r.get("train") or {}
    counts = r.get("counts") or {}
    return {"iteration": r.get("iteration"), "progression_mean": r.get("progression_mean"),
            "progression_se": r.get("progression_se"), "n_examples": r.get("n_examples"),
            "n_accepted": r.get("n_accepted"), "n_candidates": r.get("n_candidates"),
            "by_phase": counts.get("by_phase"), "by_decision": counts.get("by_decision"),
            "first_loss": train.get("first_loss"), "final_loss": train.get("final_loss"),
            "train_steps": train.get("steps"), "judge": d["judge"], "top_pct": d["top_pct"], "recipe": d["recipe"],
            "data": (r.get("decision") or {}).get("data"), "redundant_write_rate": (r.get("hygiene") or {}).get(
                "redundant_write_rate"), "config": r.get("config")}


def build_prompt(history: Sequence[Mapping], iteration: int, opts: Options) -> str:
    m = opts.menu()
    return PROMPT.format(
        iteration=iteration, prev=history[-1].get("iteration"), min_examples=opts.min_examples,
        max_examples=opts.max_examples, rows="\n".join(json.dumps(_row_digest(r, opts), default=str) for r in history),
        judges=", ".join(f'"{j}"' for j in m["judge"]), top_pcts=", ".join(f"{v:g}" for v in m["top_pct"]),
        lr_scales=", ".join(f"{v:g}" for v in m["lr_scale"]),
        epochs_scales=", ".join(f"{v:g}" for v in m["epochs_scale"]),
        lora_ranks=", ".join(str(v) for v in m["lora_rank"]))


_FENCE = re.compile(r"\A```(?:json)?\s*\n(.*)\n\s*```\Z", re.DOTALL | re.IGNORECASE)


def parse_reply(text: str, opts: Options) -> dict:
    """The critic's choice, or DecisionError. Strict: one JSON object (optionally the whole reply
    in one ```json fence), exactly the asked keys, every value from the menu."""
    body = (text or "").strip()
    m = _FENCE.match(body)
    if m:
        body = m.group(1).strip()
    if not body:
        raise DecisionError("empty reply")
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        raise DecisionError(f"not a JSON object: {e}") from None
    if not isinstance(obj, dict):
        raise DecisionError(f"expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in REPLY_KEYS if k not in obj]
    extra = sorted(set(obj) - set(REPLY_KEYS))
    if missing or extra:
        raise DecisionError(f"keys: missing {missing}, unexpected {extra}")
    menu = opts.menu()
    out: dict[str, Any] = {}
    for key in ("data", "judge"):
        if obj[key] not in menu[key]:
            raise DecisionError(f"{key}={obj[key]!r} is not one of {menu[key]}")
        out[key] = obj[key]
    for key in ("top_pct", "lr_scale", "epochs_scale", "lora_rank"):
        v = obj[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise DecisionError(f"{key}={v!r} is not a number")
        hit = [x for x in menu[key] if _num_eq(x, v)]
        if not hit:
            raise DecisionError(f"{key}={v!r} is not one of {menu[key]}")
        out[key] = hit[0]
    if not isinstance(obj["rationale"], str) or not obj["rationale"].strip():
        raise DecisionError("rationale must be a non-empty string")
    return {"data": out["data"], "judge": out["judge"], "top_pct": out["top_pct"],
            "recipe": {"lr_scale": out["lr_scale"], "epochs_scale": out["epochs_scale"], "lora_rank": out["lora_rank"]},
            "rationale": obj["rationale"].strip()}


def _reply_text(reply) -> str:
    content = getattr(reply, "content", reply)
    if isinstance(content, Mapping):
        content = content.get("content")
    return content if isinstance(content, str) else ""


@dataclass
class Decider:
    """Chooses each iteration's options. ``chat``: a critic client's ``chat(messages)`` (None: the
    fallback rule decides every time)."""

    opts: Options
    chat: Callable[[list[dict]], Any] | None = None
    offline_reason: str = "the critic is offline (heuristic)"
    calls: list = field(default_factory=list)

    def decide(self, history: Sequence[Mapping], iteration: int) -> dict:
        history = [r for r in history if isinstance(r.get("iteration"), int) and r["iteration"] < iteration]
        history.sort(key=lambda r: r["iteration"])
        if not history:
            return {**self.opts.initial(), "iteration": iteration}
        extra: dict[str, Any] = {}
        choice = None
        if self.chat is None:
            extra["critic"] = self.offline_reason
        else:
            try:
                reply = self.chat([{"role": "user", "content": build_prompt(history, iteration, self.opts)}])
                self.calls.append(iteration)
                choice = parse_reply(_reply_text(reply), self.opts)
            except DecisionError as e:
                extra["invalid_reply"] = str(e)
                log.warning("loop2 decider: the critic's reply is unusable (%s); the fallback rule decides", e)
            except Exception as e:  # noqa: BLE001 - a failed critic call must not stop the loop
                extra["invalid_reply"] = f"critic call failed: {type(e).__name__}: {e}"
                log.warning("loop2 decider: critic call failed (%s); the fallback rule decides", e)
        by = "critic" if choice is not None else "fallback"
        if choice is None:
            choice = fallback(history, self.opts)
        return {"by": by, "iteration": iteration, **self._finish(choice, history, iteration), **extra}

    def _finish(self, choice: dict, history: Sequence[Mapping], iteration: int) -> dict:
        """Resolve the dataset: which folder a reuse trains on; a regenerate that would rebuild an
        existing dataset (same judge and filter, no cap cut) reuses that one instead."""
        opts = self.opts
        adjusted = []
        prev = history[-1]
        pd = decision_of(prev, opts)
        out = {**choice, "recipe": dict(choice["recipe"])}
        if out["data"] == "reuse":
            if out["judge"] != pd["judge"] or not _num_eq(out["top_pct"], pd["top_pct"]):
                adjusted.append(f"reuse keeps iteration {prev.get('iteration')}'s judge ({pd['judge']}) and "
                                f"top_pct ({pd['top_pct']:g}); the reply's {out['judge']}/{out['top_pct']:g} "
                                "are unused")
            out.update(judge=pd["judge"], top_pct=pd["top_pct"], sample_seed=pd["sample_seed"],
                       dataset_from=prev.get("dataset_version", prev.get("iteration")),
                       dataset_dir=prev.get("dataset_dir"))
        else:
            out.update(sample_seed=opts.sample_seed + iteration, dataset_from=None, dataset_dir=None)
            for r in reversed(list(history)):
                rd = decision_of(r, opts)
                if rd["judge"] == out["judge"] and _num_eq(rd["top_pct"], out["top_pct"]) and not _capped(r):
                    adjusted.append(f"regenerate would rebuild iteration {r.get('iteration')}'s dataset (same judge "
                                    "and filter, no cap cut): reused instead")
                    out.update(data="reuse", sample_seed=rd["sample_seed"], dataset_dir=r.get("dataset_dir"),
                               dataset_from=r.get("dataset_version", r.get("iteration")))
                    break
        if adjusted:
            out["adjusted"] = adjusted
        return out

    def judge(self, judge, level: str):
        """``judge`` at ``level``: itself for default, else wrapped."""
        return judge if level == "default" else StrictnessJudge(judge, level)


# ----------------------------------------------------------------------------- judge strictness

class StrictnessJudge:
    """A judge at another strictness. An LLM judge gets a note added to its instructions (a judge
    with an ``instructions`` string: that string; a critic with a chat ``client``: Loop 2's
    LLMJudge over that client). A strict judge also rejects any accepted phase with a redundant
    write, an empty search or a reply that ran past its terminator, so it bites on the heuristic
    judge as well."""

    def __init__(self, inner, level: str):
        if level not in JUDGE_LEVELS:
            raise ValueError(f"judge level {level!r}: expected one of {JUDGE_LEVELS}")
        self.inner, self.level = inner, level
        note = JUDGE_NOTES.get(level, "")
        self._judge = inner
        if note and isinstance(getattr(inner, "instructions", None), str):
            self._judge = copy.copy(inner)
            self._judge.instructions = inner.instructions + note
        elif note and callable(getattr(getattr(inner, "client", None), "chat", None)):
            from automem_jax.loops.judging import DEFAULT_JUDGE_INSTRUCTIONS, LLMJudge
            self._judge = LLMJudge(inner.client, DEFAULT_JUDGE_INSTRUCTIONS + note)

    def judge(self, batch: list[dict]) -> list[dict]:
        out = self._judge.judge(batch)
        if self.level != "strict" or not isinstance(out, list):
            return out
        by_id = {c["id"]: c for c in batch}
        strict = []
        for d in out:
            c = by_id.get(d.get("id")) if isinstance(d, Mapping) else None
            if c is not None and str(d.get("decision", "")).strip().lower() == "accept":
                flaws = [f"{k.replace('_', ' ')} {c[k]}" for k in ("redundant_writes", "empty_searches")
                         if int(c.get(k) or 0) > 0]
                flaws += [f"edit {e}" for e in c.get("edits") or [] if e in SLOPPY_EDITS]
                if flaws:
                    d = {**d, "decision": "reject", "reason": "strict: " + ", ".join(flaws)}
            strict.append(d)
        return strict


# ----------------------------------------------------------------------------- the recipe

def apply_recipe(train: Mapping, recipe: Mapping | None) -> dict:
    """A train-config dict with the recipe applied: learning rate and length scaled, LoRA rank set
    (alpha keeps its ratio to the rank)."""
    out = dict(train)
    if not recipe:
        return out
    out["learning_rate"] = float(out["learning_rate"]) * float(recipe.get("lr_scale", 1.0))
    scale = float(recipe.get("epochs_scale", 1.0))
    if int(out.get("max_steps") or 0) > 0:
        out["max_steps"] = max(1, round(int(out["max_steps"]) * scale))
    out["epochs"] = float(out["epochs"]) * scale
    rank = recipe.get("lora_rank")
    if rank and int(rank) != int(out["lora_rank"]):
        out["lora_alpha"] = float(out["lora_alpha"]) * int(rank) / int(out["lora_rank"])
        out["lora_rank"] = int(rank)
    return out
