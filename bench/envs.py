"""Text-env throughput, each against its peer measured in the same run.

1. Craftax-Classic (jitted vmap step + NumPy describer) at batch 1 and 64, against the original crafter
   with the same describer (RGB rendering off for both: the text does not need it).
   Target: batch 64 >= 20x crafter.
2. NetHackChallenge in the worker pool with 1 and 2 worker processes (16 episodes each).
   Target: 2 workers >= 1.6x 1 worker.

Random BALROG actions; an episode that ends is reset at once with a new seed, so "with resets"
includes world generation as it comes (crafter's takes ~1 s); "steps only" leaves reset time out.
Compilation and worker start-up happen before timing. Peers are timed in alternating rounds and the
median round is reported, so that load from other processes on a shared machine hits both sides.
Run: ``python bench/envs.py [--rounds N] [--quick]``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np


class _Timer:
    """Per-round rates of one configuration."""

    def __init__(self):
        self.with_resets, self.steps_only = [], []

    def add(self, steps, total, reset_time):
        self.with_resets.append(steps / total)
        self.steps_only.append(steps / max(total - reset_time, 1e-9))

    def median(self):
        return statistics.median(self.with_resets), statistics.median(self.steps_only)


def crafter_rounds(steps_per_round: int, rng):
    from automem_jax.envs.crafter import CrafterTextEnv

    env = CrafterTextEnv()
    env.reset(seed=0)
    state = {"seed": 1}

    def round_():
        t_reset, n = 0.0, 0
        t0 = time.perf_counter()
        while n < steps_per_round:
            _, _, term, trunc, _ = env.step(env.actions[rng.integers(17)])
            n += 1
            if term or trunc:
                t1 = time.perf_counter()
                env.reset(seed=state["seed"])
                state["seed"] += 1
                t_reset += time.perf_counter() - t1
        return n, time.perf_counter() - t0, t_reset

    return round_


def craftax_rounds(batch: int, batch_steps: int, rng):
    from automem_jax.envs.craftax import CraftaxClassicBatch

    env = CraftaxClassicBatch(num_envs=batch)
    t0 = time.perf_counter()
    env.reset_batch(list(range(batch)))
    env.step_batch(["Noop"] * batch)   # compile the step
    env.reset_batch([10_000], [0])     # and the one-slot reset
    compile_s = time.perf_counter() - t0
    state = {"seed": 20_000}

    def round_():
        t_reset, n = 0.0, 0
        t0 = time.perf_counter()
        for _ in range(batch_steps):
            res = env.step_batch([env.actions[k] for k in rng.integers(0, 17, batch)])
            n += batch
            done = [i for i, r in enumerate(res) if r.done]
            if done:
                t1 = time.perf_counter()
                s = state["seed"]
                env.reset_batch(list(range(s, s + len(done))), done)
                state["seed"] = s + len(done)
                t_reset += time.perf_counter() - t1
        return n, time.perf_counter() - t0, t_reset

    return round_, compile_s


def pool_rounds(workers: int, episodes: int, batch_steps: int, rng):
    from automem_jax.envs import make

    pool = make("nethack", num_envs=episodes, num_workers=workers)
    pool.reset_batch(list(range(episodes)))
    acts = pool.actions
    state = {"seed": 1000}

    def round_():
        n, t_reset = 0, 0.0
        t0 = time.perf_counter()
        for _ in range(batch_steps):
            res = pool.step_batch([acts[j] for j in rng.integers(0, len(acts), episodes)])
            n += episodes
            done = [i for i, r in enumerate(res) if r.done]
            if done:
                t1 = time.perf_counter()
                s = state["seed"]
                pool.reset_batch(list(range(s, s + len(done))), done)
                state["seed"] = s + len(done)
                t_reset += time.perf_counter() - t1
        return n, time.perf_counter() - t0, t_reset

    round_()  # warm the workers (lazy env creation, glyph tables)
    return round_, pool


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="alternating timed rounds per configuration")
    ap.add_argument("--quick", action="store_true", help="short rounds (a smoke run)")
    args = ap.parse_args()
    scale = 0.25 if args.quick else 1.0
    rng = np.random.default_rng(0)
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start; "
          f"median of {args.rounds} alternating rounds")

    runs = {"crafter": crafter_rounds(int(600 * scale), rng)}
    compile_s = {}
    for b, k in ((1, int(400 * scale)), (64, int(30 * scale))):
        runs[f"craftax{b}"], compile_s[b] = craftax_rounds(b, k, rng)
    pools = {}
    for w in (1, 2):
        runs[f"pool{w}"], pools[w] = pool_rounds(w, 16, int(60 * scale), rng)
    timers = {name: _Timer() for name in runs}
    for _ in range(args.rounds):
        for name, round_ in runs.items():
            timers[name].add(*round_())
    for p in pools.values():
        p.close()

    cw, cs = timers["crafter"].median()
    print(f"crafter + describer   : {cw:9.0f} steps/s with resets, {cs:9.0f} steps only")
    for b in (1, 64):
        w, s = timers[f"craftax{b}"].median()
        print(f"craftax batch {b:3d}     : {w:9.0f} steps/s with resets, {s:9.0f} steps only "
              f"(compile {compile_s[b]:.0f} s)")
        print(f"  ratio vs crafter    : {w / cw:6.1f}x with resets, {s / cs:6.1f}x steps only"
              + ("   (target >= 20x)" if b == 64 else ""))
    p1, p2 = timers["pool1"].median()[0], timers["pool2"].median()[0]
    print(f"NLE pool 1 worker     : {p1:9.0f} steps/s (16 NetHackChallenge episodes)")
    print(f"NLE pool 2 workers    : {p2:9.0f} steps/s")
    print(f"  ratio 2 vs 1 worker : {p2 / p1:6.2f}x   (target >= 1.6x)")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
