"""Crafter with Qwen2.5-7B-Instruct on one host: one 80 GB GPU, or a TPU v4-8 / v5e-8 host.

    python -m launch.tpu_run --config=configs/crafter_qwen25_7b.py --workdir=runs/crafter_7b \
        --config.model.checkpoint=/models/Qwen2.5-7B-Instruct --config.tokenizer=/models/Qwen2.5-7B-Instruct

The same protocol as configs/crafter_qwen25_32b.py (seeds, loop sizes, critic, LoRA recipe and
effective batch); only the model, the mesh and the memory-bound sizes change. The MiniHack and
NetHack 7B configs apply the same changes to their 32B configs.
"""

from configs import crafter_qwen25_32b as pod

# Sized for the smallest target, one GPU: fsdp=-1 then resolves to 1. On a v4-8 (4 chips) or
# v5e-8 (8 chips) host the same mesh shards weights, optimizer state and batch over the chips.
TARGET_DEVICES = 1

CHECKPOINT = "gs://YOUR_BUCKET/models/Qwen2.5-7B-Instruct"  # or a local HF folder; replace the placeholder

# Per-device micro-batch of 16k-token examples that fits one 80 GB GPU next to the 14 GiB of bf16
# weights (full remat). On a v4-8 / v5e-8 host set batch_size to the chip count and divide grad_accum.
MICRO_BATCH = 2


def to_7b(c, effective_batch: int):
    """Turns a 32B pod config into its one-host 7B twin, keeping the effective batch."""
    c.model.preset = "qwen2.5-7b"  # 28 layers, hidden 3584, 28/4 heads
    c.model.checkpoint = CHECKPOINT
    c.tokenizer = CHECKPOINT  # Qwen2.5's own chat template
    c.mesh.data = 1
    c.mesh.fsdp = -1  # every device shards parameters; 28 heads / 4 KV heads rule out tensor=8
    c.mesh.tensor = 1
    c.mesh.multi_host = False  # one host
    # Serving on one 80 GB GPU: 14.2 GiB of bf16 weights and 56 KiB of KV per token (28 layers x 2 x
    # 4 KV heads x 128 x 2 bytes), so a pool of 8 rows x 32k = 262144 tokens takes 14 GiB; the
    # two-model eval holds two engines (specialist + base): 2 x (14.2 + 14) + 2.3 GiB of prefill
    # temporaries = 59 GiB of 80. On a TPU v4-8 host: --config.inference.mesh.tensor=4
    # --config.inference.device_kind="tpu v4" (15 GiB of 32 per chip); on a v5e-8 host:
    # --config.inference.mesh.tensor=4 --config.inference.cache_tokens=131072
    # --config.inference.device_kind="tpu v5e" (11 GiB of 16). 28 heads rule out tensor=8.
    c.env.num_envs = 4  # 2 x 4 = 8 LOG/PLAN turns in flight
    c.inference.max_batch = 8
    c.inference.mesh.data = -1  # one replica per chip
    c.inference.mesh.tensor = 1
    c.inference.cache_tokens = 262144  # = max_batch x max_len
    c.inference.device_kind = "h100"  # one 80 GB GPU (A100-80GB: "a100-80gb")
    c.loop2.train.batch_size = MICRO_BATCH
    c.loop2.train.grad_accum = effective_batch // MICRO_BATCH  # same effective batch as upstream
    return c


def get_config():
    # Upstream crafter effective batch: 2 x 8 x 2 GPUs = 32.
    return to_7b(pod.get_config(), effective_batch=32)
