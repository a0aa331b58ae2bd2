"""The main job's units that need the accelerator: training and writing merged weights.

With inference.backend=local they run in process; with managed replicas (which hold the chips
while they serve) each runs in a child process on every host (launch/child.py), started after the
replicas stop. `Run.on_accelerator` chooses.
"""
from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

from automem_jax import storage
from automem_jax.loops.decider import apply_recipe
from automem_jax.models import hf, lora
from automem_jax.training.data import SFTDataset, build_dataset
from automem_jax.training.trainer import TrainConfig, Trainer
from launch.config import data_config, train_config, trainer_lora
from launch.workdir import is_writer, mark_unit

if TYPE_CHECKING:  # launch.run imports this module
    from launch.run import Run

log = logging.getLogger("automem_jax")


def bootstrap_train(run: Run) -> dict:
    """Fine-tune of the random preset or model.checkpoint on the teacher dataset (bootstrap.train.mode:
    full, or LoRA merged into the weights) -> bootstrap/model, a plain HF folder with the run's
    tokenizer, so later stages load it as they would the checkpoint."""
    b = run.cfg.bootstrap
    ckpt = run.cfg.model.checkpoint
    model_dir = run.path("bootstrap", "model")
    ds = SFTDataset.load(run.path("bootstrap", "dataset"), run.tok)
    model, mcfg = run.load_model(ckpt)
    tcfg = train_config(b.train)
    # base_ref: a resumed fit refuses a different checkpoint under the same workdir.
    res = Trainer(model, mcfg, tcfg, run.path("bootstrap", "train"), mesh=run.mesh, base_ref=ckpt).fit(ds)
    summary, policy = res.summary(), res.model
    del res, model  # one trained copy from here, merged in place
    if lora.has_lora(policy):
        lora.merge_lora(policy, inplace=True)
    hf.save_pretrained(policy, mcfg, model_dir, tokenizer=run.tok)  # every host gathers; host 0 writes
    if ckpt and is_writer():
        _copy_generation_config(ckpt, model_dir)
    mark_unit(model_dir, summary)
    log.info("bootstrap training (%s%s): loss %.3f -> %.3f over %d steps; policy saved to %s", tcfg.mode,
             f" of {ckpt}" if ckpt else "", summary["first_loss"], summary["final_loss"], summary["steps"],
             model_dir)
    return {"model": model_dir}


def _copy_generation_config(checkpoint: str, model_dir: str) -> None:
    """The checkpoint's generation_config.json (its eos ids and top_p / top_k / repetition_penalty)
    replaces the minimal one save_pretrained wrote, so replicas that read only the served folder
    (vLLM) sample the fine-tuned model as they would the checkpoint."""
    src = storage.join(checkpoint, "generation_config.json")
    try:
        if storage.exists(src):
            storage.write_text(storage.join(model_dir, "generation_config.json"), storage.read_text(src))
    except (OSError, ValueError) as e:  # optional: keep save_pretrained's file
        log.warning("bootstrap: %s not copied (%s); the saved model keeps default sampling values", src, e)


def loop2_train(run: Run, dataset_dir: str, out_dir: str, iteration: int, recipe: dict | None = None) -> dict:
    """LoRA (or full) SFT of the base policy on a Loop-2 dataset -> the merged specialist folder
    and, for LoRA, its PEFT adapter (which replicas load at run time). ``recipe``: the decider's
    learning-rate / length scales and LoRA rank (loops.decider.apply_recipe)."""
    cfg = run.cfg
    l2 = cfg.loop2
    d = l2.train.to_dict()
    d["remat"] = d.get("remat") or None  # as train_config() reads it
    tcfg = TrainConfig.from_dict(apply_recipe(d, recipe))
    rows = [json.loads(x) for x in storage.read_text(storage.join(dataset_dir, "selected.jsonl")).splitlines()
            if x.strip()]
    ds = build_dataset(rows, run.tok, data_config(l2.data), source=dataset_dir)
    model, mcfg = run.load_model(run.base_source())
    res = Trainer(model, mcfg, tcfg, out_dir, mesh=run.mesh, base_ref=run.base_source()).fit(
        ds, log_fn=lambda r: log.info("loop2 iter %d step %d loss %.4f %.0f tok/s", iteration, r["step"],
                                      r["loss"], r["tokens_per_s"]))
    specialist = storage.join(out_dir, "specialist")
    out = {"checkpoint": specialist, "peft": storage.join(out_dir, "peft") if tcfg.mode == "lora" else "",
           "first_loss": res.first_loss, "final_loss": res.final_loss, "steps": res.steps,
           "examples": len(ds), "dir": out_dir, "manifest": ds.manifest, "resumed_from": res.resumed_from,
           "recipe": {**(recipe or {}), "learning_rate": tcfg.learning_rate, "epochs": tcfg.epochs,
                      "max_steps": tcfg.max_steps, "lora_rank": tcfg.lora_rank, "lora_alpha": tcfg.lora_alpha}}
    trained = res.model
    del res, model  # from here one trained copy is held, merged in place: at most two with the gathers
    # Every host joins the gathers inside these; only host 0 writes files.
    if tcfg.mode == "lora":
        hf.save_peft_adapter(trained, mcfg, trainer_lora(tcfg), storage.join(out_dir, "peft"),
                             base_model_name_or_path=run.base_source() or cfg.model.preset)
        lora.merge_lora(trained, inplace=True)
    hf.save_pretrained(trained, mcfg, specialist, tokenizer=run.tok, dtype=cfg.export.dtype)
    return out


def export_base(run: Run, out: str) -> dict:
    """The base policy as a Hugging Face folder (export when no Loop-2 iteration finished)."""
    model, mcfg = run.load_model(run.base_source())
    hf.save_pretrained(model, mcfg, out, tokenizer=run.tok, dtype=run.cfg.export.dtype)
    return {"hf": out}


UNITS = {"bootstrap_train": bootstrap_train, "loop2_train": loop2_train, "export_base": export_base}
