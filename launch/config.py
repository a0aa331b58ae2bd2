"""The main job's config read into library objects: seed lists, env names, training and data
configs, LoRA settings, the start structure, the critic, Loop 1's and Loop 2's options.

`launch/tpu_run.py` validates a config through these same functions, so a value the stages
would reject fails before anything is written.
"""
from __future__ import annotations

import random

from automem_jax import storage
from automem_jax.critic import make_critic as build_critic
from automem_jax.loops.decider import Decider, Options
from automem_jax.loops.loop1_structure import Loop1Config
from automem_jax.memory.structure import MemoryStructure
from automem_jax.models.lora import LoRAConfig
from automem_jax.training.data import DataConfig
from automem_jax.training.trainer import TrainConfig


def parse_seeds(text: str) -> list[int]:
    """'42-45' or '42,43,50-52' -> a list of ints (order kept)."""
    out: list[int] = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            if sep:
                a, b = int(lo), int(hi)
                if b < a:
                    raise ValueError
                out.extend(range(a, b + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise ValueError(f"seed list {text!r}: {part!r} is not an integer or an a-b range") from None
    if not out:
        raise ValueError(f"seed list {text!r} is empty")
    return out


def collect_seeds(n: int, seed_base: int, exclude) -> list[int]:
    """Upstream's training seeds: random.seed(999); randint(1000, 99999), minus the eval seeds."""
    rng = random.Random(seed_base)
    exclude, out = set(exclude), []
    while len(out) < n:
        s = rng.randint(1000, 99999)
        if s not in exclude and s not in out:
            out.append(s)
    return out


def heldout_seeds(cfg) -> list[int]:
    """eval.heldout_seeds ([] when unset): never used to choose anything, only to report."""
    text = cfg.eval.get("heldout_seeds", "")
    return parse_seeds(text) if text else []


def env_names(cfg) -> list[str]:
    return [e.strip() for e in cfg.env.name.split(",") if e.strip()]


def train_config(section) -> TrainConfig:
    d = section.to_dict()
    d["remat"] = d.get("remat") or None
    return TrainConfig.from_dict(d)


def data_config(section) -> DataConfig:
    return DataConfig.from_dict(section.to_dict())


def trainer_lora(tcfg) -> LoRAConfig:
    return LoRAConfig(rank=tcfg.lora_rank, alpha=tcfg.lora_alpha, dropout=tcfg.lora_dropout,
                      targets=tcfg.lora_targets)


def load_structure(cfg) -> MemoryStructure:
    if cfg.env.structure:
        text = storage.read_text(cfg.env.structure)
        fmt = "json" if cfg.env.structure.endswith(".json") else "yaml"
        return MemoryStructure.from_text(text, fmt)
    return MemoryStructure.default(cfg.env.structure_name)


def make_critic(cfg):
    c = cfg.critic
    if c.kind == "heuristic":
        return build_critic({"kind": "heuristic", "seed": cfg.seed})
    spec = {"kind": c.kind, "base_url": c.base_url, "model": c.model, "api_key_env": c.api_key_env or None,
            "timeout_s": c.timeout_s, "max_retries": c.max_retries, "max_tokens": c.max_tokens,
            "use_tools": c.use_tools, "max_turns": c.max_turns,
            "judge_token_budget": cfg.loop2.get("judge_token_budget", 6000)}
    return build_critic(spec)


def loop1_config(cfg) -> Loop1Config:
    l1 = cfg.loop1
    return Loop1Config(revisions=l1.revisions, fresh_attempts=l1.fresh_attempts,
                       continuation_retries=l1.continuation_retries, accept=l1.accept,
                       bootstrap_confidence=l1.bootstrap_confidence)


def make_decider(cfg):
    """Loop 2's decider (loops.decider) or None (loop2.decider.enabled off: iterations repeat the
    config). The critic decides when it is a hosted model; the heuristic critic leaves it to the rule."""
    d = cfg.loop2.get("decider")
    if not d or not d.get("enabled", False):
        return None
    opts = Options.from_config(cfg.loop2, cfg.loop2.train.lora_rank)
    if cfg.critic.kind == "heuristic" or not d.get("use_critic", True):
        why = ("the critic is heuristic (offline)" if cfg.critic.kind == "heuristic"
               else "loop2.decider.use_critic is off")
        return Decider(opts, None, offline_reason=why)
    critic = make_critic(cfg)
    return Decider(opts, critic.client.chat)
