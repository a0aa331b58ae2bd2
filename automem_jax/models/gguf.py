"""GGUF import: llama.cpp's one-file checkpoints (weights, often quantized, with the architecture,
tokenizer and chat template in the metadata) read as a Hugging Face checkpoint.

    with GGUFModel.open("x.gguf") as g:      # local or gs://; "x-00001-of-00003.gguf" opens every split
        g.hf_config()                        # transformers config.json fields (qwen2 / qwen3)
        g.get_tensor("model.layers.0.self_attn.q_proj.weight")   # float32, transformers' shape
    load_tokenizer("x.gguf")                 # transformers builds the tokenizer from the metadata

`hf.load_pretrained`, `QwenConfig.from_hf`, `tokenizer.load_tokenizer` and the engine accept a
`.gguf` path through this module. Reading and dequantizing use the `gguf` package; a tensor that
lies past the end of its file or has a type we cannot dequantize gets an error naming it.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Any

import numpy as np

from automem_jax import storage

SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
# The GGML types gguf can turn back into floats (quants.dequantize); the list plus kin.
DEQUANTIZABLE = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                 "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
SUPPORTED_ARCHS = ("qwen2", "qwen3")

# GGUF tensor name -> transformers name ({i}: layer). Qwen2/Qwen3 keep HF's q/k row order (NEOX RoPE),
# so no un-permutation is needed, unlike llama.cpp's LLaMA conversion.
_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight",
           "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
_LAYER = {"attn_norm.weight": "input_layernorm.weight",
          "ffn_norm.weight": "post_attention_layernorm.weight",
          "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
          "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
          "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
          "attn_output.weight": "self_attn.o_proj.weight", "attn_output.bias": "self_attn.o_proj.bias",
          "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
          "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
          "ffn_down.weight": "mlp.down_proj.weight"}
_BLK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")
# Large arrays read only by the tokenizer builder (transformers), not kept as metadata.
_SKIPPED_FIELDS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                   "tokenizer.ggml.scores")


def is_gguf(path) -> bool:
    return isinstance(path, str) and path.lower().endswith(".gguf")


def hf_name(name: str) -> str | None:
    """The transformers name of a GGUF tensor, None for one we do not map."""
    if name in _GLOBAL:
        return _GLOBAL[name]
    m = _BLK_RE.match(name)
    if m and m.group(2) in _LAYER:
        return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}"
    return None


def split_paths(path: str) -> list[str]:
    """Every file of a split GGUF (llama.cpp's `-0000k-of-0000n` names), or [path]."""
    m = SPLIT_RE.match(path)
    if not m:
        return [path]
    count = int(m.group("count"))
    paths = [f"{m.group('stem')}-{k:05d}-of-{count:05d}.gguf" for k in range(1, count + 1)]
    missing = [p for p in paths if not storage.exists(p)]
    if missing:
        raise FileNotFoundError(f"{path}: split GGUF of {count} files, missing {missing}")
    return paths


def _reader_class():
    import gguf

    class Reader(gguf.GGUFReader):
        """GGUFReader that checks every tensor against the file before mapping it, so a truncated file
        or an unknown type is reported by tensor name (the stock reader fails on a bare reshape)."""

        def __init__(self, path):
            self.source = str(path)
            super().__init__(path)

        def _build_tensors(self, start_offs, fields):
            size = len(self.data)
            for field in fields:
                _, name_data, _, dims, raw_type, offset = field.parts
                name = bytes(name_data).decode("utf-8", "replace")
                try:
                    qtype = gguf.GGMLQuantizationType(int(raw_type[0]))
                except ValueError:
                    raise ValueError(f"{self.source}: tensor {name} has unknown GGML type {int(raw_type[0])}") from None
                block, type_size = gguf.GGML_QUANT_SIZES[qtype]
                n = int(np.prod(dims))
                begin = int(start_offs + offset[0])
                end = begin + n * type_size // block
                if n % block or end > size:
                    why = (f"{n} elements are not whole {block}-element blocks" if n % block else
                           f"needs bytes {begin}..{end} but the file ends at {size}: truncated?")
                    raise ValueError(f"{self.source}: tensor {name} ({qtype.name}, shape "
                                     f"{tuple(int(d) for d in dims)}): {why}")
            super()._build_tensors(start_offs, fields)

    return Reader


class GGUFModel:
    """One GGUF checkpoint (possibly split over several files), opened read-only (memory-mapped)."""

    def __init__(self, path: str, readers: list, stack: contextlib.ExitStack):
        self.path = path
        self._stack = stack  # the memory maps' files (gs:// downloads too)
        self.metadata: dict[str, Any] = {key: field.contents() for key, field in readers[0].fields.items()
                                         if key not in _SKIPPED_FIELDS and not key.startswith("GGUF.")}
        self.tensors: dict[str, Any] = {}
        for r in readers:
            for t in r.tensors:
                if t.name in self.tensors:
                    raise ValueError(f"{path}: tensor {t.name} appears in more than one split")
                self.tensors[t.name] = t
        # transformers name -> GGUF name; the weight_map / get_tensor pair mirrors hf._Folder.
        self.names: dict[str, str] = {}
        for name in self.tensors:
            hn = hf_name(name)
            self.names[hn or f"gguf:{name}"] = name
        self.weight_map = {n: os.path.basename(path) for n in self.names}

    @classmethod
    def open(cls, path: str) -> "GGUFModel":
        stack = contextlib.ExitStack()
        try:
            reader = _reader_class()
            readers = []
            for p in split_paths(path):
                local = stack.enter_context(storage.local_file(p))
                try:
                    readers.append(reader(local))
                except (ValueError, IndexError) as e:  # gguf indexes past the end of a short header
                    msg = str(e).replace(local, p)
                    raise ValueError(msg if msg.startswith(p) else f"{p}: not a readable GGUF file ({msg})") from None
            try:
                return cls(path, readers, stack)
            except UnicodeDecodeError as e:  # a corrupt metadata string
                raise ValueError(f"{path}: not a readable GGUF file (metadata: {e})") from None
        except BaseException:
            stack.close()
            raise

    def close(self) -> None:
        self.tensors = {}
        self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- metadata -------------------------------------------------------------------------------
    @property
    def arch(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def _md(self, key: str, default=None, *, required=False):
        full = f"{self.arch}.{key}"
        if full in self.metadata:
            return self.metadata[full]
        if required:
            raise ValueError(f"{self.path}: metadata {full} missing")
        return default

    def hf_config(self) -> dict[str, Any]:
        """transformers config.json fields of this checkpoint (shapes from the tensors where the
        metadata leaves them implicit)."""
        if self.arch not in SUPPORTED_ARCHS:
            raise ValueError(f"{self.path}: GGUF architecture {self.arch!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED_ARCHS)})")
        scaling = self._md("rope.scaling.type")
        if scaling not in (None, "none"):
            raise ValueError(f"{self.path}: RoPE scaling {scaling!r} is not supported; only default RoPE is")
        if "token_embd.weight" not in self.tensors:
            raise ValueError(f"{self.path}: tensor token_embd.weight missing")
        hidden = int(self._md("embedding_length", required=True))
        heads = int(self._md("attention.head_count", required=True))
        vocab = int(self.tensors["token_embd.weight"].shape[-1])
        d = {
            "architectures": [{"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[self.arch]],
            "model_type": self.arch,
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": int(self._md("feed_forward_length", required=True)),
            "num_hidden_layers": int(self._md("block_count", required=True)),
            "num_attention_heads": heads,
            "num_key_value_heads": int(self._md("attention.head_count_kv", heads)),
            "head_dim": int(self._md("attention.key_length", hidden // heads)),
            "hidden_act": "silu",
            "max_position_embeddings": int(self._md("context_length", 32768)),
            # float32 in the file; the shortest decimal that rounds back keeps config.json readable.
            "rms_norm_eps": float(np.format_float_positional(
                np.float32(self._md("attention.layer_norm_rms_epsilon", 1e-6)), unique=True)),
            "rope_theta": float(self._md("rope.freq_base", 10000.0)),
            "tie_word_embeddings": "output.weight" not in self.tensors,
            "use_sliding_window": False,
            "bos_token_id": self.metadata.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self.metadata.get("tokenizer.ggml.eos_token_id"),
            "torch_dtype": "float32",
        }
        if self.arch == "qwen3":
            d["attention_bias"] = "blk.0.attn_q.bias" in self.tensors
        return d

    # ---- tensors --------------------------------------------------------------------------------
    def by_file(self, tensor_names) -> dict[str, list[str]]:
        return {os.path.basename(self.path): list(tensor_names)}

    def type_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors.values():
            out[t.tensor_type.name] = out.get(t.tensor_type.name, 0) + 1
        return dict(sorted(out.items()))

    def get_tensor(self, name: str) -> np.ndarray:
        """The tensor under its transformers `name`, dequantized to float32 in transformers' layout
        ([out, in] for projections)."""
        from gguf import quants
        gname = self.names[name]
        t = self.tensors[gname]
        if t.tensor_type.name not in DEQUANTIZABLE:
            raise ValueError(f"{self.path}: tensor {gname} has type {t.tensor_type.name}, which this importer "
                             f"cannot dequantize (supported: {', '.join(DEQUANTIZABLE)})")
        try:
            x = quants.dequantize(t.data, t.tensor_type)
        except (NotImplementedError, ValueError) as e:
            raise ValueError(f"{self.path}: tensor {gname} ({t.tensor_type.name}): cannot dequantize ({e})") from None
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        return np.asarray(x, dtype=np.float32).reshape(shape)


def load_tokenizer(path: str):
    """transformers' tokenizer (with the chat template) built from a GGUF file's metadata."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import AutoTokenizer
    first = split_paths(path)[0]
    with storage.local_file(first) as local:
        try:
            return AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(local)),
                                                 gguf_file=os.path.basename(local))
        except (ValueError, KeyError, OSError) as e:
            raise ValueError(f"{path}: no tokenizer could be built from the GGUF metadata ({e})") from e
