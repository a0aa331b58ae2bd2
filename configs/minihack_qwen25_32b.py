"""MiniHack (the paper's 8 tasks) with Qwen2.5-32B-Instruct on a TPU v5p-64 slice.

    python -m launch.tpu_run --config=configs/minihack_qwen25_32b.py --workdir=gs://BUCKET/runs/minihack \
        --config.env.levels_path=/opt/boxoban-levels --config.mesh.multi_host=True ...

Starts from configs/crafter_qwen25_32b.py (model, mesh, critic, loop sizes) and changes the env,
the episode length and upstream's MiniHack Loop-2 recipe. The two Boxoban tasks need DeepMind's
level files on every host: `git clone https://github.com/deepmind/boxoban-levels /opt/boxoban-levels`.
"""

from configs.crafter_qwen25_32b import TARGET_DEVICES, get_config as crafter_config, loop2_train  # noqa: F401

# Upstream's 8 tasks (reference §4.1), in the names automem_jax.envs.make accepts (-v0 is implied).
TASKS = ("Boxoban-Hard", "Boxoban-Medium", "MazeWalk-9x9", "MazeWalk-15x15", "Corridor-R3",
         "CorridorBattle-Dark", "Quest-Easy", "Quest-Medium")


def get_config():
    c = crafter_config()

    c.env.name = ",".join("minihack:" + t for t in TASKS)  # each task is evaluated on every eval seed
    c.env.structure_name = "minihack"  # memory/defaults/minihack.yaml
    c.env.max_steps = 100  # upstream minihack_kwargs.max_episode_steps
    # Folder holding DeepMind's boxoban-levels (medium/train/*.txt, hard/*.txt), local on every host.
    # Empty = the AUTOMEM_BOXOBAN_LEVELS environment variable, else MiniHack's own download path.
    c.env.levels_path = ""

    # Upstream's Loop-1/Loop-2 drivers pass eval.seeds 42..51 (their scaffold config.yaml lists 42..46):
    # 10 seeds per task x 8 tasks = 80 episodes.
    c.eval.seeds = "42-51"

    c.collect.max_steps = 100  # same episode length as evaluation

    c.loop2.min_examples = 300  # upstream minihack prior
    # Upstream minihack tuple 128:256:0.0:5e-5:3:2:4:...:cosine:0.05:ALL with 2 GPUs:
    # effective batch 2 x 4 x 2 = 16 = batch_size 8 x grad_accum 2 here.
    c.loop2.train = loop2_train(lora_rank=128, lora_alpha=256.0, lora_targets="ALL", epochs=3.0, grad_accum=2)
    return c
