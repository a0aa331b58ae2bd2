"""Crafter with Qwen2.5-32B-Instruct on a TPU v5p-64 slice: the paper's protocol end to end.

    python -m launch.tpu_run --config=configs/crafter_qwen25_32b.py --workdir=gs://BUCKET/runs/crafter \
        --config.model.checkpoint=gs://BUCKET/models/Qwen2.5-32B-Instruct \
        --config.tokenizer=gs://BUCKET/models/Qwen2.5-32B-Instruct --config.mesh.multi_host=True \
        --config.critic.base_url=https://... --config.critic.model=...

Run the same command on every host of the slice (see the README, "Running on a TPU pod"). The
MiniHack and NetHack 32B configs and the 7B configs start from this file and change only what differs.
Every knob not set here keeps its configs/tiny.py default.
"""

from configs.tiny import data_config, get_config as tiny_config, train_config

# Devices this config is sized for: a v5p-64 slice = 32 chips (JAX sees one device per chip),
# 8 hosts x 4 chips. tests/test_configs.py checks the memory arithmetic against this number.
TARGET_DEVICES = 32

# A Hugging Face folder (local or gs://) holding Qwen2.5-32B-Instruct: replace the placeholder here, or
# pass both --config.model.checkpoint and --config.tokenizer (the tokenizer lives in the same folder).
CHECKPOINT = "gs://YOUR_BUCKET/models/Qwen2.5-32B-Instruct"

# No bootstrap: a 32B instruct model already writes ops (configs/crafter_qwen25_05b.py shows the warm start).
POD_STAGES = "baseline,loop1,collect,loop2,final_eval,export,report"


def loop2_train(**overrides):
    """Upstream's LoRA recipe shape (§3.4): LLaMA-Factory defaults we match, per-env knobs passed in."""
    base = dict(
        mode="lora",
        lora_dropout=0.0,
        learning_rate=5e-5,
        schedule="cosine",
        warmup_ratio=0.05,
        grad_clip=1.0,  # upstream max_grad_norm
        # batch_size is global: 8 = one 16k-token example per fsdp shard (data x fsdp = 8 here).
        batch_size=8,
        target_multiple=512,  # targets run to ~4k tokens: coarser padding keeps compiled shapes few
        log_every=5,  # upstream logging_steps
        seed=42,  # upstream seed
        remat="full",  # save_dots would keep every matmul output of 64 layers x 16k tokens: too big
    )
    base.update(overrides)
    return train_config(**base)


def get_config():
    c = tiny_config()

    c.model.preset = "qwen2.5-32b"  # shapes for validation and --describe; the weights come from checkpoint
    c.model.checkpoint = CHECKPOINT  # load these weights instead of a random init
    c.model.dtype = "bfloat16"  # TPU matmuls in bf16
    c.model.param_dtype = "bfloat16"  # 61 GiB of weights; f32 would double it for nothing (LoRA trains)
    c.model.scan_layers = True  # compile one layer, not 64
    c.model.remat = "full"  # recompute each layer in the backward pass (16k-token examples)

    # 32 devices: tensor=4 splits heads (40 q / 8 kv), mlp (27648) and vocab evenly inside one host's
    # 4 chips; fsdp takes the other 8 and also shards the batch. About 1.9 GiB of bf16 weights per chip.
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 4
    c.mesh.multi_host = False  # pass --config.mesh.multi_host=True on a multi-host slice

    # Qwen2.5's own tokenizer and chat template (its default system prompt is part of upstream's prompts).
    c.tokenizer = CHECKPOINT

    c.stages = POD_STAGES

    c.env.name = "crafter"  # the original game, as upstream (craftax: same text, JAX world, not the same maps)
    c.env.structure_name = "crafter"  # memory/defaults/crafter.yaml
    c.env.max_steps = 2000  # upstream crafter_kwargs.max_episode_steps
    c.env.num_envs = 32  # eval uses 10 slots; collect's 100 episodes use all 32
    c.env.feedback_on_invalid_action = True  # upstream eval.feedback_on_invalid_action (every env)

    c.inference.max_batch = 64  # 2 x num_envs: every agent's LOG and PLAN turn decodes in one batch
    c.inference.max_len = 32768  # upstream serving context (any one request may grow to it)
    # Serving layout: one replica per host (data=8), tensor parallel over the host's 4 chips. Per chip
    # (automem_jax.llm.layout, checked by tests/test_configs.py and at launch): 15.3 GiB of bf16
    # weights and 64 KiB of KV per token (64 layers x 2 x 8/4 KV heads x 128 x 2 bytes). The pool is
    # paged: 327680 tokens (10 x 32k, ~5k per row on average; upstream's vLLM on 2 x 80 GB held ~300k)
    # take 20 GiB. The two-model eval holds two engines: 2 x (15.3 + 20) + 2.6 GiB of step temporaries
    # = 73 GiB of 95 (max_batch x max_len = 2M tokens would need 128 GiB per engine).
    c.inference.mesh.data = 8
    c.inference.mesh.tensor = 4  # 40 heads, 8 KV heads, mlp 27648 and vocab 152064 split evenly
    c.inference.cache_tokens = 327680
    c.inference.device_kind = "tpu v5p"  # 95 GiB HBM per chip
    c.inference.max_tokens = 4096  # upstream max tokens per model turn
    c.inference.temperature = 1.0  # upstream samples at T = 1

    c.eval.seeds = "42-51"  # upstream: 10 Crafter episodes on fixed seeds 42..51
    c.eval.heldout_seeds = "52-61"  # report-only seeds, disjoint from eval (42-51) and collect (>= 1000)

    c.bootstrap.enabled = False  # see POD_STAGES

    # The critic: any OpenAI-compatible chat endpoint (OpenAI, vLLM, Anthropic's or Gemini's
    # OpenAI-compatibility endpoints). Set base_url/model on the command line; the key is read
    # from the named environment variable on every host and never written to the workdir.
    c.critic.kind = "openai"
    c.critic.base_url = "https://YOUR_CRITIC_ENDPOINT/v1"
    c.critic.model = "YOUR_CRITIC_MODEL"
    c.critic.api_key_env = "OPENAI_API_KEY"
    c.critic.max_retries = 5  # a long run should ride out transient API errors
    c.critic.max_tokens = 16384  # a revised structure plus its rationale can be long
    c.critic.max_turns = 100  # tool-call turns per session (upstream sessions allowed 300)

    c.loop1.revisions = 5  # upstream NUM_ITERATIONS
    c.loop1.fresh_attempts = 3  # upstream MAX_FRESH_ATTEMPTS
    c.loop1.continuation_retries = 1  # upstream MAX_CONTINUATION_RETRIES
    c.loop1.accept = "strict"  # accept iff the mean beats the best so far

    c.collect.episodes = 100  # upstream NUM_TRAINING_EPISODES
    c.collect.seed_base = 999  # upstream random.seed(999); randint(1000, 99999), eval seeds excluded
    c.collect.max_steps = 2000  # same episode length as evaluation
    c.collect.policy = "base"  # upstream: the base model plays the final Loop-1 structure

    c.loop2.iterations = 5  # upstream NUM_ITERATIONS
    c.loop2.min_examples = 600  # upstream crafter prior (min_target_examples)
    c.loop2.top_pct = 100  # upstream default: no return filter
    c.loop2.allow_fewer = False  # a 32B run stops with an error rather than skip Loop 2
    # Upstream has no cap; 100 x 2000-step episodes can give ~10^5 accepted phases.
    c.loop2.max_examples = 3000
    c.loop2.decider.lr_scales = "0.5,1,2"
    c.loop2.decider.epochs_scales = "0.5,1"  # 4 epochs of a 32B LoRA is the costly end already
    c.loop2.decider.lora_ranks = ""  # the configured rank only (minihack/nethack set their own)
    c.loop2.decider.top_pcts = "100,50"
    c.loop2.data = data_config(cutoff_len=16384, loss_on="all")  # upstream cutoff_len, all assistant turns
    # Upstream crafter tuple 256:512:0.0:5e-5:4:2:8:...:cosine:0.05:ATTN with 2 GPUs:
    # effective batch 2 x 8 x 2 = 32 = batch_size 8 x grad_accum 4 here.
    c.loop2.train = loop2_train(lora_rank=256, lora_alpha=512.0, lora_targets="ATTN", epochs=4.0, grad_accum=4)

    c.export.dtype = "bfloat16"  # the merged 32B model as released weights are stored
    return c
