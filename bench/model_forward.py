"""Prefill throughput: our NNX Qwen (jitted JAX) against transformers' PyTorch Qwen3, same weights.

    python bench/model_forward.py            # 4 layers, hidden 512, batch 4 x 256, float32, CPU
    python bench/model_forward.py --dtype bfloat16 --layers 8

Both models hold the same random weights (ours is imported from the transformers folder), and the
logits are compared before timing so the two sides compute the same thing. Prints tokens/s of each
and the ratio ours / transformers (target: >= 1.0).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from _pair import add_model_args, model_pair  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from flax import nnx

    if args.threads:
        torch.set_num_threads(args.threads)
    ref, model = model_pair(args, args.dtype)

    rng = np.random.RandomState(0)
    ids_np = rng.randint(0, args.vocab, (args.batch, args.seq))
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, ids):
        return nnx.merge(graphdef, state)(ids)

    ids = jnp.asarray(ids_np)
    t0 = time.perf_counter()
    ours_logits = forward(state, ids).block_until_ready()
    compile_s = time.perf_counter() - t0
    tids = torch.tensor(ids_np)
    with torch.inference_mode():
        ref_logits = ref(input_ids=tids).logits.float().numpy()
    diff = float(np.abs(np.asarray(ours_logits) - ref_logits).max())

    def time_it(fn):
        fn()
        times = []
        for _ in range(args.iters):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    ours_s = time_it(lambda: forward(state, ids).block_until_ready())
    with torch.inference_mode():
        ref_s = time_it(lambda: ref(input_ids=tids).logits)

    tokens = args.batch * args.seq
    print(f"config: {args.layers} layers, hidden {args.hidden}, heads {args.heads}/{args.kv_heads}, mlp {args.mlp}, "
          f"vocab {args.vocab}, batch {args.batch} x {args.seq}, {args.dtype}, "
          f"devices: jax {jax.devices()[0].platform} / torch cpu ({torch.get_num_threads()} threads)")
    print(f"max |logits diff| ours vs transformers: {diff:.2e}; our first call (compile): {compile_s:.1f} s")
    print(f"automem_jax (jit):        {tokens / ours_s:10.0f} tokens/s  ({ours_s * 1e3:.1f} ms / batch)")
    print(f"transformers (PyTorch):   {tokens / ref_s:10.0f} tokens/s  ({ref_s * 1e3:.1f} ms / batch)")
    print(f"ratio ours / transformers: {ref_s / ours_s:.2f}x  (target >= 1.0)")


if __name__ == "__main__":
    main()
