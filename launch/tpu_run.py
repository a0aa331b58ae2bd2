"""The main job: `python -m launch.tpu_run --config=configs/tiny.py --workdir=runs/tiny`.

Run the same command on every host of a TPU pod. The workdir (local or gs://) records each
finished stage in stages/<name>/DONE, so re-running the command resumes after the last one.

The library (jax, models, the stages) is imported inside the checks and the run, not here: a flag
or config error answers before those imports, which take seconds.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import re
import sys
import time

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import ConfigDict, config_flags

from automem_jax import storage
from automem_jax.parallel import hosts

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "ml_collections config file")
_WORKDIR = flags.DEFINE_string("workdir", "runs/tiny", "run folder: local path or gs://bucket/path")
_STAGES = flags.DEFINE_string("stages", None, "comma-separated subset of the config's stages to run")

log = logging.getLogger("automem_jax")

# The stages `--stages` and the config's `stages` may name, in the order a full run takes them;
# launch.stages.STAGES holds one function per name.
STAGE_ORDER = ("bootstrap", "baseline", "loop1", "collect", "loop2", "final_eval", "export", "report")


def _stage_done(workdir: str, name: str) -> bool:
    return hosts.primary(lambda: storage.exists(storage.join(workdir, "stages", name, "DONE")), f"stage done {name}")


def _mark_done(workdir: str, name: str, result: dict) -> None:
    if not storage.primary_host():
        return
    storage.write_text(storage.join(workdir, "stages", name, "result.json"),
                       json.dumps(result, indent=2, default=str) + "\n")
    storage.write_text(storage.join(workdir, "stages", name, "DONE"), time.strftime("%Y-%m-%dT%H:%M:%SZ\n"))


def _sync(tag: str) -> None:
    """Multi-host barrier: what process 0 wrote is visible to every host before any reads it. The
    coordinator's barrier, not a device collective: a stage may keep hosts apart for hours."""
    hosts.barrier(tag)


def run(cfg, workdir: str, stages: list[str]) -> None:
    import jax

    from launch.run import Run
    if jax.process_count() > 1:
        storage.share(workdir)  # from here on only process 0 writes under the workdir
    if storage.primary_host():
        storage.makedirs(workdir)
        storage.write_text(storage.join(workdir, "config.json"), cfg.to_json_best_effort(indent=2) + "\n")
    _sync("automem start")
    ctx = Run(cfg, workdir)
    try:
        _run_stages(ctx, workdir, stages)
    finally:
        ctx.release_inference()  # managed replicas never outlive the job


def _run_stages(ctx, workdir: str, stages: list[str]) -> None:
    from launch.stages import STAGES
    if tuple(STAGES) != STAGE_ORDER:
        raise RuntimeError(f"launch.stages.STAGES {list(STAGES)} differs from tpu_run.STAGE_ORDER {list(STAGE_ORDER)}")
    for name in stages:
        if _stage_done(workdir, name):
            log.info("stage %s: already done in %s, skipping", name, workdir)
            continue
        log.info("stage %s: start", name)
        t0, tin, tout = time.perf_counter(), ctx.tokens_in, ctx.tokens_out
        result = STAGES[name](ctx)
        result.update(seconds=time.perf_counter() - t0, tokens_in=ctx.tokens_in - tin,
                      tokens_out=ctx.tokens_out - tout)
        _mark_done(workdir, name, result)
        _sync(f"automem stage {name}")
        log.info("stage %s: done in %.1f s", name, result["seconds"])


def validate_config(cfg, stages: list[str]):
    """Cheap checks before anything is written, so a typo never costs a half-written workdir.
    Every path the stages read is checked here (the tokenizer is loaded, weights are not).
    Returns the model's QwenConfig (for `validate_devices`)."""
    from automem_jax.models import qwen, qwen_presets
    from automem_jax.parallel.mesh import MeshConfig
    from launch import config as lc
    try:
        _check_placeholders(cfg, stages)
        runtime = dict(dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                       scan_layers=cfg.model.scan_layers, remat=cfg.model.remat)
        if not cfg.model.checkpoint:
            model_cfg = qwen_presets.preset(cfg.model.preset, **runtime)
        else:
            model_cfg = _read("model.checkpoint", cfg.model.checkpoint,
                              lambda: qwen.QwenConfig.from_hf(cfg.model.checkpoint, **runtime))
        MeshConfig.from_any(cfg.mesh.to_dict())
        validate_inference(cfg, stages, model_cfg)
        from automem_jax.envs import KNOWN_ENVS
        names = lc.env_names(cfg)
        if not names:
            raise ValueError("env.name is empty")
        for env in names:
            if env not in KNOWN_ENVS and not env.startswith("minihack:"):
                raise ValueError(f"env.name {env!r}: expected one of {', '.join(KNOWN_ENVS)} or minihack:<task>")
        structure = (_read("env.structure", cfg.env.structure, lambda: lc.load_structure(cfg))
                     if cfg.env.structure else lc.load_structure(cfg))
        structure.validate()
        _check_levels(cfg, names)
        _check_nle_text(cfg)
        for field in ("eval.seeds", "bootstrap.seeds"):
            sec, key = field.split(".")
            try:
                lc.parse_seeds(cfg[sec][key])
            except ValueError as e:
                raise ValueError(f"{field}: {e}") from None
        if cfg.final_eval.seeds:
            lc.parse_seeds(cfg.final_eval.seeds)
        _check_heldout(cfg, stages)
        _check_loop2_choices(cfg)
        for sec in ("bootstrap", "loop2"):
            try:
                tcfg = lc.train_config(cfg[sec].train)
                lc.data_config(cfg[sec].data)
            except (ValueError, TypeError) as e:
                raise ValueError(f"{sec}: {e}") from None
            _check_lora(sec, tcfg)
        vocab = cfg.bootstrap.get("tokenizer_vocab", 0)
        if vocab < 0 or 0 < vocab < 384:
            raise ValueError(f"bootstrap.tokenizer_vocab {vocab}: expected 0 (keep the tokenizer) or at least 384")
        if cfg.bootstrap.enabled and "bootstrap" in stages:
            if any(n not in ("craftax", "crafter") for n in names):
                raise ValueError("bootstrap.enabled: the scripted teacher plays Craftax/Crafter only; "
                                 f"env.name is {cfg.env.name!r}")
        if "loop1" in stages:
            lc.loop1_config(cfg)
        if _critic_used(cfg, stages):
            lc.make_critic(cfg)
        if cfg.collect.policy not in ("base", "teacher"):
            raise ValueError(f"collect.policy {cfg.collect.policy!r}: expected base or teacher")
        if cfg.collect.policy == "teacher" and any(n not in ("craftax", "crafter") for n in names):
            raise ValueError("collect.policy=teacher: the scripted teacher plays Craftax/Crafter only")
        if cfg.loop2.judge not in ("critic", "heuristic"):
            raise ValueError(f"loop2.judge {cfg.loop2.judge!r}: expected critic or heuristic")
        # Last: loading the tokenizer is the slowest check (seconds), the cheap ones answer first.
        if set(stages) - {"report"}:
            tok = _check_tokenizer(cfg, model_cfg)
            _check_prompt_fits(cfg, stages, tok, structure, names)
    except (ValueError, FileNotFoundError, TypeError, KeyError) as e:
        raise app.UsageError(f"config: {e}") from None
    return model_cfg


def _check_heldout(cfg, stages: list[str]) -> None:
    """eval.heldout_seeds must share no seed with any set the run learns or chooses on."""
    from launch import config as lc
    text = cfg.eval.get("heldout_seeds", "")
    if not text:
        return
    try:
        held = set(lc.parse_seeds(text))
    except ValueError as e:
        raise ValueError(f"eval.heldout_seeds: {e}") from None
    evals = lc.parse_seeds(cfg.eval.seeds)
    others = {"eval.seeds": evals,
              # the same draw stage_collect makes
              "collect seeds": lc.collect_seeds(cfg.collect.episodes, cfg.collect.seed_base, evals)}
    if cfg.bootstrap.enabled:
        others["bootstrap.seeds"] = lc.parse_seeds(cfg.bootstrap.seeds)
    for name, seeds in others.items():
        both = sorted(held & set(seeds))
        if both:
            raise ValueError(f"eval.heldout_seeds {text!r} overlap {name} at {both[:10]}: held-out seeds must be "
                             "disjoint from every seed the run trains or chooses on")


def _check_loop2_choices(cfg) -> None:
    """loop2.max_examples and the decider's menu."""
    l2 = cfg.loop2
    cap = l2.get("max_examples", 0)
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 0:
        raise ValueError(f"loop2.max_examples {cap!r}: expected an integer >= 0 (0 = no cap)")
    if cap and cap < l2.min_examples:
        raise ValueError(f"loop2.max_examples {cap} is below loop2.min_examples {l2.min_examples}")
    d = l2.get("decider")
    if not d or not d.get("enabled", False):
        return
    from automem_jax.loops.decider import Options
    try:
        opts = Options.from_config(l2, l2.train.lora_rank)
    except (ValueError, TypeError) as e:
        raise ValueError(f"loop2.decider: {e}") from None
    over = [r for r in opts.lora_ranks if r > l2.train.lora_rank]
    if over:
        # Replicas are started for loop2.train.lora_rank; a larger adapter would not load.
        raise ValueError(f"loop2.decider.lora_ranks {over} exceed loop2.train.lora_rank {l2.train.lora_rank}")


def _critic_used(cfg, stages: list[str]) -> bool:
    d = cfg.loop2.get("decider") or {}
    decides = bool(d.get("enabled", False) and d.get("use_critic", True))
    return "loop1" in stages or ("loop2" in stages and (cfg.loop2.judge == "critic" or decides))


def _first_line(e: BaseException) -> str:
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return lines[0] if lines else type(e).__name__


def _last_line(e: BaseException) -> str:
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return lines[-1] if lines else type(e).__name__


def _read(field: str, path: str, fn):
    """fn(), which reads `path`; a missing file or an unreachable bucket names the config field."""
    try:
        return fn()
    except FileNotFoundError as e:
        why = "not found" if e.errno is not None or str(e).strip("'\"") == path else str(e)
        raise FileNotFoundError(f"{field} {path!r}: {why}") from None
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{field} {path!r}: {e}") from None
    except Exception as e:  # noqa: BLE001 - google-auth and network errors share no base class
        raise ValueError(f"{field} {path!r}: cannot read it ({type(e).__name__}: {_first_line(e)})") from None


def _check_placeholders(cfg, stages: list[str]) -> None:
    """Template values not filled in (configs/*_qwen25_*.py) fail before any gs:// access. Not the
    tokenizer: a placeholder there defaults to the checkpoint folder (tokenizer_source)."""
    from automem_jax.models.tokenizer import is_placeholder
    fields = ["model.checkpoint", "env.structure", "env.levels_path"]
    if _critic_used(cfg, stages) and cfg.critic.kind != "heuristic":
        fields += ["critic.base_url", "critic.model"]
    for field in fields:
        sec, key = field.split(".")
        value = cfg[sec].get(key, "")
        if is_placeholder(value):
            raise ValueError(f"{field} {value!r} is a placeholder; pass --config.{field}=...")


def _check_nle_text(cfg) -> None:
    from automem_jax.envs.describe_nle import TEXT_STYLES
    from automem_jax.envs.nethack import parse_extra_commands
    style = cfg.env.get("text_style", "balrog")
    if style not in TEXT_STYLES:
        raise ValueError(f"env.text_style {style!r}: expected one of {', '.join(TEXT_STYLES)}")
    try:
        parse_extra_commands(cfg.env.get("extra_commands", ""))
    except ValueError as e:
        raise ValueError(f"env.extra_commands: {e}") from None


def _check_levels(cfg, names: list[str]) -> None:
    """A set env.levels_path holds the folder of every configured Boxoban task. Unset, the env
    looks for the levels itself at the first episode ($AUTOMEM_BOXOBAN_LEVELS, then minihack's)."""
    levels = cfg.env.get("levels_path", "")
    boxoban = [n for n in names if n.startswith("minihack:Boxoban")]  # as Run.env_kwargs
    if not (levels and boxoban):
        return
    from automem_jax.envs.nethack import _boxoban_levels, resolve_task
    for name in boxoban:
        _, gym_id = resolve_task(name.split(":", 1)[1])
        try:
            _boxoban_levels(gym_id, levels)
        except (ValueError, KeyError) as e:
            raise ValueError(f"env.levels_path {levels!r} ({name}): {e}") from None


def _check_lora(sec: str, tcfg) -> None:
    """The adapters' settings resolved as training resolves them (LoRAConfig), so a bad target
    fails now and not when Loop 2 starts, hours into a pod run."""
    from launch.config import trainer_lora
    if tcfg.mode != "lora":
        return
    try:
        trainer_lora(tcfg)
    except ValueError as e:
        m = re.match(r"LoRAConfig\.(\w+): (.*)", str(e), re.S)
        field, why = (f"lora_{m[1]}", m[2]) if m else ("lora_targets", str(e))
        raise ValueError(f"{sec}.train.{field} {getattr(tcfg, field, '')!r}: {why}") from None


# Any of these makes a folder a tokenizer AutoTokenizer can load.
_TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def _check_tokenizer(cfg, model_cfg):
    """Loads the configured tokenizer from where the run will (tokenizer_source) and checks that
    the model's embedding holds its vocabulary. Returns it for the prompt-length check."""
    from automem_jax.models.gguf import is_gguf
    from automem_jax.models.packaged import is_packaged
    from automem_jax.models.tokenizer import default_tokenizer_dir, load_tokenizer, tokenizer_source
    src = tokenizer_source(cfg.tokenizer, cfg.model.checkpoint)
    if src is None:
        field, src = "tokenizer (empty: the offline Qwen3 files)", None
        default_tokenizer_dir()  # its FileNotFoundError says what to install
    else:
        field = "tokenizer" if src == cfg.tokenizer else "tokenizer (defaulting to model.checkpoint)"

    # pkg:<name> and .gguf tokenizers come from metadata that load_tokenizer reads; its errors follow.
    if src is not None and not is_packaged(src) and not is_gguf(src):
        def markers():
            if not storage.is_gcs(src) and not os.path.isdir(src):
                raise FileNotFoundError("no such folder")
            return [n for n in _TOKENIZER_MARKERS if storage.exists(storage.join(src, n))]
        if not _read(field, src, markers):
            raise FileNotFoundError(f"{field} {src!r}: holds no tokenizer ({', '.join(_TOKENIZER_MARKERS)})")
    try:
        tok = load_tokenizer(src)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a broken folder
        raise ValueError(f"{field} {src!r}: cannot load it ({type(e).__name__}: {_first_line(e)})") from None
    # As Run.trained_tokenizer: the bootstrap's own BPE then sizes the random preset's vocabulary.
    b = cfg.bootstrap
    trained = bool(b.enabled and b.get("tokenizer_vocab", 0) and not cfg.model.checkpoint)
    if not trained and len(tok) > model_cfg.vocab_size:
        raise ValueError(f"{field} {src!r}: {len(tok)} tokens, more than the model's vocab_size "
                         f"{model_cfg.vocab_size}")
    return tok


# Stages whose model answers the agent's prompts (bootstrap and a teacher collect do not).
_PLAYING_STAGES = {"baseline", "loop1", "collect", "loop2", "final_eval"}


def _check_prompt_fits(cfg, stages: list[str], tok, structure, names: list[str]) -> None:
    """The first PLAN prompt plus one reply must fit inference.max_len; otherwise every turn fails
    and the run goes on silently on fallback actions. The count is a lower bound: an empty
    observation and empty memory files (no env is reset here), no env instruction for NetHack and
    MiniHack (only a built env has its action list), and for the tiny config the configured
    tokenizer stands in for the bootstrap's domain BPE, which does not exist yet."""
    if not _PLAYING_STAGES & set(stages):
        return
    from automem_jax.agent.memory_agent import MemoryAgent
    from automem_jax.envs import describe_crafter as dc
    from automem_jax.models.tokenizer import apply_chat_template
    inf = cfg.inference
    longest, where = 0, ""
    for name in names:
        if name in ("craftax", "crafter"):
            game = "Craftax-Classic" if name == "craftax" else "Crafter"
            agent = MemoryAgent(structure, actions=dc.ACTIONS, default_action=dc.DEFAULT_ACTION,
                                instruction=dc.instruction(game))
        else:
            agent = MemoryAgent(structure, actions=(), default_action="", instruction="")
        request = next(agent.act(""))
        try:
            n = len(apply_chat_template(tok, request.messages))
        except Exception as e:  # noqa: BLE001 - a missing or broken chat template
            raise ValueError(f"tokenizer: cannot render the agent's prompt ({type(e).__name__}: "
                             f"{_first_line(e)})") from None
        if n > longest:
            longest, where = n, name
    budget = structure.budgets["max_tokens"]
    reply = min(inf.max_tokens, budget)  # each request's cap, as the clients apply it
    reply_from = (f"inference.max_tokens {reply}" if reply == inf.max_tokens else
                  f"the structure's budgets.max_tokens {reply}")
    if longest + reply > inf.max_len:
        raise ValueError(f"inference.max_len {inf.max_len} is too short: the first {where} prompt takes at "
                         f"least {longest} tokens (empty observation and memory) + {reply_from} = "
                         f"{longest + reply}")


def validate_devices(cfg, stages: list[str], model_cfg=None) -> None:
    """The checks that need the device count (after jax.distributed starts, before anything is
    written): both meshes fit the devices, and the serving memory per chip fits inference.device_kind."""
    n = _check_mesh(cfg)
    try:
        validate_inference(cfg, stages, model_cfg, n_devices=n)
    except ValueError as e:
        raise app.UsageError(f"config: {e}") from None


def _check_mesh(cfg) -> int:
    """The training mesh against the device count; returns the count."""
    import jax

    from automem_jax.parallel.mesh import MeshConfig
    n = jax.device_count()
    axes = {k: cfg.mesh[k] for k in ("data", "fsdp", "tensor")}
    try:
        MeshConfig.from_any(cfg.mesh.to_dict()).axis_sizes(n)
    except (ValueError, TypeError) as e:
        raise app.UsageError(f"config: mesh {axes} on {n} {jax.default_backend()} device(s): "
                             f"{str(e).removeprefix('mesh config: ')}") from None
    return n


GENERATION_CONFIG = ("auto", "none")
BACKENDS = ("local", "server")


def validate_inference(cfg, stages: list[str], model_cfg=None, n_devices: int | None = None) -> None:
    """The serving section: mesh, rules, paging knobs, sampling defaults; with `n_devices`, the
    serving mesh against it; and, when the config names its chip (inference.device_kind) and the
    mesh size is known (n_devices, or no -1), the per-chip serving memory."""
    from automem_jax.llm import layout
    from automem_jax.parallel.mesh import serving_mesh_config, serving_rules
    inf = cfg.inference
    if inf.backend not in BACKENDS:
        raise ValueError(f"inference.backend {inf.backend!r}: expected one of {', '.join(BACKENDS)}")
    if inf.backend == "server":
        from automem_jax.llm.replicas import ReplicaConfig
        try:
            rcfg = ReplicaConfig.from_any(inf.server)
        except (ValueError, TypeError) as e:
            raise ValueError(f"inference.server: {e}") from None
        if rcfg.api_key_env and not os.environ.get(rcfg.api_key_env):
            raise ValueError(f"inference.server.api_key_env: environment variable {rcfg.api_key_env} is not set")
    if inf.max_batch < 1 or inf.max_len < 2:
        raise ValueError(f"inference.max_batch {inf.max_batch} / max_len {inf.max_len}: expected >= 1 / >= 2")
    mesh = serving_mesh_config(inf.mesh.to_dict())
    if n_devices is not None:
        try:
            mesh.axis_sizes(n_devices)
        except ValueError as e:
            raise ValueError(f"inference.mesh {inf.mesh.to_dict()}: {e}") from None
    try:
        rules = serving_rules(inf.rules)
    except (ValueError, TypeError) as e:
        raise ValueError(f"inference.rules {inf.rules!r}: {e}") from None
    if any("fsdp" in (t if isinstance(t, tuple) else (t,)) for _, t in rules):
        raise ValueError(f"inference.rules {inf.rules!r}: the serving mesh has no fsdp axis; use data or tensor")
    if inf.page_size < 1:
        raise ValueError(f"inference.page_size {inf.page_size}: expected >= 1")
    if inf.prefill_chunk < inf.page_size:
        raise ValueError(f"inference.prefill_chunk {inf.prefill_chunk}: expected >= inference.page_size "
                         f"({inf.page_size})")
    if inf.cache_tokens < 0 or 0 < inf.cache_tokens < inf.max_len:
        raise ValueError(f"inference.cache_tokens {inf.cache_tokens}: expected 0 (max_batch x max_len) or at "
                         f"least inference.max_len ({inf.max_len}), so one request can reach max_len")
    if inf.generation_config not in GENERATION_CONFIG:
        raise ValueError(f"inference.generation_config {inf.generation_config!r}: expected one of "
                         f"{', '.join(GENERATION_CONFIG)}")
    if inf.top_p is not None and not 0 < inf.top_p <= 1:
        raise ValueError(f"inference.top_p {inf.top_p!r}: expected in (0, 1] or unset")
    rp = inf.repetition_penalty
    if rp is not None and not rp > 0:
        raise ValueError(f"inference.repetition_penalty {rp!r}: expected > 0 (1.0 = off) or unset")
    if inf.device_kind:
        device = layout.device_memory(inf.device_kind)
        n = n_devices if n_devices is not None else (
            math.prod((mesh.data, mesh.tensor)) if -1 not in (mesh.data, mesh.tensor) else None)
        if n is not None and model_cfg is not None:
            # Two engines (specialist + base) are held at once by the two-model evaluations.
            engines = 2 if {"loop2", "final_eval"} & set(stages) else 1
            mem = layout.serving_memory_for_config(cfg, n, model_cfg=model_cfg, engines=engines)
            try:
                mem.check(device)
            except ValueError as e:
                raise ValueError(f"inference (device_kind {inf.device_kind!r}, mesh {mesh.data}x{mesh.tensor}): "
                                 f"{e}") from None


def _resolve_stages(cfg) -> list[str]:
    text = _STAGES.value if _STAGES.value is not None else cfg.stages
    names = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in names if p not in STAGE_ORDER]
    if unknown:
        raise app.UsageError(f"unknown stage(s) {unknown}; known stages: {', '.join(STAGE_ORDER)}")
    return names


def main(argv) -> None:
    try:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            stream=sys.stdout, force=True)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        for name in ("httpx2", "httpcore2"):  # one INFO line per HTTP request otherwise
            logging.getLogger(name).setLevel(logging.WARNING)
        # orbax logs every save through absl at INFO; keep one line per unit of work.
        absl_logging.set_verbosity(absl_logging.WARNING)
        cfg = _loaded_config()
        stages = _resolve_stages(cfg)
        if not cfg.mesh.multi_host and cfg.inference.backend != "server":
            _check_mesh(cfg)  # the device count is known already: a mesh typo answers in seconds
        model_cfg = validate_config(cfg, stages)
        if cfg.inference.backend == "server":
            # The replicas own the accelerator while they serve; this process stays on the CPU and
            # runs training in child processes (launch/child.py), which check the devices themselves.
            import jax
            jax.config.update("jax_platforms", "cpu")
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        if cfg.mesh.multi_host:
            import jax
            jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts only; TPUs ignore it
            from automem_jax.parallel.mesh import MeshConfig, maybe_initialize_distributed
            maybe_initialize_distributed(MeshConfig.from_any(cfg.mesh.to_dict()))
        if cfg.inference.backend != "server":
            validate_devices(cfg, stages, model_cfg)
    except app.UsageError as e:
        _usage_exit(str(e))  # one line: absl's usage page would bury it
    run(cfg, _WORKDIR.value, stages)


def _usage_exit(message: str) -> None:
    print(message, file=sys.stderr)
    sys.exit(1)


def _loaded_config():
    """The --config value; config_flags defers a file's load error to the first access."""
    cfg = _CONFIG.value
    try:
        cfg.get("stages")
    except OSError as e:
        _usage_exit(f"config: cannot load the config file: {_last_line(e)}")
    return cfg


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing; a --config.<field> override that names no field becomes one line with
    the closest known name (ml_collections raises an AttributeError with a long traceback)."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as e:
        _usage_exit(_unknown_override(argv) or f"config: {_first_line(e)}")
    except OSError as e:  # the config file itself did not load
        _usage_exit(f"config: cannot load the config file: {_last_line(e)}")


def _unknown_override(argv: list[str]) -> str | None:
    """'config: unknown field a.b (did you mean a.c?)' for the first override naming no field."""
    flag = flags.FLAGS["config"]
    cfg = flag.default  # the default file, already loaded when no --config is given
    for i, arg in enumerate(argv):
        m = re.match(r"^--?config(?:=(.*))?$", arg)
        if m:
            path = m[1] if m[1] is not None else (argv[i + 1] if i + 1 < len(argv) else "")
            cfg = flag.parser.parse(path)  # the same loader as config_flags
    if not isinstance(cfg, ConfigDict):
        return None
    for arg in argv:
        m = re.match(r"^--?(?:no)?config\.([^=]+)", arg)
        if not m:
            continue
        parts, node = m[1].split("."), cfg
        for depth, key in enumerate(parts):
            if isinstance(node, ConfigDict) and key in node:
                node = node[key]
                continue
            known = sorted(node.keys()) if isinstance(node, ConfigDict) else []
            prefix = "".join(p + "." for p in parts[:depth])
            close = difflib.get_close_matches(key, known, n=1)
            hint = (f"did you mean {prefix}{close[0]}?" if close else
                    f"{prefix.rstrip('.') or 'the config'} has: {', '.join(known)}" if known else
                    f"{prefix.rstrip('.')} is not a section")
            return f"config: unknown field {m[1]} ({hint})"
    return None


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
