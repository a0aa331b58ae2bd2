"""One process of the multi-host engine test (launched by tests/test_engine_multihost.py).

    python tests/multihost_engine_worker.py --out OUT.json --num-processes 2 --process-id I \
        --port PORT --local-devices 2 --variants dp,tp_local,tp_cross

With --num-processes 2 the two processes join one JAX runtime through `jax.distributed.initialize`
(coordinator on 127.0.0.1:PORT, gloo CPU collectives), each owning --local-devices CPU devices.
With --num-processes 1 nothing is initialized and the process owns all the devices itself: the
one-process reference over the same global mesh shapes.

Every process runs the same engine calls in the same order and writes its greedy tokens to
`OUT.json` (process 0) or `OUT.p<I>.json` (process I > 0), so the test can check that every
process of the group saw the same result and that it equals the one-process result.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

# Mesh variants. Each is (MeshConfig fields, device order): "natural" keeps jax.devices() order
# (each process's devices are adjacent: tensor pairs stay inside a process), "cross" interleaves
# the two hosts so every tensor pair spans both processes. "none" is one device without a mesh.
VARIANTS = {
    "none": (None, None),
    "dp": (dict(data=-1, fsdp=1, tensor=1), "natural"),
    "tp_local": (dict(data=2, fsdp=1, tensor=2), "natural"),
    "tp_cross": (dict(data=2, fsdp=1, tensor=2), "cross"),
}

# A long shared instruction (the prefix cache must serve it), then different tails.
INSTRUCTION = (
    "You are the memory agent of a Crafter player. Read the observation, the inventory and the notes "
    "below, then decide which single action moves the player closer to collecting wood, placing a "
    "table and crafting a wooden pickaxe. Prefer actions that keep health, food and drink above "
    "half, avoid zombies at night, and never walk into lava or water without a reason. Reply with "
    "the action name only, then one short sentence that explains the choice to the teacher. "
)
TAILS = [
    "Observation: tree to the north, grass around. Inventory: empty.",
    "Observation: zombie two steps east, night. Inventory: 3 wood, 1 sapling.",
    "Observation: water to the west, table nearby. Inventory: 5 wood.",
]
LONG_TEXT = (
    "Step 41. The player stands on grass facing a stone wall; a cow grazes three tiles to the south "
    "and a skeleton was seen in the tunnel to the east. Health 7, food 4, drink 3, energy 6. Notes: "
    "<|SEARCH|>notes.txt|stone<|END|> returned two lines: stone needs a wooden pickaxe; coal is "
    "usually found next to stone. Previous plan: craft a wooden pickaxe, mine stone, build a stone "
    "pickaxe, then look for iron near the tunnels while keeping drink above two by visiting the lake "
    "to the north every fifty steps. Write the next plan as three numbered lines."
)

MAX_TOKENS = 12
ENGINE_KW = dict(max_batch=4, max_len=256, seed=0, page_size=16, prefill_chunk=64, prefix_cache=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--num-processes", type=int, default=1)
    ap.add_argument("--process-id", type=int, default=0)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--local-devices", type=int, default=2)
    ap.add_argument("--variants", default="dp,tp_local,tp_cross")
    return ap.parse_args(argv)


def build_prompts(tok) -> list[list[int]]:
    """7 prompts: 3 share an 80-token prefix (+1 that is exactly that prefix), short ones, a long one."""
    instr = tok(INSTRUCTION)["input_ids"]
    if len(instr) < 80:
        raise RuntimeError(f"instruction text is only {len(instr)} tokens; need 80")
    prefix = instr[:80]
    tails = [tok(t)["input_ids"] for t in TAILS]
    long_ids = tok(LONG_TEXT)["input_ids"]
    if len(long_ids) <= ENGINE_KW["prefill_chunk"]:
        raise RuntimeError(f"long prompt is only {len(long_ids)} tokens; must exceed the prefill chunk")
    return [
        prefix + tails[0],          # shared prefix
        tok("hello")["input_ids"],  # short
        prefix + tails[1],          # shared prefix
        long_ids,                   # longer than prefill_chunk: chunked prefill
        tok("x")["input_ids"],      # one token
        prefix + tails[2],          # shared prefix
        list(prefix),               # exactly the cached prefix (a full prefix-cache hit)
    ]


def out_record(o) -> dict:
    return {"token_ids": [int(t) for t in o.token_ids], "finish_reason": o.finish_reason,
            "text": o.text, "error": getattr(o, "error", None)}


def make_mesh_for(name: str, local_devices: int):
    import jax

    from automem_jax.parallel.mesh import MeshConfig, make_mesh
    fields, order = VARIANTS[name]
    if fields is None:
        return None
    devs = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    if order == "cross":
        # Hosts (real processes, or groups of `local_devices` in the one-process reference).
        hosts = [devs[i:i + local_devices] for i in range(0, len(devs), local_devices)]
        devs = [h[j] for j in range(local_devices) for h in hosts]
    return make_mesh(MeshConfig(**fields), devices=devs)


def run_variant(name: str, args, model_cfg, tok, prompts) -> dict:
    import inspect

    import jax

    from automem_jax.llm.engine import Engine
    from automem_jax.llm.sampling import SamplingParams
    from automem_jax.models import qwen
    from automem_jax.parallel import mesh as mesh_module

    t0 = time.time()
    mesh = make_mesh_for(name, args.local_devices)
    rules = getattr(mesh_module, "SERVING_RULES", None) if mesh is not None else None
    info: dict = {"variant": name}
    if mesh is not None:
        procs = [[int(d.process_index) for d in row.reshape(-1)] for row in mesh.devices]
        info["mesh_shape"] = {k: int(v) for k, v in mesh.shape.items()}
        info["mesh_device_ids"] = [int(d.id) for d in mesh.devices.reshape(-1)]
        info["mesh_process_index"] = procs
        # Does some tensor group (the last mesh axis) hold devices of more than one process?
        tens = mesh.devices.reshape(-1, mesh.shape["tensor"])
        info["tensor_spans_processes"] = any(len({d.process_index for d in g}) > 1 for g in tens)
    model = qwen.init_model(model_cfg, seed=0, mesh=mesh)

    accepted = inspect.signature(Engine.__init__).parameters
    kw = {k: v for k, v in ENGINE_KW.items() if k in accepted}
    if "rules" in accepted:
        kw["rules"] = rules
    info["engine_kwargs"] = sorted(kw)
    info["serving_rules"] = rules is not None
    eng = Engine(model, tok, mesh=mesh, **kw)
    sp = lambda: SamplingParams(temperature=0, max_tokens=MAX_TOKENS)  # noqa: E731

    # 1) The batch API: 7 prompts on 4 rows, so rows are refilled.
    t1 = time.time()
    outs = eng.generate_ids(prompts, [sp() for _ in prompts])
    info["generate_ids_s"] = round(time.time() - t1, 2)
    result = {"info": info, "generate_ids": [out_record(o) for o in outs]}

    # 2) The scheduler API: requests arrive at different steps; every process submits the same
    #    requests at the same step.
    if not hasattr(eng, "submit"):
        result["scheduler"] = None
        result["scheduler_error"] = "Engine has no submit(): the scheduler API is missing"
    else:
        t2 = time.time()
        order = [3, 0, 6, 2, 5, 1, 4]  # long prompt first; the exact-prefix prompt early
        futs = {}
        for i in order[:3]:
            futs[i] = eng.submit(prompts[i], sp())
        steps = 0
        for _ in range(2):
            eng.step()
            steps += 1
        for i in order[3:]:
            futs[i] = eng.submit(prompts[i], sp())
        while not all(f.done() for f in futs.values()):
            if steps > 2000:
                raise RuntimeError(f"scheduler: futures not done after {steps} steps")
            eng.step()
            steps += 1
        info["scheduler_steps"] = steps
        info["scheduler_s"] = round(time.time() - t2, 2)
        info["has_work_after"] = bool(getattr(eng, "has_work", False))
        result["scheduler"] = [out_record(futs[i].result()) for i in range(len(prompts))]
    stats = getattr(eng, "stats", None)
    if stats is not None and hasattr(stats, "as_dict"):
        info["stats"] = {k: v for k, v in stats.as_dict().items() if isinstance(v, (int, float, str, bool))}
    info["total_s"] = round(time.time() - t0, 2)
    del eng, model
    jax.clear_caches()
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    # Devices of this process: its share of 2 hosts, or (one process) both hosts' devices, so the
    # global mesh shapes are the same. Must be set before jax is imported.
    n_dev = args.local_devices * (1 if args.num_processes > 1 else 2)
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_dev}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    import json

    import jax
    if args.num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}",
                                   num_processes=args.num_processes, process_id=args.process_id,
                                   initialization_timeout=120, heartbeat_timeout_seconds=60,
                                   shutdown_timeout_seconds=60)
    from automem_jax.models import qwen, qwen_presets
    from automem_jax.models.tokenizer import load_tokenizer

    head = {"process_index": jax.process_index(), "process_count": jax.process_count(),
            "global_devices": jax.device_count(), "local_devices": jax.local_device_count(),
            "jax": jax.__version__}
    print(f"[worker {args.process_id}] {head}", file=sys.stderr, flush=True)
    tok = load_tokenizer()
    prompts = build_prompts(tok)
    cfg = qwen_presets.preset("tiny", initializer_range=0.5, dtype="float32", param_dtype="float32")
    results = {"head": head, "prompt_lens": [len(p) for p in prompts], "variants": {}}
    for name in filter(None, args.variants.split(",")):
        r = run_variant(name, args, cfg, tok, prompts)
        results["variants"][name] = r
        print(f"[worker {args.process_id}] {name}: {r['info'].get('total_s')} s", file=sys.stderr, flush=True)
    path = args.out if jax.process_index() == 0 else f"{args.out}.p{jax.process_index()}.json"
    with open(path + ".tmp", "w") as f:
        json.dump(results, f)
    os.replace(path + ".tmp", path)
    if args.num_processes > 1:
        jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    try:
        code = main()
    except BaseException:  # noqa: BLE001 - report, then leave at once (do not wait on the peer)
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
