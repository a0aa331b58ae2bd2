"""SFT training throughput: our jitted train step against transformers + PyTorch, same model and batch.

    python bench/train.py                      # 4 layers, hidden 512, Qwen3 vocab, batch 4 x 512, f32, CPU
    python bench/train.py --ours_only --preset qwen2.5-1.5b --dtype bfloat16 --batch 8 --seq 2048  # GPU/TPU MFU

Both sides run one full-parameter AdamW step (lr 1e-5, grad clip 1.0) on the same random weights
and the same token batch, where the second half of every row is the assistant target (loss-masked
next-token cross-entropy). transformers computes logits at every position (its `labels=-100`
path); ours projects only the target positions, which is part of what is measured. The first
step of each side (compile / warm-up) is excluded. Prints tokens/s of each side, the ratio
ours / transformers (target >= 1.0), and our MFU where the device's peak is known.
"""

from __future__ import annotations

import argparse
import statistics
import time

from _pair import add_model_args, model_pair  # noqa: E402


class _OneBatch:
    """A dataset whose every step is the same batch (the trainer's dataset protocol)."""

    def __init__(self, ids, mask):
        import numpy as np
        self.batch = {"input_ids": ids, "loss_mask": mask, "attention_mask": np.ones_like(mask)}

    def num_batches(self, batch_size):
        return 1

    def batch_at(self, step, batch_size):
        return self.batch


def bench_ours(model, mcfg, ids, mask, iters, peak):
    import tempfile

    from automem_jax.training.trainer import TrainConfig, Trainer
    B = ids.shape[0]
    tc = TrainConfig(mode="full", learning_rate=1e-5, warmup_ratio=0.0, batch_size=B, grad_accum=1,
                     max_steps=iters + 1, save_every=10 ** 9, target_multiple=128, peak_flops=peak)
    with tempfile.TemporaryDirectory() as d:
        res = Trainer(model, mcfg, tc, d).fit(_OneBatch(ids, mask), log_fn=lambda r: None)
    times = [h["seconds"] for h in res.history[1:]]
    mfu = [h.get("mfu") for h in res.history[1:] if h.get("mfu") is not None]
    return statistics.median(times), (statistics.median(mfu) if mfu else None), res.history


def bench_torch(ref, ids, mask, iters):
    import torch
    labels = torch.tensor(ids, dtype=torch.long).clone()
    labels[~torch.tensor(mask)] = -100
    inp = torch.tensor(ids, dtype=torch.long)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-5, weight_decay=0.0)
    ref.train()
    times = []
    for i in range(iters + 1):
        t0 = time.perf_counter()
        out = ref(input_ids=inp, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--preset", default="", help="ours only: a qwen preset instead of the small pair")
    ap.add_argument("--ours_only", action="store_true", help="skip transformers (e.g. on a GPU/TPU host)")
    ap.add_argument("--remat", default="none", choices=["none", "full", "save_dots"])
    ap.add_argument("--peak_flops", type=float, default=0.0, help="per-device peak; 0 = look up the device")
    args = ap.parse_args()

    import jax
    import numpy as np

    from automem_jax.models import qwen, qwen_presets
    rng = np.random.default_rng(0)
    vocab = args.vocab
    if args.preset:
        mcfg = qwen_presets.preset(args.preset, dtype=args.dtype, param_dtype=args.dtype, remat=args.remat,
                           scan_layers=True)
        vocab = mcfg.vocab_size
        model, ref = qwen.init_model(mcfg, 0), None
    else:
        ref, model = model_pair(args, args.dtype)
        mcfg = model.cfg.replace(remat=args.remat)
    ids = rng.integers(0, vocab, (args.batch, args.seq)).astype(np.int32)
    mask = np.zeros((args.batch, args.seq), bool)
    mask[:, args.seq // 2:] = True
    tokens = args.batch * args.seq

    print(f"device: {jax.devices()[0].device_kind}; model: {mcfg.num_layers} layers, hidden {mcfg.hidden_size}, "
          f"vocab {mcfg.vocab_size}, {mcfg.num_params():,} params, {args.dtype}; batch {args.batch} x {args.seq}, "
          f"targets {int(mask.sum())}")
    t_ours, mfu, hist = bench_ours(model, mcfg, ids, mask, args.iters, args.peak_flops)
    print(f"ours:         {tokens / t_ours:10.0f} tokens/s  ({t_ours * 1e3:.0f} ms/step, loss {hist[-1]['loss']:.3f})"
          + (f", MFU {mfu:.1%}" if mfu is not None else ", MFU n/a (unknown device peak; pass --peak_flops)"))
    if args.ours_only or ref is None:
        return
    t_ref = bench_torch(ref, ids, mask, args.iters)
    print(f"transformers: {tokens / t_ref:10.0f} tokens/s  ({t_ref * 1e3:.0f} ms/step)")
    print(f"ratio ours / transformers: {t_ref / t_ours:.2f}x  (target >= 1.0)")


if __name__ == "__main__":
    main()
