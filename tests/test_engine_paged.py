"""The paged engine's prefix cache, chunked prefill and eviction against plain generation."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from automem_jax.llm.engine import Engine
from automem_jax.llm.sampling import SamplingParams
from automem_jax.llm.kv_pages import OutOfPages, PagePool
from automem_jax.models import qwen, qwen_presets
from automem_jax.models.tokenizer import load_tokenizer

V = 512


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def model():
    return qwen.init_model(qwen_presets.preset("tiny", vocab_size=V, initializer_range=0.5), seed=1)


@pytest.fixture(scope="module")
def plain(model, tok):
    # No prefix cache, whole prompts in one prefill, room for everything: the reference.
    return Engine(model, tok, max_batch=4, max_len=64, page_size=16, prefill_chunk=64, prefix_cache=False)


@pytest.fixture(scope="module")
def paged(model, tok):
    # Tiny pages, 8-token prefill chunks, and a pool of 40 pages (160 tokens): requests share
    # prefixes, are prefilled over several steps, and idle cached pages get evicted.
    return Engine(model, tok, max_batch=3, max_len=64, page_size=4, prefill_chunk=8, cache_tokens=160)


_PREFIXES = [list(np.random.RandomState(7).randint(0, V, 37)), list(np.random.RandomState(8).randint(0, V, 22)), []]

request = st.tuples(
    st.sampled_from(range(len(_PREFIXES))),  # which shared prefix
    st.lists(st.integers(0, V - 1), min_size=1, max_size=14),  # own tail
    st.integers(1, 7),  # max_tokens
    st.sampled_from([None, 3, 11]),  # None: greedy; else a sampling seed
    st.integers(0, 3),  # steps to run before submitting the next one
)


def _params(max_tokens, seed):
    if seed is None:
        return SamplingParams(temperature=0, max_tokens=max_tokens)
    return SamplingParams(temperature=1.0, top_k=20, max_tokens=max_tokens, seed=seed)


def _run_interleaved(engine, reqs):
    futs = []
    for prefix, tail, max_tokens, seed, wait in reqs:
        futs.append(engine.submit(_PREFIXES[prefix] + tail, _params(max_tokens, seed)))
        for _ in range(wait):
            engine.step()
            engine.pool.check()
            live = {p for s in engine._running for p in s.pages}
            assert all(engine.pool.ref[p] > 0 for p in live)  # a live page is never idle or free
    while engine.has_work:
        engine.step()
        engine.pool.check()
    return [f.result() for f in futs]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(reqs=st.lists(request, min_size=1, max_size=7))
def test_cached_chunked_evicting_generation_equals_plain(paged, plain, reqs):
    got = _run_interleaved(paged, reqs)
    want = plain.generate_ids([_PREFIXES[p] + t for p, t, *_ in reqs], [_params(m, s) for _, _, m, s, _ in reqs])
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.finish_reason for o in got] == [o.finish_reason for o in want]
    assert not paged._running and paged.pool.available() == paged.pool.num_pages


def test_shared_prefix_is_prefilled_once_and_eviction_happens(model, tok):
    eng = Engine(model, tok, max_batch=4, max_len=64, page_size=4, prefill_chunk=8, cache_tokens=96)
    shared = _PREFIXES[0]
    prompts = [shared + [i + 1, i + 2] for i in range(4)]
    outs = eng.generate_ids(prompts, [SamplingParams(temperature=0, max_tokens=3)] * 4)
    # The first request computes the 36 full-page tokens; the other three wait a step and reuse them.
    assert [o.cached_tokens for o in outs] == [0, 36, 36, 36]
    assert eng.stats.deferred_admissions > 0
    assert eng.stats.prefilled_tokens == len(prompts[0]) + 3 * (len(prompts[0]) - 36)
    # Unrelated prompts need more pages than are free: cached idle pages are evicted, not live ones.
    rng = np.random.RandomState(3)
    eng.generate_ids([list(rng.randint(0, V, 40)) for _ in range(3)], [SamplingParams(temperature=0, max_tokens=4)] * 3)
    assert eng.pool.evictions > 0
    eng.pool.check()


def test_long_prompt_is_chunked_while_others_decode(model, tok):
    eng = Engine(model, tok, max_batch=2, max_len=64, page_size=4, prefill_chunk=8)
    short = eng.submit([5, 6, 7], SamplingParams(temperature=0, max_tokens=12))
    eng.step()  # prefill the short prompt
    long = eng.submit(list(range(10, 58)), SamplingParams(temperature=0, max_tokens=2))
    decoded = []
    while not long.done():
        before = eng.stats.decode_steps
        eng.step()
        decoded.append(eng.stats.decode_steps - before)
    # 48 prompt tokens in chunks of 8: six steps, each of which also advanced the short request.
    assert eng.stats.prefill_calls >= 7 and all(d == 1 for d in decoded[:5])
    eng.run_until([short])
    assert len(short.result().token_ids) == 12


def test_scanned_model_serves_its_own_greedy_tokens(tok):
    import jax.numpy as jnp
    scanned = qwen.init_model(qwen_presets.preset("tiny", vocab_size=V, initializer_range=0.5, scan_layers=True), seed=4)
    prompts = [list(range(3, 20)), list(range(40, 45))]
    outs = Engine(scanned, tok, max_batch=2, max_len=64).generate_ids(
        prompts, [SamplingParams(temperature=0, max_tokens=6)] * 2)
    for prompt, o in zip(prompts, outs):
        ids = list(prompt)
        for _ in range(6):  # greedy by full forward passes over the scanned weights
            ids.append(int(jnp.argmax(scanned(jnp.asarray([ids]))[0, -1])))
        assert o.token_ids == ids[len(prompt):]


def test_cost_follows_tokens_not_pool_size(model, tok):
    """Same work on a pool 64x larger compiles to the same step shapes (reads bucketed by use)."""
    small = Engine(model, tok, max_batch=2, max_len=128, page_size=16)
    big = Engine(model, tok, max_batch=2, max_len=8192, page_size=16)
    prompts, params = [list(range(1, 30))] * 2, [SamplingParams(temperature=0, max_tokens=5)] * 2
    assert [o.token_ids for o in small.generate_ids(prompts, params)] == \
        [o.token_ids for o in big.generate_ids(prompts, params)]
    assert {k[2] for k in big._seen_shapes} == {k[2] for k in small._seen_shapes} == {64}


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from("arx"), st.integers(1, 4), st.integers(0, 3)), max_size=40))
def test_page_pool_invariants(ops):
    pool = PagePool(8, 2)
    live: list[list[int]] = []
    for op, n, tokval in ops:
        if op == "a":
            try:
                pages = pool.allocate(n)
            except OutOfPages:
                assert pool.available() < n
                continue
            parent = -1
            for p in pages:
                parent = pool.register(p, parent, [tokval, tokval])
            live.append(pages)
        elif op == "r" and live:
            pool.release(live.pop(n % len(live)))
        elif op == "x":
            found, _ = pool.lookup([tokval] * 8, n)
            pool.acquire(found)
            live.append(found)
        pool.check()
        assert all(pool.ref[p] > 0 for pages in live for p in pages)


def test_decode_writes_the_pool_in_place(model, tok):
    """The compiled decode step aliases the donated pools and its temporaries are a sliver of them."""
    eng = Engine(model, tok, max_batch=8, max_len=8192)
    mem = eng.lower_decode().compile().memory_analysis()
    assert mem.alias_size_in_bytes == eng.cache_bytes()  # every pool written in place
    assert mem.temp_size_in_bytes < 0.05 * eng.cache_bytes()


def test_cancelled_request_leaves_and_frees_its_pages(model, tok):
    eng = Engine(model, tok, max_batch=2, max_len=64, page_size=4)
    keep = eng.submit([1, 2, 3, 4, 5], SamplingParams(temperature=0, max_tokens=8))
    drop = eng.submit([9, 8, 7, 6, 5], SamplingParams(temperature=0, max_tokens=30))
    eng.step()
    assert drop.cancel() is False or drop.cancelled()  # a Future that is not running can be cancelled
    eng.run_until([keep])
    assert not eng.has_work and not eng._running
    assert eng.pool.available() == eng.pool.num_pages
    eng.pool.check()
    alone = Engine(model, tok, max_batch=2, max_len=64, page_size=4).generate_ids(
        [[1, 2, 3, 4, 5]], [SamplingParams(temperature=0, max_tokens=8)])[0]
    assert keep.result().token_ids == alone.token_ids


def test_rows_preempted_for_pages_resume_with_the_same_tokens(model, tok, plain):
    # 3 rows x (20-token prompt + 40 new tokens) need 45 pages of 4; the pool has 24.
    eng = Engine(model, tok, max_batch=3, max_len=64, page_size=4, prefill_chunk=16, cache_tokens=96)
    rng = np.random.RandomState(5)
    prompts = [list(rng.randint(0, V, 20)) for _ in range(3)]
    params = [SamplingParams(temperature=0, max_tokens=40), SamplingParams(temperature=1.0, max_tokens=40, seed=2),
              SamplingParams(temperature=0, max_tokens=40, repetition_penalty=1.3)]
    got = eng.generate_ids(prompts, params)
    assert eng.stats.preemptions > 0
    assert [o.token_ids for o in got] == [o.token_ids for o in plain.generate_ids(prompts, params)]
    assert all(len(o.token_ids) == 40 for o in got)
    eng.pool.check()
