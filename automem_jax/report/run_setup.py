"""The report's "Run setup" block (model, base policy, who collected Loop 2's traces, critic,
judge, bootstrap, seeds) and the provenance note that says what the result can mean."""
from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping, Sequence

from automem_jax.report.markdown import FLAG, missing
from automem_jax.report.metrics import num
from automem_jax.report.reading import NOT_RECORDED, Reader, setting, recorded


def collect_policy(config: Mapping | None, results: Mapping[str, dict]) -> tuple[str | None, str]:
    """Who played Loop 2's training traces, and where that was read: config.json, else the collect
    stage's result (it records the policy it ran with)."""
    p = setting(config, "collect.policy")
    if p:
        return str(p), ""
    p = (results.get("collect") or {}).get("policy")
    return (str(p), "stages/collect/result.json") if p else (None, "")


def critic_desc(config: Mapping | None) -> str:
    kind = setting(config, "critic.kind")
    if kind is None:
        return NOT_RECORDED
    if kind == "heuristic":
        return "`heuristic` (offline, rule-based; no LLM)"
    tools = setting(config, "critic.use_tools")
    model, url = recorded(setting(config, "critic.model")), recorded(setting(config, "critic.base_url"))
    return (f"`{kind}`: model `{model}` at `{url}`"
            + ("" if tools is None else f", tool calls {'on' if tools else 'off (trace digest)'}"))


def judge_desc(config: Mapping | None) -> str:
    """The judge Loop 2 really used: launch.stages._judge takes the heuristic critic when either
    loop2.judge or critic.kind says heuristic, so the config's loop2.judge alone can mislead."""
    judge, kind = setting(config, "loop2.judge"), setting(config, "critic.kind")
    if judge is None:
        return NOT_RECORDED
    if judge == "heuristic":
        return "`heuristic` (offline, rule-based; no LLM)"
    if judge == "critic" and kind == "heuristic":
        return "`heuristic` (offline, rule-based; loop2.judge=critic and critic.kind=heuristic)"
    if judge == "critic":
        return "the Loop-1 critic, " + critic_desc(config)
    return f"`{judge}`"


def _bootstrap_desc(config: Mapping | None, result: Mapping | None) -> str:
    enabled = setting(config, "bootstrap.enabled")
    if enabled is None:
        return NOT_RECORDED
    if not enabled:
        return "off (the base policy is the model as loaded)"
    rw, ur = setting(config, "bootstrap.redundant_write_rate"), setting(config, "bootstrap.useless_read_rate")
    mode = setting(config, "bootstrap.train.mode")
    max_steps, epochs = setting(config, "bootstrap.train.max_steps"), setting(config, "bootstrap.train.epochs")
    if num(max_steps):
        length = f"max_steps {num(max_steps):g}"
    elif num(epochs) is not None:
        length = f"{num(epochs):g} epoch(s)"
    else:
        length = f"length {NOT_RECORDED}"
    text = (f"on: {recorded(mode)} fine-tune on the scripted teacher's Craftax traces (seeds "
            f"{recorded(setting(config, 'bootstrap.seeds'))}, "
            f"{recorded(setting(config, 'bootstrap.max_steps'))} steps each; "
            f"planted redundant-write rate {recorded(rw)}, useless-read rate {recorded(ur)}); configured {length}")
    train = (result or {}).get("train") if isinstance((result or {}).get("train"), Mapping) else {}
    steps, examples = num(train.get("steps")), num((result or {}).get("examples"))
    if steps is not None:
        text += f"; ran {steps:.0f} step(s)" + (f" on {examples:.0f} example(s)" if examples is not None else "")
    else:
        text += f"; steps run: {NOT_RECORDED}"
    return text


def setup_section(reader: Reader, config: Mapping | None, config_why: str, results: Mapping[str, dict]) -> list[str]:
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    out = ["# AutoMem run report", "", f"- workdir: `{reader.workdir}`", f"- generated: {now}", "", "## Run setup", ""]
    if config is None:
        out += [missing("Run configuration", config_why), ""]
    policy, policy_src = collect_policy(config, results)
    ckpt, preset = setting(config, "model.checkpoint"), setting(config, "model.preset")
    if ckpt:
        model = f"checkpoint `{ckpt}`"
    elif preset:
        model = (f"preset `{preset}`, random init" if ckpt == ""
                 else f"preset `{preset}` (model.checkpoint {NOT_RECORDED})")
    else:
        model = NOT_RECORDED
    enabled = setting(config, "bootstrap.enabled")
    base = (NOT_RECORDED if enabled is None else
            "`bootstrap/model`: the model above after the bootstrap fine-tune" if enabled else "the model above")
    if policy == "teacher":
        collect = ("`teacher`: the scripted teacher (automem_jax/loops/teacher.py), not the base policy, played "
                   "the traces Loop 2 mines")
    elif policy == "base":
        collect = "`base`: the base policy played the traces Loop 2 mines (upstream's setting)"
    else:
        collect = f"`{policy}`" if policy else NOT_RECORDED
    if policy_src:
        collect += f" (from {policy_src})"
    episodes = setting(config, "collect.episodes")
    if policy and episodes is not None:
        collect += f"; {episodes} episode(s)"
    critic = critic_desc(config)
    revisions, accept = setting(config, "loop1.revisions"), setting(config, "loop1.accept")
    if critic != NOT_RECORDED and (revisions is not None or accept is not None):
        critic += f"; {recorded(revisions)} revision(s), {recorded(accept)} acceptance"
    final_seeds = setting(config, "final_eval.seeds")
    mesh = setting(config, "mesh") if isinstance(setting(config, "mesh"), Mapping) else {}
    rows = [
        ("model", model),
        ("base policy", base),
        ("collect.policy (Loop-2 training traces)", collect),
        ("Loop-1 critic", critic),
        ("Loop-2 judge", judge_desc(config)),
        ("bootstrap", _bootstrap_desc(config, results.get("bootstrap"))),
        ("eval seeds", recorded(setting(config, "eval.seeds"))),
        ("final-eval seeds", "same as eval seeds" if final_seeds == "" else recorded(final_seeds)),
        ("held-out seeds", _heldout_desc(config)),
        ("environment", recorded(setting(config, "env.name"))),
        ("max steps / episode", recorded(setting(config, "env.max_steps"))),
        ("dtype / param dtype",
         f"{recorded(setting(config, 'model.dtype'))} / {recorded(setting(config, 'model.param_dtype'))}"),
        ("mesh", ", ".join(f"{k}={mesh[k]}" for k in ("data", "fsdp", "tensor") if k in mesh) or NOT_RECORDED),
        ("stages", recorded(setting(config, "stages"))),
    ]
    out += [f"- **{k}**: {v}" for k, v in rows]
    if policy == "teacher":
        out += ["", f"{FLAG} This run is the scripted-teacher demonstration (`collect.policy=teacher`): read the "
                "note under the result before any redundant-write figure."]
    return out


def _heldout_desc(config: Mapping | None) -> str:
    held = setting(config, "eval.heldout_seeds")
    if held is None:
        return NOT_RECORDED
    if held == "":
        return "none (`eval.heldout_seeds` unset)"
    return f"{held} (reported only: nothing is chosen on them)"


def provenance_note(config: Mapping | None, results: Mapping[str, dict], ledger: Sequence[Mapping]) -> list[str]:
    """Where the data behind the result came from, when that decides what the result can mean: a
    demo whose effect follows from how it was built must say so in its own output."""
    policy, _ = collect_policy(config, results)
    bootstrap = setting(config, "bootstrap.enabled")
    rate = num(setting(config, "bootstrap.redundant_write_rate"))
    rate_s = f"{rate:g}" if rate is not None else NOT_RECORDED
    if policy == "teacher":
        trained = bool(ledger) or (results.get("final_eval") or {}).get("iteration") is not None
        if not trained:
            return [f"> {FLAG} **Scripted-teacher demonstration.** `collect.policy=teacher`, but no Loop-2 iteration "
                    "was trained, so the final system is the base policy with the best Loop-1 structure; nothing "
                    "here measures Loop 2."]
        # Which rule drops the planted turns: critic.heuristic.judge_one rejects any turn with a
        # redundant write; the LLM judge's instructions tell it to reject duplicates of stored lines.
        judge = judge_desc(config)
        if judge.startswith("`heuristic`"):
            how = "the heuristic judge rejects every turn with a redundant write"
        elif judge.startswith("the Loop-1 critic"):
            how = "the LLM judge is told to reject duplicates of stored lines"
        else:
            how = "Loop 2's judge rejects such turns"
        text = (f"> {FLAG} **Scripted-teacher demonstration: the redundant-write drop is built in.** Loop 2 trained "
                "on traces played by the scripted teacher (`collect.policy=teacher`), not by the base policy. The "
                f"teacher re-writes state lines on purpose (`bootstrap.redundant_write_rate={rate_s}`) and Loop 2's "
                f"selection filters exactly those turns out ({how}), so a lower redundant-write rate here is the "
                "teacher's planted habit being filtered out. It follows from how this demo is built and is not "
                "evidence that the method works. Progression is the measure, and only a run with "
                "`collect.policy=base` tests the method.")
        if bootstrap:
            text += (" The base policy learned the same habit from the teacher in `bootstrap`, which is where the "
                     "baseline's redundant writes come from.")
        return [text]
    if policy is None:
        return [f"> `collect.policy` {NOT_RECORDED}: whether Loop 2 trained on the scripted teacher's traces (whose "
                "redundant writes are planted) is unknown, so read the redundant-write figures with care."]
    if bootstrap:
        return ["> The base policy was warm-started on the scripted teacher (`bootstrap`), which writes redundantly "
                f"on purpose (`bootstrap.redundant_write_rate={rate_s}`): the baseline's redundant writes are that "
                "planted habit."]
    return []
