"""KV-cache prefill + one-token decode steps reproduce the full forward at every position."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from automem_jax.models import qwen, qwen_presets


@pytest.mark.parametrize("scan", [False, True])
def test_decode_16_tokens_matches_full_forward(scan):
    cfg = qwen_presets.preset("tiny", vocab_size=512, scan_layers=scan)
    model = qwen.init_model(cfg, seed=3)
    B, P, N = 3, 7, 16
    rng = np.random.RandomState(0)
    prompt = rng.randint(0, 512, (B, P))
    pmask = np.ones((B, P), bool)
    pmask[1, :3] = False  # left padding
    pmask[2, 5:] = False  # right padding
    new = rng.randint(0, 512, (B, N))

    cache = qwen.KVCache.init(cfg, B, P + N)
    prefill = jax.jit(lambda m, ids, c, msk: m.forward_with_cache(ids, c, msk), static_argnums=())
    step = jax.jit(lambda m, ids, c: m.forward_with_cache(ids, c))
    # Plain jax.jit over an NNX module works through its pytree registration.
    pl, cache = prefill(model, jnp.asarray(prompt), cache, jnp.asarray(pmask))
    decoded = []
    for t in range(N):
        lg, cache = step(model, jnp.asarray(new[:, t:t + 1]), cache)
        decoded.append(np.asarray(lg[:, 0]))
    assert cache.index.tolist() == [P + N] * B
    # Per-row positions: each row continues after its own real tokens.
    assert cache.pos.tolist() == [P + N, P - 3 + N, 5 + N]

    full = np.asarray(model(jnp.asarray(np.concatenate([prompt, new], 1)),
                            jnp.asarray(np.concatenate([pmask, np.ones((B, N), bool)], 1))))
    assert np.abs(full[:, :P][pmask] - np.asarray(pl)[pmask]).max() < 1e-4
    for t in range(N):
        assert np.abs(full[:, P + t] - decoded[t]).max() < 1e-4, t


def test_cache_rows_are_independent():
    """A row's logits do not depend on what the other rows hold (masks are per row)."""
    cfg = qwen_presets.preset("tiny", vocab_size=512)
    model = qwen.init_model(cfg, seed=0)
    ids = np.array([[5, 6, 7, 8], [9, 10, 11, 12]])
    mask = np.array([[1, 1, 1, 1], [0, 0, 1, 1]], bool)
    c2 = qwen.KVCache.init(cfg, 2, 8)
    l2, c2 = model.forward_with_cache(jnp.asarray(ids), c2, jnp.asarray(mask))
    c1 = qwen.KVCache.init(cfg, 1, 8)
    l1, c1 = model.forward_with_cache(jnp.asarray(ids[1:, 2:]), c1)
    assert np.abs(np.asarray(l2[1, 2:]) - np.asarray(l1[0])).max() < 1e-4
    n2, _ = model.forward_with_cache(jnp.asarray([[3], [4]]), c2)
    n1, _ = model.forward_with_cache(jnp.asarray([[4]]), c1)
    assert np.abs(np.asarray(n2[1]) - np.asarray(n1[0])).max() < 1e-4


def test_logits_at_selects_rows_last_token():
    cfg = qwen_presets.preset("tiny", vocab_size=512)
    model = qwen.init_model(cfg, seed=0)
    ids = jnp.asarray(np.random.RandomState(1).randint(0, 512, (2, 6)))
    mask = jnp.asarray([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], bool)
    full, _ = model.forward_with_cache(ids, qwen.KVCache.init(cfg, 2, 8), mask)
    sel, cache = model.forward_with_cache(ids, qwen.KVCache.init(cfg, 2, 8), mask, logits_at=jnp.asarray([5, 2]))
    assert sel.shape == (2, 1, 512)
    np.testing.assert_allclose(np.asarray(sel[:, 0]), np.asarray(full[[0, 1], [5, 2]]), atol=1e-5)


def test_causal_block_attention_equals_one_block(chunk=4):
    """Block-skipping attention (queries in blocks, keys cut at each block's reach) changes nothing."""
    base = qwen_presets.preset("tiny", vocab_size=512, attn_chunk=0)
    one = qwen.init_model(base, seed=2)
    blocked = qwen.init_model(base.replace(attn_chunk=chunk), seed=2)
    rng = np.random.RandomState(0)
    ids = jnp.asarray(rng.randint(0, 512, (2, 13)))
    mask = np.ones((2, 13), bool)
    mask[1, :4] = False
    mask = jnp.asarray(mask)
    real = np.asarray(mask)  # padding queries see no key at all; their output is meaningless
    fwd = jax.jit(lambda m, i, k: m(i, k))
    np.testing.assert_allclose(np.asarray(fwd(blocked, ids, mask))[real], np.asarray(fwd(one, ids, mask))[real],
                               atol=1e-5)
    # Prefill into a cache that already holds a prefix (start > 0) with a kv_len cut.
    c1, c2 = qwen.KVCache.init(base, 2, 40), qwen.KVCache.init(base, 2, 40)
    pre = jax.jit(lambda m, i, c: m.forward_with_cache(i, c))
    fill = jax.jit(lambda m, i, c, k: m.forward_with_cache(i, c, k, kv_len=24))
    _, c1 = pre(one, ids[:, :6], c1)
    _, c2 = pre(blocked, ids[:, :6], c2)
    a, _ = fill(one, ids, c1, mask)
    b, _ = fill(blocked, ids, c2, mask)
    np.testing.assert_allclose(np.asarray(b)[np.asarray(mask)], np.asarray(a)[np.asarray(mask)], atol=1e-5)
