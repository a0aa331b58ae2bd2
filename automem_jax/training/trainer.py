"""Sharded supervised fine-tuning of the NNX Qwen policy: full or LoRA-only updates.

One jitted step = `grad_accum` micro-batches scanned on device, a token-weighted mean of the
masked next-token loss over the whole global batch, AdamW with warm-up + cosine decay and global
norm clipping (optax). The vocab projection runs only at target positions, in chunks under
`jax.checkpoint`, so a 16k cutoff never materialises a [T, vocab] float32 tensor.

Parallelism comes from the mesh and the logical-axis rules of `parallel/mesh.py`: parameters keep
the shardings they were created with, batches are split over (data, fsdp). Data order is a pure
function of (seed, step) (`SFTDataset.batch_at`), so resuming from a checkpoint replays exactly
the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from automem_jax import storage
from automem_jax.models.qwen import Qwen
from automem_jax.models.qwen import QwenConfig
from automem_jax.parallel.mesh import named_sharding

log = logging.getLogger(__name__)

MODES = ("lora", "full")
SCHEDULES = ("cosine", "linear", "constant")

# Dense bf16 peak FLOP/s per chip, for MFU. Unknown devices (CPU) report MFU only when
# `peak_flops` is configured.
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12, "NVIDIA L4": 121e12,
}


@dataclass
class TrainConfig:
    """SFT recipe. Defaults follow upstream's Loop-2 LoRA priors where they exist."""

    mode: str = "lora"                 # "lora": train adapters, base frozen; "full": every Param
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "ATTN"         # ATTN | QV | MLP | ALL | "q,v,down"
    learning_rate: float = 5e-5
    schedule: str = "cosine"
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 1.0             # global norm; 0 = off
    batch_size: int = 2                # examples per micro-batch (global, split over data axes)
    grad_accum: int = 8                # micro-batches per optimizer step
    epochs: float = 1.0
    max_steps: int = 0                 # > 0 overrides epochs
    target_multiple: int = 64          # target-position count is padded to a multiple (few shapes)
    loss_chunk: int = 512              # target positions per vocab-projection chunk
    log_every: int = 1
    eval_every: int = 0                # 0 = eval only at the end (when an eval set is given)
    save_every: int = 0                # 0 = save only at the end
    keep: int = 2                      # checkpoints kept
    seed: int = 42
    remat: str | None = None           # override the model's remat policy for training
    peak_flops: float = 0.0            # per device; 0 = look up the device kind

    def __post_init__(self):
        problems = []
        if self.mode not in MODES:
            problems.append(f"mode={self.mode!r}: expected one of {MODES}")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule={self.schedule!r}: expected one of {SCHEDULES}")
        for name in ("batch_size", "grad_accum", "target_multiple", "loss_chunk", "log_every", "keep"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                problems.append(f"{name}={v!r}: expected an integer >= 1")
        for name in ("max_steps", "eval_every", "save_every", "lora_rank"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                problems.append(f"{name}={v!r}: expected an integer >= 0")
        if self.mode == "lora" and self.lora_rank < 1:
            problems.append(f"lora_rank={self.lora_rank}: expected >= 1 in lora mode")
        if not (self.learning_rate > 0):
            problems.append(f"learning_rate={self.learning_rate!r}: expected > 0")
        if not (0 <= self.warmup_ratio < 1):
            problems.append(f"warmup_ratio={self.warmup_ratio!r}: expected in [0, 1)")
        if not (0 <= self.min_lr_ratio <= 1):
            problems.append(f"min_lr_ratio={self.min_lr_ratio!r}: expected in [0, 1]")
        if self.epochs <= 0 and self.max_steps == 0:
            problems.append("epochs must be > 0 when max_steps is 0")
        if self.grad_clip < 0 or self.weight_decay < 0:
            problems.append("grad_clip and weight_decay must be >= 0")
        if self.remat not in (None, "none", "full", "save_dots"):
            problems.append(f"remat={self.remat!r}: expected none, full or save_dots")
        if problems:
            raise ValueError("TrainConfig: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, d) -> "TrainConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"TrainConfig: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum


@dataclass
class TrainResult:
    model: Qwen
    history: list[dict] = field(default_factory=list)
    steps: int = 0
    first_loss: float = float("nan")
    final_loss: float = float("nan")
    eval_loss: float | None = None
    resumed_from: int | None = None
    checkpoint_dir: str = ""

    def summary(self) -> dict:
        return {"steps": self.steps, "first_loss": self.first_loss, "final_loss": self.final_loss,
                "eval_loss": self.eval_loss, "resumed_from": self.resumed_from,
                "checkpoint_dir": self.checkpoint_dir}


def lr_schedule(tcfg: TrainConfig, total_steps: int) -> optax.Schedule:
    warmup = int(round(tcfg.warmup_ratio * total_steps))
    peak, end = tcfg.learning_rate, tcfg.learning_rate * tcfg.min_lr_ratio
    decay = max(total_steps - warmup, 1)
    if tcfg.schedule == "constant":
        main = optax.constant_schedule(peak)
    elif tcfg.schedule == "linear":
        main = optax.linear_schedule(peak, end, decay)
    else:
        main = optax.cosine_decay_schedule(peak, decay, alpha=tcfg.min_lr_ratio)
    if warmup == 0:
        return main
    # Warm-up from lr/warmup rather than 0, so step 0 is not wasted.
    return optax.join_schedules([optax.linear_schedule(peak / warmup, peak, warmup), main], [warmup])


def make_optimizer(tcfg: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    sched = lr_schedule(tcfg, total_steps)
    parts = []
    if tcfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(tcfg.grad_clip))
    parts.append(optax.adamw(sched, b1=tcfg.adam_b1, b2=tcfg.adam_b2, eps=tcfg.adam_eps,
                             weight_decay=tcfg.weight_decay))
    return optax.chain(*parts)


def device_peak_flops(tcfg: TrainConfig) -> float:
    if tcfg.peak_flops > 0:
        return tcfg.peak_flops
    kind = jax.devices()[0].device_kind
    for name, flops in PEAK_FLOPS.items():
        if kind.startswith(name):
            return flops
    return 0.0


def ladder(n: int, multiple: int) -> int:
    """Round n up to multiple x {1, 2, 3, 4, 6, 8, 12, 16, ...}: few distinct shapes, < 50% padding."""
    units = max(1, -(-int(n) // multiple))
    k = 1
    while True:
        for m in (k, k + k // 2) if k >= 2 else (k,):
            if m >= units:
                return m * multiple
        k *= 2


def target_positions(batch: dict, multiple: int, flat: bool = False) -> dict:
    """Host-side gather plan for the next-token loss.

    The hidden state at position p predicts token p+1 and counts when loss_mask[p+1]. Per row
    ([B, K], K = the most targets in a row) keeps each gather inside its batch shard; `flat`
    ([1, K] over the whole batch, positions offset by row) avoids projecting padding when the
    batch is not sharded. K comes from a coarse ladder so few shapes compile; padding weighs 0.
    """
    ids, mask = batch["input_ids"], batch["loss_mask"]
    B, T = ids.shape
    want = mask[:, 1:]
    rows = [np.nonzero(want[b])[0] for b in range(B)]
    if flat:
        pos_list = [np.concatenate([r + b * T for b, r in enumerate(rows)])]
        tgt_list = [np.concatenate([ids[b, r + 1] for b, r in enumerate(rows)])]
    else:
        pos_list = rows
        tgt_list = [ids[b, r + 1] for b, r in enumerate(rows)]
    K = ladder(max(max(len(p) for p in pos_list), 1), multiple)
    n = len(pos_list)
    pos = np.zeros((n, K), np.int32)
    tgt = np.zeros((n, K), np.int32)
    w = np.zeros((n, K), np.float32)
    for i, (p, t) in enumerate(zip(pos_list, tgt_list)):
        pos[i, :len(p)] = p
        tgt[i, :len(t)] = t
        w[i, :len(p)] = 1.0
    return {"input_ids": ids.astype(np.int32), "attention_mask": batch["attention_mask"].astype(bool),
            "tgt_pos": pos, "tgt_ids": tgt, "tgt_w": w}


def _stack_plans(plans: list[dict]) -> dict:
    """Micro-batch plans -> [accum, ...] arrays, padding K to the largest micro-batch's."""
    K = max(p["tgt_pos"].shape[1] for p in plans)
    out = {}
    for k in plans[0]:
        arrs = []
        for p in plans:
            a = p[k]
            if k.startswith("tgt_") and a.shape[1] < K:
                a = np.pad(a, ((0, 0), (0, K - a.shape[1])))
            arrs.append(a)
        out[k] = np.stack(arrs)
    return out


def _chunked_nll(model: Qwen, h, tgt_ids, tgt_w, chunk: int):
    """Sum of weighted NLL over target positions, projecting `chunk` positions at a time."""
    B, K, H = h.shape
    c = min(chunk, K)
    n = -(-K // c)
    pad = n * c - K
    if pad:
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        tgt_ids = jnp.pad(tgt_ids, ((0, 0), (0, pad)))
        tgt_w = jnp.pad(tgt_w, ((0, 0), (0, pad)))
    hs = h.reshape(B, n, c, H).swapaxes(0, 1)
    ids = tgt_ids.reshape(B, n, c).swapaxes(0, 1)
    ws = tgt_w.reshape(B, n, c).swapaxes(0, 1)

    @jax.checkpoint
    def one(hc, ic, wc):
        logits = model.logits_from_hidden(hc)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, ic[..., None], axis=-1)[..., 0]
        return jnp.sum((lse - picked) * wc)

    def body(acc, xs):
        return acc + one(*xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (hs, ids, ws))
    return total


def flop_counter(cfg: QwenConfig, *, lora_params: int = 0, frozen_base: bool = False
                 ) -> Callable[[np.ndarray, int], float]:
    """f(lengths, targets): training FLOPs of one optimizer step (`QwenConfig.flops_per_token`).

    `lengths` are the examples' real token counts (padding does no useful work); each attends
    causally over its own length. The vocab projection runs only at the `targets` positions the
    loss reads (`_chunked_nll`), so it is counted there, not at every token.
    """
    kw = dict(lora_params=lora_params, frozen_base=frozen_base)
    # flops_per_token is linear in seq_len: read its coefficients once (each call traces the model).
    body = cfg.flops_per_token(0, lm_head=False, **kw)
    attn = cfg.flops_per_token(1, lm_head=False, **kw) - body
    head = cfg.flops_per_token(0, **kw) - body

    def flops(lengths, targets: int) -> float:
        lens = np.asarray(lengths, np.float64)
        return float(np.sum(body * lens + attn * lens ** 2) + head * targets)

    return flops


def _batch_ways(mesh, rules) -> int:
    spec = named_sharding(mesh, ("batch",), rules=rules).spec
    axes = spec[0] if len(spec) else None
    if axes is None:
        return 1
    axes = axes if isinstance(axes, tuple) else (axes,)
    return int(np.prod([mesh.shape[a] for a in axes]))


class Trainer:
    """Owns the split model state, the optimizer state, the jitted step and the checkpoints.

    `model` is updated in place (its variables are replaced after `fit`). In LoRA mode adapters are
    added if the model has none; the base parameters are never touched.
    """

    def __init__(self, model: Qwen, model_cfg: QwenConfig, tcfg: TrainConfig, out_dir: str, *,
                 mesh: jax.sharding.Mesh | None = None, rules=None, base_ref: str = ""):
        from automem_jax.training.checkpoint import Checkpointer
        self.model, self.model_cfg, self.tcfg = model, model_cfg, tcfg
        self.mesh, self.rules, self.out_dir = mesh, rules, out_dir
        self.base_ref = base_ref
        if tcfg.remat is not None and tcfg.remat != model_cfg.remat:
            # remat is a static config field on every module; swap it in the graph.
            new_cfg = model_cfg.replace(remat=tcfg.remat)
            for _, node in nnx.iter_graph(model):
                if isinstance(node, nnx.Module) and getattr(node, "cfg", None) == model_cfg:
                    node.cfg = new_cfg
            self.model_cfg = model_cfg = new_cfg
        if tcfg.mode == "lora":
            from automem_jax.models import lora
            if not lora.has_lora(model):
                lora.apply_lora(model, self.lora_config(), seed=tcfg.seed, mesh=mesh, rules=rules)
            self.trainable = nnx.LoRAParam
        else:
            self.trainable = nnx.Param
        self.graphdef, self.params, self.frozen = nnx.split(model, self.trainable, ...)
        self.ckpt = Checkpointer(storage.join(out_dir, "checkpoints"), keep=tcfg.keep)
        self.history: list[dict] = []
        self._run: dict = {}  # what fit() trains on (dataset hash, total steps), recorded in the meta
        # Flat target gathers only when the batch is not split across devices.
        self._flat = mesh is None or _batch_ways(mesh, rules) == 1
        self._eval_fn = None

    def lora_config(self):
        from automem_jax.models.lora import LoRAConfig
        t = self.tcfg
        return LoRAConfig(rank=t.lora_rank, alpha=t.lora_alpha, dropout=t.lora_dropout, targets=t.lora_targets)

    # ---- shardings -------------------------------------------------------------------------------
    def _ctx(self):
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def _batch_sharding(self, ndim: int, accum: bool):
        if self.mesh is None:
            return None
        names = (None, "batch") + (None,) * (ndim - 2) if accum else ("batch",) + (None,) * (ndim - 1)
        return named_sharding(self.mesh, names, rules=self.rules)

    def _put(self, arrays: dict, accum: bool) -> dict:
        out = {}
        for k, v in arrays.items():
            s = self._batch_sharding(v.ndim, accum)
            out[k] = jnp.asarray(v) if s is None else jax.device_put(v, s)
        return out

    # ---- the step ----------------------------------------------------------------------------------
    def _loss_sum(self, params, frozen, mb, key):
        model = nnx.merge(self.graphdef, params, frozen)
        scope = contextlib.nullcontext()
        if self.tcfg.mode == "lora" and self.tcfg.lora_dropout > 0:
            from automem_jax.models.lora import dropout_rng
            scope = dropout_rng(key)
        with scope:
            h = model.hidden_states(mb["input_ids"], mb["attention_mask"])
        if mb["tgt_pos"].shape[0] != h.shape[0]:  # flat plan: one row over the whole batch
            h = h.reshape(1, -1, h.shape[-1])
        h = jnp.take_along_axis(h, mb["tgt_pos"][..., None], axis=1)
        return _chunked_nll(model, h, mb["tgt_ids"], mb["tgt_w"], self.tcfg.loss_chunk)

    def _build_step(self, tx):
        def step(params, frozen, opt_state, batch, key):
            def micro(carry, xs):
                gsum, lsum, i = carry
                mb = xs
                loss, g = jax.value_and_grad(self._loss_sum)(params, frozen, mb, jax.random.fold_in(key, i))
                return (jax.tree.map(jnp.add, gsum, g), lsum + loss, i + 1), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            (gsum, lsum, _), _ = jax.lax.scan(micro, (zeros, jnp.zeros((), jnp.float32), 0), batch)
            n = jnp.maximum(jnp.sum(batch["tgt_w"]), 1.0)
            grads = jax.tree.map(lambda g: g / n, gsum)
            gnorm = optax.tree.norm(grads)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            return params, opt_state, {"loss": lsum / n, "grad_norm": gnorm, "targets": n}

        return jax.jit(step, donate_argnums=(0, 2))

    def _build_eval(self):
        def ev(params, frozen, mb):
            return self._loss_sum(params, frozen, mb, jax.random.key(0)), jnp.sum(mb["tgt_w"])
        return jax.jit(ev)

    # ---- public ------------------------------------------------------------------------------------
    def total_steps(self, dataset) -> int:
        if self.tcfg.max_steps > 0:
            return self.tcfg.max_steps
        per_epoch = dataset.num_batches(self.tcfg.global_batch)
        return max(1, int(math.ceil(per_epoch * self.tcfg.epochs)))

    def evaluate(self, dataset) -> float:
        if self._eval_fn is None:
            self._eval_fn = self._build_eval()
        tot, n = 0.0, 0.0
        bs = self.tcfg.batch_size
        with self._ctx():
            for i in range(dataset.num_batches(bs)):
                mb = self._put(target_positions(dataset.batch_at(i, bs), self.tcfg.target_multiple, self._flat),
                               False)
                s, c = self._eval_fn(self.params, self.frozen, mb)
                tot += float(s)
                n += float(c)
        return tot / max(n, 1.0)

    def fit(self, dataset, eval_dataset=None, *, stop_after: int | None = None,
            log_fn: Callable[[dict], None] | None = None) -> TrainResult:
        """Train to `total_steps`, resuming from the newest good checkpoint in out_dir.

        A checkpoint of a changed run (dataset hash, base_ref, schedule, model or LoRA shape) is
        refused with CheckpointError, naming what changed.

        `stop_after` ends the call after that global step (simulates a preemption in tests).
        """
        t = self.tcfg
        total = self.total_steps(dataset)
        manifest = getattr(dataset, "manifest", None) or {}
        self._run = {"total_steps": total,
                     "dataset": {"hash": manifest.get("hash"), "source": manifest.get("source"),
                                 "examples": (manifest.get("counts") or {}).get("kept")}}
        tx = make_optimizer(t, total)
        sched = lr_schedule(t, total)
        with self._ctx():
            # Moments inherit their parameter's sharding through jit's propagation.
            opt_state = jax.jit(tx.init)(self.params)
            start, resumed = 0, None
            restored = self.ckpt.restore_latest(self.params, opt_state, config=self._meta())
            if restored is not None:
                start, self.params, opt_state, meta = restored
                self.history = [r for r in meta.get("history", []) if r["step"] <= start]
                resumed = start
                log.info("resumed from step %d (%s)", start, self.ckpt.directory)
            # Built per fit: the step closes over this fit's optimizer (its schedule length).
            step_fn = self._build_step(tx)
            peak = device_peak_flops(t)
            n_dev = len(self.mesh.devices.flat) if self.mesh is not None else 1
            step_flops = self._flop_counter() if peak > 0 else None
            step = start
            for step in range(start, total):
                raw = dataset.batch_at(step, t.global_batch)
                T = raw["input_ids"].shape[1]
                micro = [{k: raw[k][i * t.batch_size:(i + 1) * t.batch_size]
                          for k in ("input_ids", "loss_mask", "attention_mask")} for i in range(t.grad_accum)]
                batch = self._put(_stack_plans([target_positions(m, t.target_multiple, self._flat)
                                                for m in micro]), True)
                key = jax.random.fold_in(jax.random.key(t.seed), step)
                t0 = time.perf_counter()
                self.params, opt_state, m = step_fn(self.params, self.frozen, opt_state, batch, key)
                loss = float(m["loss"])
                dt = time.perf_counter() - t0
                real_tokens = int(raw["attention_mask"].sum())
                row = {"step": step + 1, "loss": loss, "grad_norm": float(m["grad_norm"]),
                       "lr": float(sched(step)), "targets": int(m["targets"]), "tokens": real_tokens,
                       "padded_tokens": int(t.global_batch * T), "seconds": dt,
                       "tokens_per_s": real_tokens / dt if dt > 0 else 0.0}
                if step_flops is not None:
                    lens = raw["attention_mask"].sum(axis=1)
                    row["mfu"] = step_flops(lens, row["targets"]) / (dt * peak * n_dev)
                self.history.append(row)
                if log_fn is not None:
                    log_fn(row)
                elif (step + 1) % t.log_every == 0:
                    log.info("step %d/%d loss %.4f gnorm %.3f lr %.2e %.0f tok/s%s", step + 1, total, loss,
                             row["grad_norm"], row["lr"], row["tokens_per_s"],
                             f" mfu {row['mfu']:.1%}" if "mfu" in row else "")
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss} at step {step + 1}; last good checkpoint kept "
                                             f"in {self.ckpt.directory}")
                done = step + 1
                if eval_dataset is not None and t.eval_every and done % t.eval_every == 0 and done < total:
                    row["eval_loss"] = self.evaluate(eval_dataset)
                if (t.save_every and done % t.save_every == 0) or done == total or done == stop_after:
                    self.ckpt.save(done, self.params, opt_state, self._meta(done))
                if stop_after is not None and done >= stop_after:
                    break
            self.ckpt.wait()
        final_step = self.history[-1]["step"] if self.history else start
        eval_loss = self.evaluate(eval_dataset) if eval_dataset is not None and final_step == total else None
        nnx.update(self.model, self.params)
        self._write_log()
        return TrainResult(model=self.model, history=list(self.history), steps=final_step,
                           first_loss=self.history[0]["loss"] if self.history else float("nan"),
                           final_loss=self.history[-1]["loss"] if self.history else float("nan"),
                           eval_loss=eval_loss, resumed_from=resumed, checkpoint_dir=self.ckpt.directory)

    def _flop_counter(self):
        # Adapters train in either mode; in LoRA mode the base gets no weight gradients.
        n_lora = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(self.model, nnx.LoRAParam)))
        return flop_counter(self.model_cfg, lora_params=n_lora, frozen_base=self.tcfg.mode == "lora")

    def _meta(self, step: int | None = None) -> dict:
        return {"step": step, "mode": self.tcfg.mode, "train_config": dataclasses.asdict(self.tcfg),
                "model_config": dataclasses.asdict(self.model_cfg), "base_ref": self.base_ref,
                **self._run, "history": list(self.history)}

    def _write_log(self) -> None:
        if jax.process_index() != 0:
            return
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.history)
        storage.write_text(storage.join(self.out_dir, "train_log.jsonl"), text)


def train_sft(model: Qwen, model_cfg: QwenConfig, dataset, tcfg: TrainConfig, out_dir: str, *,
              mesh=None, rules=None, eval_dataset=None, base_ref: str = "",
              log_fn: Callable[[dict], None] | None = None) -> TrainResult:
    """Fit `model` on `dataset` (an SFTDataset) and return the trained model and its history."""
    trainer = Trainer(model, model_cfg, tcfg, out_dir, mesh=mesh, rules=rules, base_ref=base_ref)
    return trainer.fit(dataset, eval_dataset, log_fn=log_fn)
