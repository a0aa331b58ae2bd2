"""Generation throughput: our Engine against transformers `generate` on PyTorch, same weights.

    python bench/generate.py                 # 4 layers, hidden 512, Qwen3 vocab, 64-token prompts, 64 new tokens
    python bench/generate.py --batches 1,16 --new_tokens 128

Both sides decode greedily with EOS disabled, so every row produces exactly --new_tokens tokens;
the first token ids of both are compared before timing. Prints generated tokens/s per batch size
and the ratio ours / transformers (target >= 3x at batch 16). Then (unless --runner_episodes 0) it
measures the rollout runner: agent-steps/s for --runner_episodes (16) Craftax episodes of
--runner_steps (3) steps with every live agent's request in one generate call (the async runner),
against the runner capped at one request per generate call (target >= 4x).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from _pair import add_model_args, model_pair  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--prompt_len", type=int, default=64)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--runner_episodes", type=int, default=16, help="0 skips the runner comparison")
    ap.add_argument("--runner_steps", type=int, default=3)
    args = ap.parse_args()

    import numpy as np
    import torch

    from automem_jax.llm.engine import Engine
    from automem_jax.llm.sampling import SamplingParams
    from automem_jax.models.tokenizer import load_tokenizer

    # A large init scale keeps greedy outputs varied, so the token comparison means something.
    ref, model = model_pair(args, initializer_range=0.2)
    tok = load_tokenizer()
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    max_len = args.prompt_len + args.new_tokens + 8
    rng = np.random.RandomState(0)

    print(f"model: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}; prompt {args.prompt_len} tokens, "
          f"{args.new_tokens} new tokens, greedy, float32, CPU (torch {torch.get_num_threads()} threads)")
    for B in batches:
        prompts = [rng.randint(0, min(args.vocab, 100000), args.prompt_len).tolist() for _ in range(B)]
        eng = Engine(model, tok, max_batch=B, max_len=max_len, prefix_cache=False)
        eng.eos_ids = set()  # fixed-length outputs on both sides
        params = [SamplingParams(temperature=0, max_tokens=args.new_tokens)] * B
        eng.generate_ids(prompts, params)  # compile
        t = time.perf_counter()
        outs = eng.generate_ids(prompts, params)
        ours_s = time.perf_counter() - t

        ids = torch.tensor(prompts)
        kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                  attention_mask=torch.ones_like(ids), pad_token_id=0, eos_token_id=None)
        with torch.inference_mode():
            ref.generate(ids[:, :8], **{**kw, "max_new_tokens": 2, "min_new_tokens": 2,
                                        "attention_mask": torch.ones_like(ids[:, :8])})  # warm-up
            t = time.perf_counter()
            gen = ref.generate(ids, **kw)
            ref_s = time.perf_counter() - t
        theirs = gen[:, args.prompt_len:].tolist()
        agree = np.mean([o.token_ids[:8] == th[:8] for o, th in zip(outs, theirs)])
        n = B * args.new_tokens
        print(f"batch {B:3d}: automem_jax {n / ours_s:8.1f} tok/s   transformers {n / ref_s:8.1f} tok/s   "
              f"ratio {ref_s / ours_s:5.2f}x   (first 8 tokens agree on {agree:.0%} of rows; "
              f"compiles {eng.stats.compiles})")


    if args.runner_episodes:
        runner_bench(model, tok, args)


def runner_bench(model, tok, args) -> None:
    import shutil
    import time as _time

    from automem_jax.llm.client import EngineClient
    from automem_jax.llm.engine import Engine
    from automem_jax.memory.structure import MemoryStructure
    from automem_jax.rollout.runner import Runner

    n = args.runner_episodes
    engine = Engine(model, tok, max_batch=2 * n, max_len=2048)
    client = EngineClient(engine, max_tokens=16, temperature=1.0)
    structure = MemoryStructure.default("crafter")
    rates = {}
    # "batched": the async runner (every in-flight request shares the engine's steps); the baseline
    # is the tick runner capped at one request per generate call.
    for label, per_call in (("batched", None), ("one request per call", 1)):
        for warm in (True, False):  # the first pass compiles (env step, prefill buckets, decode)
            run_dir = tempfile.mkdtemp(prefix="bench-runner-")
            runner = Runner(client, structure, run_dir, "craftax", num_envs=n,
                            max_steps=1 if warm else args.runner_steps, progress=False,
                            max_requests_per_call=per_call)
            t = _time.perf_counter()
            runner.run(list(range(1000, 1000 + n)))
            wall = _time.perf_counter() - t
            shutil.rmtree(run_dir, ignore_errors=True)
        rates[label] = runner.stats.agent_steps / wall
        print(f"runner, {n} Craftax episodes x {args.runner_steps} steps, {label:22s}: "
              f"{rates[label]:6.2f} agent-steps/s ({runner.stats.generate_calls} generate calls)")
    print(f"runner ratio batched / one request per call: {rates['batched'] / rates['one request per call']:.2f}x "
          f"(target >= 4x)")


if __name__ == "__main__":
    main()
