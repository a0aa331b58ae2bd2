"""The run the stages share: the configured model and tokenizer, the training and serving meshes,
the inference backends (in-process engines or managed replicas) and evaluation (episodes played
into a run folder, summarised).
"""
from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging

import jax

from automem_jax import storage
from automem_jax.llm import layout
from automem_jax.llm.client import EngineClient, RouterClient
from automem_jax.llm.engine import Engine
from automem_jax.llm.replicas import ReplicaConfig, ReplicaSet
from automem_jax.llm.sampling import generation_defaults
from automem_jax.models import hf, qwen, qwen_presets
from automem_jax.models.tokenizer import load_tokenizer, tokenizer_source
from automem_jax.parallel import hosts
from automem_jax.parallel.mesh import make_mesh, make_serving_mesh, serving_rules
from automem_jax.rollout.runner import Runner
from automem_jax.rollout.traces import dumps_pretty, finished_results, health_warnings, summarize
from launch.child import run_child
from launch.config import env_names
from launch.units import UNITS
from launch.workdir import is_writer

log = logging.getLogger("automem_jax")


class Run:
    def __init__(self, cfg, workdir: str):
        self.cfg, self.workdir = cfg, workdir
        self._tok = None
        self._base_tok = None
        self._mesh = None
        self._serving_mesh = None
        self._engines: dict[str, object] = {}
        self._replicas: dict[str, object] = {}  # model source -> ReplicaSet (inference.backend=server)
        self._rounds = 0  # multi-host hand-offs so far (the same count on every host)
        self.tokens_in = 0
        self.tokens_out = 0

    def path(self, *parts: str) -> str:
        return storage.join(self.workdir, *parts)

    @property
    def tok(self):
        """The run's tokenizer: the bootstrap's trained one once it exists, else the configured one."""
        if self._tok is None:
            # A plain read, not _unit_done: hosts load it at different moments, after the bootstrap
            # stage's barrier (or its hand-off) made the folder complete.
            if self.trained_tokenizer() and storage.exists(self.path("bootstrap", "tokenizer", "DONE")):
                self._tok = load_tokenizer(self.path("bootstrap", "tokenizer"))
            else:
                self._tok = self.base_tok
        return self._tok

    @property
    def base_tok(self):
        """The configured tokenizer: empty = the checkpoint's own, or the offline Qwen3 one."""
        if self._base_tok is None:
            self._base_tok = load_tokenizer(tokenizer_source(self.cfg.tokenizer, self.cfg.model.checkpoint))
        return self._base_tok

    def trained_tokenizer(self) -> bool:
        """The bootstrap trains a small domain tokenizer (random presets only: a checkpoint keeps its own)."""
        b = self.cfg.bootstrap
        return bool(b.enabled and b.get("tokenizer_vocab", 0) and not self.cfg.model.checkpoint)

    @property
    def mesh(self):
        if self._mesh is None:
            self._mesh = make_mesh(self.cfg.mesh.to_dict())
        return self._mesh

    def runtime(self) -> dict:
        m = self.cfg.model
        return dict(dtype=m.dtype, param_dtype=m.param_dtype, scan_layers=m.scan_layers, remat=m.remat)

    # -- models ------------------------------------------------------------------------------------
    def base_source(self) -> str:
        """The HF folder of the gameplay/base policy ("" = the random preset)."""
        if self.cfg.bootstrap.enabled:
            src = self.path("bootstrap", "model")
            if not storage.exists(storage.join(src, "DONE")):  # written before the bootstrap's barrier
                raise RuntimeError(f"bootstrap is enabled but {src} is not finished; run the bootstrap stage "
                                   "first (it is part of the default stage list). If stages/bootstrap/DONE "
                                   "exists, this workdir ran with bootstrap.enabled=False: use a fresh one")
            return src
        return self.cfg.model.checkpoint

    def load_model(self, source: str):
        if source:
            return hf.load_pretrained(source, mesh=self.mesh, **self.runtime())
        overrides = {}
        if self.trained_tokenizer():
            # The preset's shape with the trained tokenizer's vocabulary (padded so it shards).
            tok = self.tok
            overrides = dict(vocab_size=-(-len(tok) // 128) * 128, eos_token_id=tok.eos_token_id,
                             bos_token_id=tok.pad_token_id)
        mcfg = qwen_presets.preset(self.cfg.model.preset, **self.runtime(), **overrides)
        return qwen.init_model(mcfg, seed=self.cfg.seed, mesh=self.mesh), mcfg

    @property
    def serving_mesh(self):
        """The engine's mesh (inference.mesh: data x tensor, no fsdp) over the training mesh's devices."""
        if self._serving_mesh is None:
            devices = sorted(self.mesh.devices.flat, key=lambda d: d.id)
            self._serving_mesh = make_serving_mesh(self.cfg.inference.mesh.to_dict(), devices=devices)
        return self._serving_mesh

    @property
    def serving_rules(self):
        return serving_rules(self.cfg.inference.rules)

    def sampling_defaults(self, source: str) -> dict:
        """Defaults for what a request leaves unset: generation_config.json's top_p / top_k /
        repetition_penalty (inference.generation_config=auto; the served folder's, then the base
        checkpoint's, since an exported specialist may carry fewer fields), then
        inference.repetition_penalty over them."""
        inf = self.cfg.inference
        out: dict = {}
        if inf.generation_config == "auto":
            for folder in dict.fromkeys(f for f in (source, self.cfg.model.checkpoint) if f):
                for key, value in generation_defaults(folder).items():
                    out.setdefault(key, value)
        if inf.repetition_penalty is not None:
            out["repetition_penalty"] = float(inf.repetition_penalty)
        return out

    def engine(self, source: str):
        """One cached Engine per model source (older ones are dropped to bound memory), served under
        the inference mesh and rules (weights replicated over data, split over tensor)."""
        if source not in self._engines:
            base = self.base_source()
            for k in [k for k in self._engines if k != base]:
                del self._engines[k]
            model, mcfg = self.load_model(source)
            inf = self.cfg.inference
            mesh, rules = self.serving_mesh, self.serving_rules
            mem = layout.serving_memory(mcfg, dict(mesh.shape), rules, max_batch=inf.max_batch, max_len=inf.max_len,
                                        cache_tokens=inf.cache_tokens or None, page_size=inf.page_size,
                                        prefill_chunk=inf.prefill_chunk, engines=len(self._engines) + 1)
            log.info("engine %s: serving mesh %s; per chip %s", source or self.cfg.model.preset,
                     dict(mesh.shape), mem.describe())
            kwargs = dict(rules=rules, page_size=inf.page_size, cache_tokens=inf.cache_tokens or None,
                          prefill_chunk=inf.prefill_chunk, prefix_cache=inf.prefix_cache,
                          sampling_defaults=self.sampling_defaults(source) or None)
            self._engines[source] = Engine(model, self.tok, max_batch=inf.max_batch, max_len=inf.max_len,
                                           mesh=mesh, seed=self.cfg.seed,
                                           model_name=source or self.cfg.model.preset, **kwargs)
        return self._engines[source]

    @property
    def hosted(self) -> bool:
        """Rollouts go to managed replicas (inference.backend=server), not to an in-process engine."""
        return self.cfg.inference.backend == "server"

    def replicas(self, source: str, *, extra: bool = False):
        """The started ReplicaSet serving `source` (its base model is named SERVED_BASE). A set on
        other weights is stopped first, unless `extra` (a full fine-tuned specialist served beside
        the base, on the next ports). Multi-host: every host starts its own replicas and process 0,
        which plays, learns the other hosts' endpoints."""
        if source in self._replicas:
            return self._replicas[source]
        if not extra:
            self.release_inference()
        inf = self.cfg.inference
        rcfg = ReplicaConfig.from_any(inf.server)
        if extra and rcfg.base_port:
            rcfg = dataclasses.replace(rcfg, base_port=rcfg.base_port + rcfg.replicas * len(self._replicas))
        tensor = inf.mesh.tensor if inf.mesh.tensor > 0 else jax.local_device_count()
        ckpt = source or f"preset:{self.cfg.model.preset}"
        rs = ReplicaSet(rcfg, ckpt, model=SERVED_BASE, tokenizer=tokenizer_source(self.cfg.tokenizer, source) or "",
                        max_len=inf.max_len,
                        max_batch=inf.max_batch, seed=self.cfg.seed, tensor=tensor,
                        lora_rank=self.cfg.loop2.train.lora_rank, host_index=jax.process_index())
        self._replicas[source] = rs.start()
        rs.add_remote(self._gather_endpoints(rs.local_urls))
        return rs

    def _gather_endpoints(self, urls: list[str]) -> list[str]:
        """Process 0 gets every other host's replica URLs (the coordinator's key-value store)."""
        self._rounds += 1
        if jax.process_count() == 1:
            return []
        kv = hosts.kv_client()
        prefix = f"automem/replicas/{self._rounds}"
        kv.key_value_set(f"{prefix}/{jax.process_index()}", json.dumps(urls))
        if jax.process_index() != 0:
            return []
        timeout_ms = int(self.cfg.inference.server.health_timeout_s * 1000) + 60_000
        return [u for i in range(1, jax.process_count())
                for u in json.loads(kv.blocking_key_value_get(f"{prefix}/{i}", timeout_ms))]

    def release_inference(self) -> None:
        """Stops the replicas and drops the in-process engines (weights and KV cache), so that
        training has the chips and the memory; the next evaluation starts them on the new weights."""
        for rs in self._replicas.values():
            rs.stop()
        self._replicas.clear()
        if self._engines:
            self._engines.clear()
            gc.collect()

    def on_accelerator(self, unit: str, **kwargs) -> dict:
        """Runs UNITS[unit](run, **kwargs), the training and weight-writing work. In process for
        the local engine; with managed replicas (which hold the chips while they serve, and a TPU
        chip has one owner at a time) in a child process on every host, started after the replicas
        stop and gone before they start again (launch/child.py)."""
        self.release_inference()
        if not self.hosted:
            return UNITS[unit](self, **kwargs)
        self._rounds += 1
        out = run_child(self.cfg, self.workdir, unit, kwargs, round_=self._rounds)
        if jax.process_count() > 1:  # what process 0's child wrote is complete before any host reads it
            hosts.barrier(f"automem/unit/{self._rounds}", 3600)
        return out

    def sampling(self) -> dict:
        inf = self.cfg.inference
        extra = {} if inf.repetition_penalty is None else {"repetition_penalty": float(inf.repetition_penalty)}
        return dict(temperature=inf.temperature, top_p=inf.top_p, max_tokens=inf.max_tokens, extra_body=extra or None)

    def client(self, source: str):
        if self.hosted:
            return self.replicas(source).client(SERVED_BASE, **self.sampling())
        inf = self.cfg.inference
        return EngineClient(self.engine(source), temperature=inf.temperature, top_p=inf.top_p,
                            max_tokens=inf.max_tokens)

    def specialist_client(self, checkpoint: str, adapter: str | None):
        """The memory specialist: in process, an engine on its merged folder; on replicas, its LoRA
        adapter loaded beside the base model (a full fine-tune gets replicas of its own)."""
        if not self.hosted:
            return self.client(checkpoint)
        if adapter:
            name = "specialist-" + hashlib.sha1(adapter.encode()).hexdigest()[:10]
            rs = self.replicas(self.base_source())
            rs.load_adapter(name, adapter)
            return rs.client(name, **self.sampling())
        self.replicas(self.base_source())
        return self.replicas(checkpoint, extra=True).client(SERVED_BASE, **self.sampling())

    # -- evaluation ----------------------------------------------------------------------------------
    def play(self, client, structure, run_dir: str, seeds: list[int], *, max_steps: int | None = None,
             two_model: bool = False, solo: bool = False) -> dict:
        """Every configured env on the given seeds into run_dir; returns the combined summary.
        Multi-host: with the local engine every host plays the same episodes (its calls are SPMD)
        and process 0 writes; `solo` (a client that is not the SPMD engine: managed replicas, the
        scripted teacher) has process 0 play alone and hand the summary to the others."""
        if not (solo and jax.process_count() > 1):
            return self._play(client, structure, run_dir, seeds, max_steps, two_model)
        summary = hosts.primary(lambda: self._play(client, structure, run_dir, seeds, max_steps, two_model),
                                f"play {run_dir}")
        if not hosts.is_primary():
            self.tokens_in += summary.get("input_tokens", 0)
            self.tokens_out += summary.get("output_tokens", 0)
        return summary

    def _play(self, client, structure, run_dir, seeds, max_steps, two_model) -> dict:
        inf = self.cfg.inference
        runs, episodes = [], []
        for name in env_names(self.cfg):
            runner = Runner(client, structure, run_dir, name, num_envs=self.cfg.env.num_envs,
                            max_steps=max_steps or self.cfg.env.max_steps, two_model=two_model,
                            env_kwargs=self.env_kwargs(name),
                            max_requests_per_call=inf.max_requests_per_call or None)
            runs.append(runner.run(seeds).get("run", {}))
            episodes += runner.episodes
        summary = summarize(episodes)
        summary["runs"] = runs
        for line in health_warnings(summary, label=run_dir):  # model errors, fallbacks, overflows > 5%
            log.warning(line)
        if self.hosted:
            summary["replicas"] = {src or "preset": rs.stats for src, rs in self._replicas.items()}
            for src, rs in self._replicas.items():
                log.info("replicas of %s: requests answered per replica %s (%d local, %d restarts)",
                         src or self.cfg.model.preset, rs.stats["served"], rs.stats["local"], rs.stats["restarts"])
        self.tokens_in += summary.get("input_tokens", 0)
        self.tokens_out += summary.get("output_tokens", 0)
        if is_writer():
            storage.write_text(storage.join(run_dir, "summary.json"), dumps_pretty(summary))
        return summary

    def env_kwargs(self, name: str) -> dict:
        env = self.cfg.env
        levels = env.levels_path if name.startswith("minihack:Boxoban") else ""
        out = {"boxoban_levels": levels} if levels else {}
        # The Runner takes this harness switch out of the env keywords.
        out["feedback_on_invalid_action"] = bool(env.get("feedback_on_invalid_action", False))
        if name == "nethack" and env.get("extra_commands", ""):
            out["extra_commands"] = env.extra_commands
        if name == "nethack" or name.startswith("minihack:"):
            out["text_style"] = env.get("text_style", "balrog")
        return out

    def evaluate(self, structure, run_dir: str, seeds: list[int], specialist: str | None = None,
                 adapter: str | None = None) -> dict:
        """The base policy, or (`specialist`: its merged folder; `adapter`: its PEFT folder, which
        replicas load at run time) the two-model system: specialist for memory, base for actions."""
        base = self.base_source()
        if specialist is None:
            return self.play(self.client(base), structure, run_dir, seeds, solo=self.hosted)
        router = RouterClient(memory=self.specialist_client(specialist, adapter), gameplay=self.client(base))
        return self.play(router, structure, run_dir, seeds, two_model=True, solo=self.hosted)


SERVED_BASE = "policy"  # the base model's name on the replicas


def combined_summary(run_dir: str) -> dict:
    """summarize() over every finished episode under run_dir/traces (all envs and tasks)."""
    return summarize(finished_results(run_dir))


def progress_line(name: str, s: dict) -> str:
    hyg = hygiene(s)
    health = s.get("health") or {}
    rates = ", ".join(f"{what} {health[key]:.1%}" for key, what in (
        ("model_error_rate", "model errors"), ("fallback_rate", "fallback actions"),
        ("context_overflow_rate", "context overflows")) if health.get(key) is not None)
    return (f"{name}: progression {s['average_progress']:.2f}% ± {s['standard_error']:.2f}% over "
            f"{s['episodes']} episodes; redundant writes {hyg.get('redundant_write_rate', 0):.1%}, "
            f"empty searches {hyg.get('empty_search_rate', 0):.1%}, ops/step {hyg.get('ops_per_step', 0):.2f}"
            + (f"; {rates}" if rates else ""))


def hygiene(summary: dict) -> dict:
    """Step-weighted hygiene over every env/task of a summary."""
    keys = ("redundant_write_rate", "empty_search_rate", "ops_per_step", "context_tokens_per_step")
    tot, acc = 0, {k: 0.0 for k in keys}
    for tasks in summary.get("environments", {}).values():
        for t in tasks.values():
            w = t.get("steps", 1)
            tot += w
            for k in keys:
                acc[k] += w * t.get("hygiene", {}).get(k, 0.0)
    return {k: v / max(tot, 1) for k, v in acc.items()}


