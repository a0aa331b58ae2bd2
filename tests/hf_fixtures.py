"""Random tiny transformers Qwen models: the reference for logits (torch CPU, test extra only)."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class HFModel:
    path: str
    torch_model: object
    arch: str

    def logits(self, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """Reference logits; positions skip padding, as ours do."""
        import torch
        if mask is None:
            mask = np.ones_like(ids)
        pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        with torch.no_grad():
            out = self.torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64)),
                                   position_ids=torch.tensor(pos))
        return out.logits.float().numpy()


def hf_config(arch: str, tied: bool, vocab: int = 512, layers: int = 2):
    from transformers import Qwen2Config, Qwen3Config
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2)
    if arch == "qwen3":
        return Qwen3Config(head_dim=16, rope_theta=10000.0, **common)
    return Qwen2Config(rope_theta=1_000_000.0, **common)


def make_hf_model(folder, arch: str, tied: bool, seed: int = 0, **kw) -> HFModel:
    import torch
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(arch, tied, **kw)).float().eval()
    with torch.no_grad():  # norms start at 1 and biases at 0; perturb them so parity covers them
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(str(folder))
    return HFModel(str(folder), model, arch)


def padded_batch(vocab: int, seed: int = 0):
    """3 rows of 12: full, left-padded, right-padded."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, vocab, (3, 12))
    mask = np.ones((3, 12), np.int32)
    mask[1, :5] = 0
    mask[2, 8:] = 0
    return ids, mask
