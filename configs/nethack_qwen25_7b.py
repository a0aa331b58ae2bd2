"""NetHack (NetHackChallenge-v0) with Qwen2.5-7B-Instruct on one host (one GPU, v4-8 or v5e-8).

    python -m launch.tpu_run --config=configs/nethack_qwen25_7b.py --workdir=runs/nethack_7b ...

configs/nethack_qwen25_32b.py with the one-host changes of configs/crafter_qwen25_7b.py.
"""

from configs import nethack_qwen25_32b as pod
from configs.crafter_qwen25_7b import TARGET_DEVICES, to_7b  # noqa: F401


def get_config():
    # Upstream nle effective batch: 2 x 8 x 2 GPUs = 32.
    return to_7b(pod.get_config(), effective_batch=32)
