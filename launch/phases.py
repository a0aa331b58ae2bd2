"""The phases of the main job, composed from the library. `launch/tpu_run.py` runs them in order.

    bootstrap* -> baseline -> loop1 -> collect -> loop2 -> final_eval -> export -> report

Every phase writes `phases/<name>/result.json` + `DONE` when it ends; inside a phase each unit of
work (an episode, a Loop-1 candidate, a Loop-2 dataset / training step / evaluation) leaves its own
record in the workdir, so the same command resumes after a crash or a preemption without redoing
finished units. (*bootstrap: only with bootstrap.enabled; it warm-starts the random tiny model, or a
real checkpoint that does not yet follow the op grammar, on scripted-teacher demonstrations.)
"""
from __future__ import annotations

import json
import logging
import os
import random
import tempfile
import time

from automem_jax import storage

log = logging.getLogger("automem_jax")

PHASE_ORDER = ("bootstrap", "baseline", "loop1", "collect", "loop2", "final_eval", "export", "report",
               "model_smoke", "rollout_smoke")


# ---------------------------------------------------------------------------------------------
# Helpers

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


def env_names(cfg) -> list[str]:
    return [e.strip() for e in cfg.env.name.split(",") if e.strip()]


def train_config(section):
    from automem_jax.training.trainer import TrainConfig
    d = section.to_dict()
    d["remat"] = d.get("remat") or None
    return TrainConfig.from_dict(d)


def data_config(section):
    from automem_jax.training.data import DataConfig
    return DataConfig.from_dict(section.to_dict())


def load_structure(cfg):
    from automem_jax.memory.structure import MemoryStructure
    if cfg.env.structure:
        text = storage.read_text(cfg.env.structure)
        fmt = "json" if cfg.env.structure.endswith(".json") else "yaml"
        return MemoryStructure.from_text(text, fmt)
    return MemoryStructure.default(cfg.env.structure_name)


def copy_folder(src: str, dst: str) -> list[str]:
    """File-by-file copy between any two local / gs:// folders (flat HF and PEFT folders)."""
    names = [n for n in storage.listdir(src) if not n.endswith("/")]
    for n in names:
        storage.write_bytes(storage.join(dst, n), storage.read_bytes(storage.join(src, n)))
    return names


def is_writer() -> bool:
    return storage.primary_host()


def _read_json(path: str):
    """The JSON file as process 0 reads it (None when missing): every host decides alike."""
    from automem_jax.parallel import hosts
    return hosts.primary(lambda: json.loads(storage.read_text(path)) if storage.exists(path) else None,
                         f"read {path}")


def _unit_done(path: str) -> bool:
    from automem_jax.parallel import hosts
    return hosts.primary(lambda: storage.exists(storage.join(path, "DONE")), f"done {path}")


def _mark_unit(path: str, info: dict | None = None) -> None:
    if is_writer():
        if info is not None:
            storage.write_text(storage.join(path, "info.json"), json.dumps(info, indent=2, sort_keys=True) + "\n")
        storage.write_text(storage.join(path, "DONE"), time.strftime("%Y-%m-%dT%H:%M:%SZ\n", time.gmtime()))


# ---------------------------------------------------------------------------------------------
# The run: model, engines and evaluation shared by the phases

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
            from automem_jax.models.tokenizer import load_tokenizer
            # A plain read, not _unit_done: hosts load it at different moments, after the bootstrap
            # phase's barrier (or its hand-off) made the folder complete.
            if self.trained_tokenizer() and storage.exists(self.path("bootstrap", "tokenizer", "DONE")):
                self._tok = load_tokenizer(self.path("bootstrap", "tokenizer"))
            else:
                self._tok = self.base_tok
        return self._tok

    @property
    def base_tok(self):
        """The configured tokenizer: empty = the checkpoint's own, or the offline Qwen3 one."""
        if self._base_tok is None:
            from automem_jax.models.tokenizer import load_tokenizer, tokenizer_source
            self._base_tok = load_tokenizer(tokenizer_source(self.cfg.tokenizer, self.cfg.model.checkpoint))
        return self._base_tok

    def trained_tokenizer(self) -> bool:
        """The bootstrap trains a small domain tokenizer (random presets only: a checkpoint keeps its own)."""
        b = self.cfg.bootstrap
        return bool(b.enabled and b.get("tokenizer_vocab", 0) and not self.cfg.model.checkpoint)

    @property
    def mesh(self):
        if self._mesh is None:
            from automem_jax.parallel.mesh import make_mesh
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
                raise RuntimeError(f"bootstrap is enabled but {src} is not finished; run the bootstrap phase "
                                   "first (it is part of the default phase list). If phases/bootstrap/DONE "
                                   "exists, this workdir ran with bootstrap.enabled=False: use a fresh one")
            return src
        return self.cfg.model.checkpoint

    def load_model(self, source: str):
        from automem_jax.models import hf, qwen, qwen_config
        if source:
            return hf.load_pretrained(source, mesh=self.mesh, **self.runtime())
        overrides = {}
        if self.trained_tokenizer():
            # The preset's shape with the trained tokenizer's vocabulary (padded so it shards).
            tok = self.tok
            overrides = dict(vocab_size=-(-len(tok) // 128) * 128, eos_token_id=tok.eos_token_id,
                             bos_token_id=tok.pad_token_id)
        mcfg = qwen_config.preset(self.cfg.model.preset, **self.runtime(), **overrides)
        return qwen.init_model(mcfg, seed=self.cfg.seed, mesh=self.mesh), mcfg

    @property
    def serving_mesh(self):
        """The engine's mesh (inference.mesh: data x tensor, no fsdp) over the training mesh's devices."""
        if self._serving_mesh is None:
            from automem_jax.parallel.mesh import make_serving_mesh
            devices = sorted(self.mesh.devices.flat, key=lambda d: d.id)
            self._serving_mesh = make_serving_mesh(self.cfg.inference.mesh.to_dict(), devices=devices)
        return self._serving_mesh

    @property
    def serving_rules(self):
        from automem_jax.parallel.mesh import serving_rules
        return serving_rules(self.cfg.inference.rules)

    def sampling_defaults(self, source: str) -> dict:
        """Defaults for what a request leaves unset: generation_config.json's top_p / top_k /
        repetition_penalty (inference.generation_config=auto; the served folder's, then the base
        checkpoint's, since an exported specialist may carry fewer fields), then
        inference.repetition_penalty over them."""
        inf = self.cfg.inference
        out: dict = {}
        if inf.generation_config == "auto":
            from automem_jax.llm.sampling import generation_defaults
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
            from automem_jax.llm import layout
            from automem_jax.llm.engine import Engine
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
        import dataclasses

        import jax

        from automem_jax.llm.replicas import ReplicaConfig, ReplicaSet
        if not extra:
            self.release_inference()
        inf = self.cfg.inference
        rcfg = ReplicaConfig.from_any(inf.server)
        if extra and rcfg.base_port:
            rcfg = dataclasses.replace(rcfg, base_port=rcfg.base_port + rcfg.replicas * len(self._replicas))
        tensor = inf.mesh.tensor if inf.mesh.tensor > 0 else jax.local_device_count()
        ckpt = source or f"preset:{self.cfg.model.preset}"
        from automem_jax.models.tokenizer import tokenizer_source
        rs = ReplicaSet(rcfg, ckpt, model=SERVED_BASE, tokenizer=tokenizer_source(self.cfg.tokenizer, source) or "",
                        max_len=inf.max_len,
                        max_batch=inf.max_batch, seed=self.cfg.seed, tensor=tensor,
                        lora_rank=self.cfg.loop2.train.lora_rank, host_index=jax.process_index())
        self._replicas[source] = rs.start()
        rs.add_remote(self._gather_endpoints(rs.local_urls))
        return rs

    def _gather_endpoints(self, urls: list[str]) -> list[str]:
        """Process 0 gets every other host's replica URLs (the coordinator's key-value store)."""
        import jax
        self._rounds += 1
        if jax.process_count() == 1:
            return []
        from automem_jax.parallel import hosts
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
            import gc
            gc.collect()

    def on_accelerator(self, unit: str, **kwargs) -> dict:
        """Runs UNITS[unit](run, **kwargs), the training and weight-writing work. In process for
        the local engine; with managed replicas (which hold the chips while they serve, and a TPU
        chip has one owner at a time) in a child process on every host, started after the replicas
        stop and gone before they start again (launch/child.py)."""
        self.release_inference()
        if not self.hosted:
            return UNITS[unit](self, **kwargs)
        import jax

        from launch.child import run_child
        self._rounds += 1
        out = run_child(self.cfg, self.workdir, unit, kwargs, round_=self._rounds)
        if jax.process_count() > 1:  # what process 0's child wrote is complete before any host reads it
            from automem_jax.parallel import hosts
            hosts.barrier(f"automem/unit/{self._rounds}", 3600)
        return out

    def sampling(self) -> dict:
        inf = self.cfg.inference
        extra = {} if inf.repetition_penalty is None else {"repetition_penalty": float(inf.repetition_penalty)}
        return dict(temperature=inf.temperature, top_p=inf.top_p, max_tokens=inf.max_tokens, extra_body=extra or None)

    def client(self, source: str):
        if self.hosted:
            return self.replicas(source).client(SERVED_BASE, **self.sampling())
        from automem_jax.llm.client import EngineClient
        inf = self.cfg.inference
        return EngineClient(self.engine(source), temperature=inf.temperature, top_p=inf.top_p,
                            max_tokens=inf.max_tokens)

    def specialist_client(self, checkpoint: str, adapter: str | None):
        """The memory specialist: in process, an engine on its merged folder; on replicas, its LoRA
        adapter loaded beside the base model (a full fine-tune gets replicas of its own)."""
        if not self.hosted:
            return self.client(checkpoint)
        if adapter:
            import hashlib
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
        import jax
        if not (solo and jax.process_count() > 1):
            return self._play(client, structure, run_dir, seeds, max_steps, two_model)
        from automem_jax.parallel import hosts
        summary = hosts.primary(lambda: self._play(client, structure, run_dir, seeds, max_steps, two_model),
                                f"play {run_dir}")
        if not hosts.is_primary():
            self.tokens_in += summary.get("input_tokens", 0)
            self.tokens_out += summary.get("output_tokens", 0)
        return summary

    def _play(self, client, structure, run_dir, seeds, max_steps, two_model) -> dict:
        from automem_jax.rollout.runner import Runner
        from automem_jax.rollout.traces import health_warnings, summarize
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
            from automem_jax.rollout.traces import dumps_pretty
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
        from automem_jax.llm.client import RouterClient
        router = RouterClient(memory=self.specialist_client(specialist, adapter), gameplay=self.client(base))
        return self.play(router, structure, run_dir, seeds, two_model=True, solo=self.hosted)


SERVED_BASE = "policy"  # the base model's name on the replicas


def combined_summary(run_dir: str) -> dict:
    """summarize() over every finished episode under run_dir/traces (all envs and tasks)."""
    from automem_jax.rollout.traces import summarize
    eps = []
    root = storage.join(run_dir, "traces")
    if storage.exists(root) or storage.is_gcs(root):
        for env in _subdirs(root):
            for task in _subdirs(storage.join(root, env)):
                folder = storage.join(root, env, task)
                for name in sorted(storage.listdir(folder)):
                    if name.startswith("ep_") and name.endswith(".json"):
                        eps.append(json.loads(storage.read_text(storage.join(folder, name))))
    return summarize(eps)


def _subdirs(path: str) -> list[str]:
    try:
        return sorted(n.rstrip("/") for n in storage.listdir(path) if n.endswith("/") or
                      (not storage.is_gcs(path) and os.path.isdir(os.path.join(path, n))))
    except FileNotFoundError:
        return []


def _progress_line(name: str, s: dict) -> str:
    hyg = _hygiene(s)
    health = s.get("health") or {}
    rates = ", ".join(f"{what} {health[key]:.1%}" for key, what in (
        ("model_error_rate", "model errors"), ("fallback_rate", "fallback actions"),
        ("context_overflow_rate", "context overflows")) if health.get(key) is not None)
    return (f"{name}: progression {s['average_progress']:.2f}% ± {s['standard_error']:.2f}% over "
            f"{s['episodes']} episodes; redundant writes {hyg.get('redundant_write_rate', 0):.1%}, "
            f"empty searches {hyg.get('empty_search_rate', 0):.1%}, ops/step {hyg.get('ops_per_step', 0):.2f}"
            + (f"; {rates}" if rates else ""))


def _hygiene(summary: dict) -> dict:
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


# ---------------------------------------------------------------------------------------------
# Phases

def phase_bootstrap(run: Run) -> dict:
    """Scripted teacher episodes -> SFT dataset -> fine-tune -> bootstrap/model, a HF folder.

    Random preset (tiny): a domain tokenizer is fitted to the teacher's chats first
    (bootstrap.tokenizer_vocab) and the preset gets its vocabulary. model.checkpoint: its own
    tokenizer and chat template render the chats and the checkpoint itself is fine-tuned, LoRA
    (merged) or full per bootstrap.train.mode."""
    cfg = run.cfg
    b = cfg.bootstrap
    if not b.enabled:
        return {"skipped": "bootstrap.enabled is False"}
    from automem_jax.loops.teacher import TeacherClient, teacher_examples
    from automem_jax.training.data import SFTDataset, build_dataset

    structure = load_structure(cfg)
    teacher = TeacherClient(seed=cfg.seed, redundant_write_rate=b.redundant_write_rate,
                            useless_read_rate=b.useless_read_rate, tokenizer=run.base_tok)
    traces = run.path("bootstrap", "teacher")
    summary = run.play(teacher, structure, traces, parse_seeds(b.seeds), max_steps=b.max_steps, solo=True)
    log.info(_progress_line("bootstrap teacher", summary))

    tok_dir = run.path("bootstrap", "tokenizer")
    if run.trained_tokenizer() and not _unit_done(tok_dir):
        from automem_jax.parallel import hosts

        def train_tokenizer() -> dict:
            from automem_jax.models.tokenizer import train_domain_tokenizer
            texts = [m["content"] for e in teacher_examples(traces) for m in e["conversations"]]
            tok = train_domain_tokenizer(texts, run.base_tok, int(b.tokenizer_vocab))
            with tempfile.TemporaryDirectory() as tmp:
                tok.save_pretrained(tmp)
                storage.copy_tree(tmp, tok_dir)
            info = {"vocab": len(tok), "requested": int(b.tokenizer_vocab), "texts": len(texts)}
            _mark_unit(tok_dir, info)
            return info

        # Trained once, on process 0; every host then loads the saved folder.
        info = hosts.primary(train_tokenizer, "bootstrap tokenizer")
        run._tok = None
        log.info("bootstrap tokenizer: %d tokens trained on %d teacher messages", info["vocab"], info["texts"])

    data_dir = run.path("bootstrap", "dataset")
    if _unit_done(data_dir):
        ds = SFTDataset.load(data_dir, run.tok)
    else:
        ds = build_dataset(teacher_examples(traces), run.tok, data_config(b.data), source=traces)
        if is_writer():
            ds.save(data_dir)
        _mark_unit(data_dir, ds.manifest)
    log.info("bootstrap dataset: %d examples, %d target tokens (tokenizer: %s)", len(ds),
             ds.manifest.get("tokens", {}).get("target", 0),
             "bootstrap/tokenizer" if run.trained_tokenizer() else (run.cfg.model.checkpoint or "configured"))

    model_dir = run.path("bootstrap", "model")
    if not _unit_done(model_dir):
        run.on_accelerator("bootstrap_train")
    info = _read_json(storage.join(model_dir, "info.json")) or {}
    return {"teacher_summary": storage.join(traces, "summary.json"),
            "teacher_progression": summary["average_progress"], "teacher_hygiene": _hygiene(summary),
            "examples": len(ds), "model": model_dir, "train": info}


def bootstrap_train(run: Run) -> dict:
    """Fine-tune of the random preset or model.checkpoint on the teacher dataset (bootstrap.train.mode:
    full, or LoRA merged into the weights) -> bootstrap/model, a plain HF folder with the run's
    tokenizer, so later phases load it as they would the checkpoint."""
    from automem_jax.models import hf, lora
    from automem_jax.training.data import SFTDataset
    from automem_jax.training.trainer import Trainer
    b = run.cfg.bootstrap
    ckpt = run.cfg.model.checkpoint
    model_dir = run.path("bootstrap", "model")
    ds = SFTDataset.load(run.path("bootstrap", "dataset"), run.tok)
    model, mcfg = run.load_model(ckpt)
    tcfg = train_config(b.train)
    # base_ref: a resumed fit refuses a different checkpoint under the same workdir.
    res = Trainer(model, mcfg, tcfg, run.path("bootstrap", "train"), mesh=run.mesh, base_ref=ckpt).fit(ds)
    summary, policy = res.summary(), res.model
    del res, model  # one trained copy from here, merged in place
    if lora.has_lora(policy):
        lora.merge_lora(policy, inplace=True)
    hf.save_pretrained(policy, mcfg, model_dir, tokenizer=run.tok)  # every host gathers; host 0 writes
    if ckpt and is_writer():
        _copy_generation_config(ckpt, model_dir)
    _mark_unit(model_dir, summary)
    log.info("bootstrap training (%s%s): loss %.3f -> %.3f over %d steps; policy saved to %s", tcfg.mode,
             f" of {ckpt}" if ckpt else "", summary["first_loss"], summary["final_loss"], summary["steps"],
             model_dir)
    return {"model": model_dir}


def _copy_generation_config(checkpoint: str, model_dir: str) -> None:
    """The checkpoint's generation_config.json (its eos ids and top_p / top_k / repetition_penalty)
    replaces the minimal one save_pretrained wrote, so replicas that read only the served folder
    (vLLM) sample the fine-tuned model as they would the checkpoint."""
    src = storage.join(checkpoint, "generation_config.json")
    try:
        if storage.exists(src):
            storage.write_text(storage.join(model_dir, "generation_config.json"), storage.read_text(src))
    except (OSError, ValueError) as e:  # optional: keep save_pretrained's file
        log.warning("bootstrap: %s not copied (%s); the saved model keeps default sampling values", src, e)


def phase_baseline(run: Run) -> dict:
    """The base policy with the start structure on the fixed eval seeds."""
    structure = load_structure(run.cfg)
    out = run.path("eval", "baseline")
    s = run.evaluate(structure, out, parse_seeds(run.cfg.eval.seeds))
    log.info(_progress_line("baseline", s))
    if is_writer():
        storage.write_text(run.path("structures", "v0.yaml"), structure.to_yaml())
    result = {"summary": storage.join(out, "summary.json"), "average_progress": s["average_progress"],
              "standard_error": s["standard_error"], "hygiene": _hygiene(s)}
    held = heldout_seeds(run.cfg)
    if held:
        # Measured before anything is tuned, on seeds no loop ever sees.
        h = _eval_once(run, run.path("eval", "baseline_heldout"), lambda d: run.evaluate(structure, d, held))
        log.info(_progress_line("baseline (held-out seeds)", h))
        result["heldout"] = {"summary": run.path("eval", "baseline_heldout", "summary.json"), "seeds": held,
                             "average_progress": h["average_progress"], "standard_error": h["standard_error"]}
    return result


def heldout_seeds(cfg) -> list[int]:
    """eval.heldout_seeds ([] when unset): never used to choose anything, only to report."""
    text = cfg.eval.get("heldout_seeds", "")
    return parse_seeds(text) if text else []


def _eval_once(run: "Run", out: str, play) -> dict:
    """An evaluation whose summary.json already exists is read, not replayed."""
    s = _read_json(storage.join(out, "summary.json"))
    return s if s is not None else play(out)


def make_critic(cfg):
    from automem_jax.critic import make_critic as build
    c = cfg.critic
    if c.kind == "heuristic":
        return build({"kind": "heuristic", "seed": cfg.seed})
    spec = {"kind": c.kind, "base_url": c.base_url, "model": c.model, "api_key_env": c.api_key_env or None,
            "timeout_s": c.timeout_s, "max_retries": c.max_retries, "max_tokens": c.max_tokens,
            "use_tools": c.use_tools, "max_turns": c.max_turns,
            "judge_token_budget": cfg.loop2.get("judge_token_budget", 6000)}
    return build(spec)


def loop1_config(cfg):
    from automem_jax.loops.structure import Loop1Config
    l1 = cfg.loop1
    return Loop1Config(revisions=l1.revisions, fresh_attempts=l1.fresh_attempts,
                       continuation_retries=l1.continuation_retries, accept=l1.accept,
                       bootstrap_confidence=l1.bootstrap_confidence)


def best_structure(run: Run):
    """The newest accepted Loop-1 structure, or the start structure when Loop 1 has not run."""
    from automem_jax.memory.structure import MemoryStructure
    from automem_jax.parallel import hosts

    def newest() -> str | None:
        path = run.path("structures", "best.json")
        best = json.loads(storage.read_text(path)) if storage.exists(path) else None
        if best and best.get("structure") and storage.exists(best["structure"]):
            return storage.read_text(best["structure"])
        if best and best.get("version") is not None:
            p = run.path("structures", f"v{best['version']}.yaml")
            if storage.exists(p):
                return storage.read_text(p)
        return None

    text = hosts.primary(newest, "best structure")
    return MemoryStructure.from_text(text) if text is not None else load_structure(run.cfg)


def phase_loop1(run: Run) -> dict:
    """Critic revisions of the memory structure, kept only when progression on the eval seeds improves."""
    from automem_jax.loops.structure import run_loop1
    seeds = parse_seeds(run.cfg.eval.seeds)
    baseline_dir = run.path("eval", "baseline")
    baseline = _read_json(storage.join(baseline_dir, "summary.json"))
    result = run_loop1(critic=make_critic(run.cfg), start=load_structure(run.cfg),
                       evaluate=lambda structure, run_dir: run.evaluate(structure, run_dir, seeds),
                       workdir=run.workdir, cfg=loop1_config(run.cfg), baseline_summary=baseline,
                       baseline_run_dir=baseline_dir if baseline else None, log=log.info)
    return {"best_version": result.best_version, "best_metric": result.best_metric,
            "candidates": len(result.archive), "accepted": sum(r.get("status") == "accepted" for r in result.archive),
            "tokens_in": run.tokens_in, "tokens_out": run.tokens_out}


def phase_collect(run: Run) -> dict:
    """Training traces: the best structure, the base policy, seeds disjoint from the eval seeds."""
    c = run.cfg.collect
    seeds = collect_seeds(c.episodes, c.seed_base, parse_seeds(run.cfg.eval.seeds))
    out = run.path("traces_collect")
    if c.policy == "teacher":
        # Tiny config: the scripted teacher stands in for a base model that already uses memory.
        from automem_jax.loops.teacher import TeacherClient
        b = run.cfg.bootstrap
        client = TeacherClient(seed=run.cfg.seed + 1, redundant_write_rate=b.redundant_write_rate,
                               useless_read_rate=b.useless_read_rate, tokenizer=run.tok)
    else:
        client = run.client(run.base_source())
    s = run.play(client, best_structure(run), out, seeds, max_steps=c.max_steps,
                 solo=run.hosted or c.policy == "teacher")
    log.info(_progress_line(f"collect ({c.policy})", s))
    return {"run_dir": out, "episodes": s["episodes"], "average_progress": s["average_progress"],
            "hygiene": _hygiene(s), "seeds": seeds, "policy": c.policy}


def _judge(run: Run):
    if run.cfg.loop2.judge == "heuristic" or run.cfg.critic.kind == "heuristic":
        from automem_jax.critic import HeuristicCritic
        return HeuristicCritic(seed=run.cfg.seed)
    return make_critic(run.cfg)


def phase_loop2(run: Run) -> dict:
    """Mine good memory turns -> postprocess -> LoRA SFT -> two-model eval; one ledger row per iteration."""
    from automem_jax.loops.proficiency import NotEnoughExamples, run_loop2

    cfg = run.cfg
    l2 = cfg.loop2
    seeds = parse_seeds(cfg.eval.seeds)
    structure = best_structure(run)

    def train_fn(dataset_dir: str, out_dir: str, iteration: int, recipe: dict | None = None) -> dict:
        rows = [x for x in storage.read_text(storage.join(dataset_dir, "selected.jsonl")).splitlines() if x.strip()]
        if not rows:
            raise NotEnoughExamples(0, l2.min_examples, {"dataset": dataset_dir})
        return run.on_accelerator("loop2_train", dataset_dir=dataset_dir, out_dir=out_dir, iteration=iteration,
                                  recipe=recipe)

    def eval_fn(train_result: dict, run_dir: str, iteration: int) -> dict:
        s = run.evaluate(structure, run_dir, seeds, specialist=train_result["checkpoint"],
                         adapter=train_result.get("peft") or None)
        log.info(_progress_line(f"loop2 iteration {iteration} (two-model)", s))
        return s

    try:
        rows = run_loop2(workdir=run.workdir, traces_dir=run.path("traces_collect"), judge=_judge(run),
                         train_fn=train_fn, eval_fn=eval_fn, iterations=l2.iterations,
                         min_examples=l2.min_examples, top_pct=l2.top_pct, reuse_dataset=l2.reuse_dataset,
                         allow_fewer=l2.allow_fewer, max_examples=l2.get("max_examples", 0),
                         sample_seed=l2.get("sample_seed", 0), decider=make_decider(cfg))
    except NotEnoughExamples as e:
        if not l2.allow_fewer:
            raise
        # allow_fewer (tiny config): a student that wrote no usable memory turn ends Loop 2 here;
        # final_eval and export then use the base policy, and the report says so.
        log.warning("loop2: %s; no iteration trained (loop2.allow_fewer is set, so the run goes on)", e)
        return {"iterations": 0, "skipped": str(e), "tokens_in": run.tokens_in, "tokens_out": run.tokens_out}
    return {"iterations": len(rows), "ledger": run.path("ledger.jsonl"),
            "progression": [r.get("progression_mean") for r in rows],
            "redundant_write_rate": [r.get("hygiene", {}).get("redundant_write_rate") for r in rows],
            "tokens_in": run.tokens_in, "tokens_out": run.tokens_out}


def make_decider(cfg):
    """Loop 2's decider (loops.decider) or None (loop2.decider.enabled off: iterations repeat the
    config). The critic decides when it is a hosted model; the heuristic critic leaves it to the rule."""
    d = cfg.loop2.get("decider")
    if not d or not d.get("enabled", False):
        return None
    from automem_jax.loops.decider import Decider, Options
    opts = Options.from_config(cfg.loop2, cfg.loop2.train.lora_rank)
    if cfg.critic.kind == "heuristic" or not d.get("use_critic", True):
        why = ("the critic is heuristic (offline)" if cfg.critic.kind == "heuristic"
               else "loop2.decider.use_critic is off")
        return Decider(opts, None, offline_reason=why)
    critic = make_critic(cfg)
    return Decider(opts, critic.client.chat)


def loop2_train(run: Run, dataset_dir: str, out_dir: str, iteration: int, recipe: dict | None = None) -> dict:
    """LoRA (or full) SFT of the base policy on a Loop-2 dataset -> the merged specialist folder
    and, for LoRA, its PEFT adapter (which replicas load at run time). ``recipe``: the decider's
    learning-rate / length scales and LoRA rank (loops.decider.apply_recipe)."""
    from automem_jax.loops.decider import apply_recipe
    from automem_jax.models import hf, lora
    from automem_jax.training.data import build_dataset
    from automem_jax.training.trainer import TrainConfig, Trainer
    cfg = run.cfg
    l2 = cfg.loop2
    d = l2.train.to_dict()
    d["remat"] = d.get("remat") or None  # as train_config() reads it
    tcfg = TrainConfig.from_dict(apply_recipe(d, recipe))
    rows = [json.loads(x) for x in storage.read_text(storage.join(dataset_dir, "selected.jsonl")).splitlines()
            if x.strip()]
    ds = build_dataset(rows, run.tok, data_config(l2.data), source=dataset_dir)
    model, mcfg = run.load_model(run.base_source())
    res = Trainer(model, mcfg, tcfg, out_dir, mesh=run.mesh, base_ref=run.base_source()).fit(
        ds, log_fn=lambda r: log.info("loop2 iter %d step %d loss %.4f %.0f tok/s", iteration, r["step"],
                                      r["loss"], r["tokens_per_s"]))
    specialist = storage.join(out_dir, "specialist")
    out = {"checkpoint": specialist, "peft": storage.join(out_dir, "peft") if tcfg.mode == "lora" else "",
           "first_loss": res.first_loss, "final_loss": res.final_loss, "steps": res.steps,
           "examples": len(ds), "dir": out_dir, "manifest": ds.manifest, "resumed_from": res.resumed_from,
           "recipe": {**(recipe or {}), "learning_rate": tcfg.learning_rate, "epochs": tcfg.epochs,
                      "max_steps": tcfg.max_steps, "lora_rank": tcfg.lora_rank, "lora_alpha": tcfg.lora_alpha}}
    trained = res.model
    del res, model  # from here one trained copy is held, merged in place: at most two with the gathers
    # Every host joins the gathers inside these; only host 0 writes files.
    if tcfg.mode == "lora":
        hf.save_peft_adapter(trained, mcfg, trainer_lora(tcfg), storage.join(out_dir, "peft"),
                             base_model_name_or_path=run.base_source() or cfg.model.preset)
        lora.merge_lora(trained, inplace=True)
    hf.save_pretrained(trained, mcfg, specialist, tokenizer=run.tok, dtype=cfg.export.dtype)
    return out


def export_base(run: Run, out: str) -> dict:
    """The base policy as a Hugging Face folder (export when no Loop-2 iteration finished)."""
    from automem_jax.models import hf
    model, mcfg = run.load_model(run.base_source())
    hf.save_pretrained(model, mcfg, out, tokenizer=run.tok, dtype=run.cfg.export.dtype)
    return {"hf": out}


def trainer_lora(tcfg):
    from automem_jax.models.lora import LoRAConfig
    return LoRAConfig(rank=tcfg.lora_rank, alpha=tcfg.lora_alpha, dropout=tcfg.lora_dropout,
                      targets=tcfg.lora_targets)


def best_iteration(workdir: str) -> dict | None:
    from automem_jax.loops.proficiency import read_ledger
    rows = read_ledger(workdir)
    if not rows:
        return None
    # Highest progression; ties go to the cleaner memory (fewer redundant writes).
    return max(rows, key=lambda r: (r.get("progression_mean", 0.0),
                                    -r.get("hygiene", {}).get("redundant_write_rate", 0.0)))


def phase_final_eval(run: Run) -> dict:
    """The final system (best structure + best specialist, two-model) against the baseline."""
    cfg = run.cfg
    seeds = parse_seeds(cfg.final_eval.seeds or cfg.eval.seeds)
    same = seeds == parse_seeds(cfg.eval.seeds)
    best = best_iteration(run.workdir)
    out = run.path("eval", "final")
    if best is None:
        log.info("final eval: no Loop-2 iteration finished; evaluating the base policy with the best structure")
        s = run.evaluate(best_structure(run), out, seeds)
    elif same and best.get("eval", {}).get("run_dir"):
        # The chosen iteration already ran on exactly these seeds: reuse, do not replay.
        from automem_jax.parallel import hosts
        src = best["eval"]["run_dir"]
        s = hosts.primary(lambda: combined_summary(src), "final summary")
        s["reused_from"] = src
        if is_writer():
            from automem_jax.rollout.traces import dumps_pretty
            storage.write_text(storage.join(out, "summary.json"), dumps_pretty(s))
    else:
        s = run.evaluate(best_structure(run), out, seeds, specialist=best["train"]["checkpoint"],
                         adapter=best["train"].get("peft") or None)
    base_dir = run.path("eval", "baseline") if same else run.path("eval", "final_baseline")
    base = _read_json(storage.join(base_dir, "summary.json"))
    if base is None:
        base = run.evaluate(load_structure(cfg), base_dir, seeds)
    hb, hf_ = _hygiene(base), _hygiene(s)
    log.info(_progress_line("final", s))
    log.info("redundant-write rate: baseline %.1f%% -> final %.1f%%", 100 * hb["redundant_write_rate"],
             100 * hf_["redundant_write_rate"])
    result = {"summary": storage.join(out, "summary.json"), "baseline_summary": storage.join(base_dir, "summary.json"),
              "iteration": None if best is None else best["iteration"], "chosen_on": "eval.seeds",
              "final": {"average_progress": s["average_progress"], "standard_error": s["standard_error"], **hf_},
              "baseline": {"average_progress": base["average_progress"], "standard_error": base["standard_error"],
                           **hb},
              "tokens_in": run.tokens_in, "tokens_out": run.tokens_out}
    held = heldout_seeds(cfg)
    if held:
        # The system was picked on the eval seeds; these seeds say whether the pick generalises.
        structure = best_structure(run)
        fh_dir, bh_dir = run.path("eval", "final_heldout"), run.path("eval", "baseline_heldout")
        if best is None:
            fh = _eval_once(run, fh_dir, lambda d: run.evaluate(structure, d, held))
        else:
            fh = _eval_once(run, fh_dir, lambda d: run.evaluate(structure, d, held,
                                                                specialist=best["train"]["checkpoint"],
                                                                adapter=best["train"].get("peft") or None))
        bh = _eval_once(run, bh_dir, lambda d: run.evaluate(load_structure(cfg), d, held))
        log.info(_progress_line("final (held-out seeds)", fh))
        result["heldout"] = {
            "seeds": held, "summary": storage.join(fh_dir, "summary.json"),
            "baseline_summary": storage.join(bh_dir, "summary.json"),
            "final": {"average_progress": fh["average_progress"], "standard_error": fh["standard_error"],
                      **_hygiene(fh)},
            "baseline": {"average_progress": bh["average_progress"], "standard_error": bh["standard_error"],
                         **_hygiene(bh)}}
    return result


def phase_export(run: Run) -> dict:
    """export/hf: the memory specialist (merged) as a transformers folder; export/peft: its adapter."""
    cfg = run.cfg
    best = best_iteration(run.workdir)
    out = run.path("export", "hf")
    result = {"hf": out}
    if best is None:
        log.info("export: no Loop-2 iteration; exporting the base policy")
        run.on_accelerator("export_base", out=out)
    elif is_writer():
        result["files"] = copy_folder(best["train"]["checkpoint"], out)
        peft = best["train"].get("peft")
        if cfg.export.peft and peft and storage.exists(storage.join(peft, "adapter_config.json")):
            copy_folder(peft, run.path("export", "peft"))
            result["peft"] = run.path("export", "peft")
        result["iteration"] = best["iteration"]
    if cfg.export.hub_repo_id and is_writer():
        result["hub"] = upload_to_hub(out, cfg.export.hub_repo_id, cfg.export.hub_token_env, cfg.export.hub_private)
    log.info("export: %s", out)
    return result


def upload_to_hub(folder: str, repo_id: str, token_env: str, private: bool) -> str:
    token = os.environ.get(token_env or "")
    if not token:
        raise RuntimeError(f"export.hub_repo_id={repo_id!r} needs a Hub token in the environment variable "
                           f"{token_env!r}, which is not set")
    from huggingface_hub import HfApi
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        local = folder
        if storage.is_gcs(folder):
            local = tmp
            for n in storage.listdir(folder):
                storage.download_file(storage.join(folder, n), os.path.join(tmp, n))
        api.upload_folder(folder_path=local, repo_id=repo_id, commit_message="automem_jax export")
    return f"https://huggingface.co/{repo_id}"


def phase_report(run: Run) -> dict:
    from automem_jax.report import build_report
    path = build_report(run.workdir) if is_writer() else ""
    log.info("report: %s", path)
    return {"report": path}


# The units that need the accelerator: in process with inference.backend=local; with managed
# replicas, each in a child process (launch/child.py) that holds the chips only while it runs.
UNITS = {"bootstrap_train": bootstrap_train, "loop2_train": loop2_train, "export_base": export_base}

PHASES = {
    "bootstrap": phase_bootstrap, "baseline": phase_baseline, "loop1": phase_loop1, "collect": phase_collect,
    "loop2": phase_loop2, "final_eval": phase_final_eval, "export": phase_export, "report": phase_report,
}
