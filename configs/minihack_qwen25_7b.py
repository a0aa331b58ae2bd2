"""MiniHack (the paper's 8 tasks) with Qwen2.5-7B-Instruct on one host (one GPU, v4-8 or v5e-8).

    python -m launch.tpu_run --config=configs/minihack_qwen25_7b.py --workdir=runs/minihack_7b \
        --config.env.levels_path=/opt/boxoban-levels ...

configs/minihack_qwen25_32b.py with the one-host changes of configs/crafter_qwen25_7b.py.
"""

from configs import minihack_qwen25_32b as pod
from configs.crafter_qwen25_7b import TARGET_DEVICES, to_7b  # noqa: F401


def get_config():
    # Upstream minihack effective batch: 2 x 4 x 2 GPUs = 16.
    return to_7b(pod.get_config(), effective_batch=16)
