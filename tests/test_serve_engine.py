"""The serving engine: continuous batching gives `generate`'s greedy tokens whatever else is
decoding, nothing compiles after warm-up, sampling is per request, stop tokens and cancels
free their slots, the KV cache lies over the tensor axis; and the scorer `eval --tasks` uses
agrees with the engine's prompt log-probabilities."""

import dataclasses
import threading
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

from bigjax import models
from bigjax.generate import Sampling, generate
from bigjax.scoring import Scorer
from bigjax.serving import engine as E
from bigjax.serving import programs

# mixed lengths across the 16/32/64 buckets, more prompts than slots: later ones are prefilled
# into slots freed while the others keep decoding
PROMPTS = [
    [5, 17, 42, 99, 3, 250],
    [7, 8],
    [300, 1, 2, 3],
    list(range(1, 30)),
    [9] * 20,
    [4],
    [11, 12, 13],
    [250] * 40,
]


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config()
    graphdef, params = nnx.split(models.build(cfg.model, cfg.mesh.rules, seed=0))
    return cfg, graphdef, params


@pytest.fixture(scope="module")
def engine(tiny):
    """One warmed-up engine with 4 slots for the tests that need no special one."""
    eng = _engine(tiny)
    yield eng
    eng.stop()


def _engine(tiny, **kw):
    cfg, graphdef, params = tiny
    kw = {"slots": 4, "max_len": 64, "max_waiting": 32, **kw}
    eng = E.Engine(graphdef, params, cfg.mesh.rules, **kw)
    eng.warm_up()
    eng.start()
    return eng


def _run(eng, prompts, params, cancel_after=None):
    """Token ids and finish reasons per prompt, all submitted at once."""
    tokens = [[] for _ in prompts]
    reasons = [None] * len(prompts)
    done = threading.Semaphore(0)
    seqs = []

    def sink(i):
        def emit(ev):
            if isinstance(ev, E.Token):
                tokens[i].append(ev.id)
                if cancel_after is not None and len(tokens[i]) == cancel_after:
                    seqs[i].cancel()
            elif isinstance(ev, E.Finished):
                reasons[i] = ev.reason
                done.release()

        return emit

    seqs.extend(
        E.Sequence_(p, q, sink(i)) for i, (p, q) in enumerate(zip(prompts, params, strict=True))
    )
    eng.submit(seqs)
    for _ in prompts:
        assert done.acquire(timeout=60)
    return tokens, reasons


@pytest.mark.slow
def test_greedy_tokens_equal_generate_alone_and_among_seven_others(tiny, engine):
    cfg, graphdef, params = tiny
    want = [generate(graphdef, params, [p], Sampling(max_new_tokens=12))[0] for p in PROMPTS]
    together, reasons = _run(engine, PROMPTS, [E.Params(max_tokens=12)] * len(PROMPTS))
    alone, _ = _run(engine, PROMPTS[3:4], [E.Params(max_tokens=12)])
    assert engine.counts() == {"running": 0, "waiting": 0, "slots": 4}
    assert together == want
    assert alone == want[3:4]
    assert reasons == ["length"] * len(PROMPTS)


@pytest.mark.slow
def test_nothing_compiles_after_warm_up(tiny):
    # Each program may be traced once per shape it is warmed up with (a prefill per bucket, one
    # decode): a retrace while serving (a new prompt length, a weak type) fails the sequence.
    chex.clear_trace_counter()
    buckets = E.buckets_for(64)

    def wrap(fn):
        return chex.assert_max_traces(fn, n=len(buckets) if fn.__name__ == "prefill" else 1)

    eng = _engine(tiny, wrap=wrap)
    try:
        for wave in (
            [PROMPTS[0], PROMPTS[7]],
            PROMPTS[1:5],
            [[3] * n for n in (1, 15, 16, 17, 33, 60)],
        ):
            params = [E.Params(max_tokens=4, temperature=t) for t in (0.0, 0.7) * 4][: len(wave)]
            _, reasons = _run(eng, wave, params)
            assert "error" not in reasons
    finally:
        eng.stop()


@pytest.mark.slow
def test_sampling_is_per_request_and_seeded(engine):
    p = [5, 17, 42]
    hot = E.Params(max_tokens=10, temperature=1.0, seed=7)
    other = E.Params(max_tokens=10, temperature=1.0, seed=8)
    runs, _ = _run(engine, [p, p, p, p], [hot, hot, other, E.Params(max_tokens=10)])
    top1, _ = _run(engine, [p], [E.Params(max_tokens=10, temperature=1.0, top_k=1, seed=3)])
    assert runs[0] == runs[1]  # same seed, same tokens, though decoded in different slots
    assert runs[0] != runs[2]  # another seed
    assert top1[0] == runs[3]  # top-k 1 is greedy, whatever the temperature


@pytest.mark.slow
def test_stop_tokens_and_cancels_free_their_slots(engine):
    (greedy,), _ = _run(engine, [[5, 6, 7]], [E.Params(max_tokens=6)])
    stop = E.Params(max_tokens=6, stop_ids=frozenset({greedy[2]}))
    (stopped,), (reason,) = _run(engine, [[5, 6, 7]], [stop])
    long = [E.Params(max_tokens=50)] * 6  # six sequences, four slots: cancels make room
    toks, reasons = _run(engine, [[1, 2]] * 6, long, cancel_after=3)
    assert engine.counts()["running"] == 0
    assert stopped == greedy[: greedy.index(greedy[2]) + 1] and reason == "stop"
    assert reasons == ["cancelled"] * 6 and all(3 <= len(t) <= 5 for t in toks)


def _greedy_reference(tiny, prompt, n, bias=(), presence=0.0, frequency=0.0, repetition=1.0):
    """Greedy tokens by the formula itself: a full forward pass over the sequence so far (no
    cache), then OpenAI's logit bias, Hugging Face's repetition penalty over the sequence so
    far, and OpenAI's penalties over the tokens generated so far."""
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor

    penalize = RepetitionPenaltyLogitsProcessor(repetition) if repetition != 1.0 else None
    cfg, graphdef, params = tiny
    model = nnx.merge(graphdef, params)
    bias_V = np.zeros((cfg.model.vocab_size,), np.float32)
    for t, b in bias:
        bias_V[t] += b
    count_V = np.zeros_like(bias_V)
    seq = list(prompt)
    for _ in range(n):
        tokens = jnp.asarray([seq], jnp.int32)
        logits_V = np.asarray(model(tokens, jnp.ones_like(tokens), jnp.arange(len(seq))[None]))
        logits_V = logits_V[0, -1].astype(np.float32) + bias_V
        if penalize is not None:
            logits_V = penalize(torch.tensor([seq]), torch.tensor(logits_V[None]))[0].numpy()
        logits_V = logits_V - frequency * count_V - presence * (count_V > 0)
        seq.append(int(np.argmax(logits_V)))
        count_V[seq[-1]] += 1
    return seq[len(prompt) :]


@pytest.mark.slow
def test_logit_bias_and_penalties_equal_the_formula_applied_by_hand(tiny, engine):
    # OpenAI's definition: logits + bias - frequency * count - presence * (count > 0), the
    # counts over the tokens generated so far. Rows with and without adjustments decode side
    # by side in one step, so a bias leaking into another slot (or kept from a slot's last
    # user) shows as a wrong token.
    prompt = PROMPTS[0]
    (plain,), _ = _run(engine, [prompt], [E.Params(max_tokens=8)])
    cases = [
        {"logit_bias": ((42, 100.0),)},  # forced
        {"logit_bias": tuple((t, -100.0) for t in set(plain))},  # every greedy token banned
        {"frequency_penalty": 2.0},
        {"presence_penalty": 1.5, "frequency_penalty": -0.5, "logit_bias": ((7, 3.0),)},
        {"repetition_penalty": 3.0},  # the prompt's tokens are penalised from the first token
        {"repetition_penalty": 0.5, "presence_penalty": 0.5},
    ]
    params = [E.Params(max_tokens=8, **c) for c in cases] + [E.Params(max_tokens=8)] * 2
    got, _ = _run(engine, [prompt] * len(params), params)
    bias_keys = {
        "logit_bias": "bias",
        "presence_penalty": "presence",
        "frequency_penalty": "frequency",
        "repetition_penalty": "repetition",
    }
    for c, tokens in zip(cases, got, strict=False):
        want = _greedy_reference(tiny, prompt, 8, **{bias_keys[k]: v for k, v in c.items()})
        assert tokens == want, c
    assert got[0] == [42] * 8 and not set(got[1]) & set(plain)
    assert got[-2:] == [plain, plain]  # the neutral rows beside them: untouched


@pytest.mark.slow
def test_a_biased_tokens_log_probability_is_the_models_own(tiny, engine):
    # The reported log-probabilities are the model's (as vLLM reports them): forcing a token
    # with a bias must not report it as certain.
    cfg, graphdef, params = tiny
    got = []
    bias = E.Params(max_tokens=6, logit_bias=((42, 100.0),))
    done = threading.Event()
    seq = E.Sequence_(
        PROMPTS[1], bias, lambda e: (got.append(e), isinstance(e, E.Finished) and done.set())
    )
    engine.submit([seq])
    assert done.wait(60)
    tokens = [e for e in got if isinstance(e, E.Token)]
    (want,) = Scorer(graphdef, params, 64).score([(PROMPTS[1], [42] * 6)])
    # f32, cached decode against the scorer's forward pass: ~1e-7 per token
    np.testing.assert_allclose([t.logprob for t in tokens], want.logprobs, atol=1e-5, rtol=0)
    assert all(t.logprob < -1.0 for t in tokens)


def test_clients_refused_together_are_told_successive_turns(tiny):
    """A full queue refuses at once, and tells each client refused when its turn would come
    had it queued on behind the queue: places free one every hold time / slots (a second
    per sequence until one has finished: 0.25 s with 4 slots). One time for all (or random
    ones) would bring them back as a crowd, or out of turn."""
    cfg, graphdef, params = tiny
    eng = E.Engine(graphdef, params, cfg.mesh.rules, slots=4, max_len=64, max_waiting=2)
    # not started: nothing leaves the queue, so each refusal is measured against the last
    eng.submit([E.Sequence_([1], E.Params(max_tokens=1), lambda ev: None) for _ in range(2)])
    waits = []
    for n in (1, 1, 1, 2, 1):
        with pytest.raises(E.QueueFull) as refused:
            eng.submit([E.Sequence_([1], E.Params(max_tokens=1), lambda ev: None)] * n)
        waits.append(refused.value.retry_after_s)
        assert f"retry in {waits[-1]:.1f} s" in str(refused.value)
    # the first needs n places freed; each next one comes after the places of those before.
    # 0.05 s: the few microseconds between the calls, with room for a slow machine
    assert waits == pytest.approx([0.25 * k for k in (1, 2, 3, 4, 6)], abs=0.05)
    assert eng.counts() == {"running": 0, "waiting": 2, "slots": 4}


def test_per_row_sampling_filters():
    logits = jax.numpy.log(jax.numpy.asarray([[0.5, 0.3, 0.15, 0.05]] * 3))
    sample_rows = jax.jit(programs.sample_rows)  # compiled once: eager, each `cond` compiles
    rows = programs.row_sampling([(1.0, 2, 1.0, 0.0, s, 0, False) for s in range(3)])
    draws = {
        int(sample_rows(logits, rows._replace(seed=np.full(3, s, np.uint32)))[0]) for s in range(60)
    }
    assert draws == {0, 1}  # top-k 2 keeps exactly the two most likely
    rows = programs.row_sampling([(1.0, 0, 0.7, 0.0, 0, 0, False)] * 3)
    draws = {
        int(sample_rows(logits, rows._replace(seed=np.full(3, s, np.uint32)))[0]) for s in range(60)
    }
    assert draws == {0, 1}  # top-p 0.7: 0.5 alone is short of it, 0.5 + 0.3 reaches it
    for min_p, kept in ((0.5, {0, 1}), (0.2, {0, 1, 2})):  # p >= min_p * 0.5 survives
        rows = programs.row_sampling([(1.0, 0, 1.0, min_p, 0, 0, False)] * 3)
        draws = {
            int(sample_rows(logits, rows._replace(seed=np.full(3, s, np.uint32)))[0])
            for s in range(60)
        }
        assert draws == kept, min_p
    greedy = programs.row_sampling([(0.0, 0, 1.0, 0.0, 0, 0, False)] * 3)
    assert sample_rows(logits, greedy).tolist() == [0, 0, 0]


def test_adjusted_logits_are_openais_formula_after_hugging_faces_repetition_penalty():
    # The repetition penalty as vLLM and Hugging Face apply it (a positive logit divided, a
    # negative one multiplied, on every token of the prompt and of the reply), checked
    # against transformers' own processor; then OpenAI's penalties over the reply's counts.
    torch = pytest.importorskip("torch", reason="installed by the README's test command")
    from transformers import RepetitionPenaltyLogitsProcessor

    rng = np.random.default_rng(0)
    vocab, prompt, reply = 40, [3, 7, 7, 11], [11, 20, 20]
    logits_BV = (rng.normal(size=(2, vocab)) * 3).astype(np.float32)
    counts_V = np.bincount(reply, minlength=vocab).astype(np.int32)
    prompt_V = np.zeros(vocab, bool)
    prompt_V[prompt] = True
    bias_V = np.zeros(vocab, np.float32)
    bias_V[[7, 30]] = (2.5, -4.0)
    slots = programs.Slots(
        None, None, None, None, None, np.stack([bias_V, bias_V]), np.stack([counts_V] * 2),
        np.stack([prompt_V] * 2), np.float32([0.4, 0.0]), np.float32([0.25, 0.0]),
        np.float32([1.7, 1.0]),
    )  # fmt: skip
    got = np.asarray(programs.adjusted(jnp.asarray(logits_BV), slots))
    penalized = RepetitionPenaltyLogitsProcessor(1.7)(
        torch.tensor([prompt + reply]), torch.tensor(logits_BV[:1] + bias_V)
    )[0].numpy()
    want = penalized - 0.25 * counts_V - 0.4 * (counts_V > 0)
    np.testing.assert_allclose(got[0], want, rtol=1e-6, atol=1e-6)  # f32: one rounding each
    assert np.array_equal(got[1], logits_BV[1] + bias_V)  # neutral: bit-identical


@pytest.mark.slow
def test_kv_cache_lies_over_the_tensor_axis(tiny):
    from bigjax.mesh import make_mesh

    cfg, graphdef, params = tiny
    mesh = make_mesh(dataclasses.replace(cfg.mesh, shape=(1, 4, 2)))
    with jax.set_mesh(mesh):
        eng = E.Engine(
            graphdef, params, cfg.mesh.rules, slots=2, max_len=32, max_waiting=4, mesh=mesh
        )
        spec = eng._slots.cache_k.sharding.spec
    assert spec[3] == "tensor"  # [N, B, S, G, K]: the kv heads split over the tensor axis


@pytest.mark.slow
def test_prompt_log_probabilities_equal_the_scorer(tiny, engine):
    # The server's echo log-probabilities (the engine's prefill, cached attention) and
    # `eval --tasks` (the scorer, the training forward pass) are two code paths for one number.
    cfg, graphdef, params = tiny
    got = []
    seq = E.Sequence_(PROMPTS[3], E.Params(max_tokens=0, prompt_scores=True), got.append)
    engine.submit([seq])
    deadline = time.monotonic() + 30
    while not any(isinstance(e, E.Finished) for e in got) and time.monotonic() < deadline:
        time.sleep(0.01)
    scores = next(e for e in got if isinstance(e, E.PromptScored))
    (want,) = Scorer(graphdef, params, 64).score([(PROMPTS[3][:1], PROMPTS[3][1:])])
    # f32; the two paths differ only in summation order over masked keys: ~1e-7 per token
    np.testing.assert_allclose(scores.logprobs, want.logprobs, atol=1e-5, rtol=0)


def test_packed_scoring_equals_each_sequence_scored_alone(tiny):
    # Many pairs share rows (segment ids, restarted positions) in rows sized to the longest
    # sequence; pairs with one context share its forward pass (a tree mask); each pair alone
    # is one plain causal sequence. Lengths cross every bucket up to the context (64) and past
    # it (cut from the left); one context's six choices overflow a row and split. A packing,
    # position or mask slip moves a score onto another sequence's tokens. The reference is
    # the training forward pass on each sequence alone.
    _, graphdef, params = tiny
    model = nnx.merge(graphdef, params)

    def alone(ctx, cont):
        seq = (ctx + cont)[-65:]
        n = min(len(cont), len(seq) - 1)
        logits = model(jnp.asarray([seq[:-1]]), jnp.ones((1, len(seq) - 1), jnp.int32),
                       jnp.arange(len(seq) - 1)[None])[0]  # fmt: skip
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        targets = jnp.asarray(seq[1:])
        lp = jnp.take_along_axis(logp, targets[:, None], -1)[-n:, 0]
        return np.asarray(lp), bool((jnp.argmax(logp, -1) == targets)[-n:].all())

    rng = np.random.default_rng(0)
    ids = lambda n: [int(x) for x in rng.integers(1, 500, size=n)]  # noqa: E731
    shared = ids(12)
    pairs = [
        (ids(c), ids(n))
        for c, n in [(1, 1), (3, 5), (20, 2), (0, 9), (40, 30), (7, 1), (63, 1), (2, 14)]
    ]
    pairs += [(shared, ids(n)) for n in (1, 4, 9, 1, 30, 12)]  # 12 + 57 > a 64-token row
    pairs += [(shared[:5], ids(3)), (shared[:5], ids(3))]  # another context
    pairs += [pairs[9], pairs[1]]  # asked twice: scored once, so equal to the bit
    scorer = Scorer(graphdef, params, 64, tokens=256)  # 4 rows of 64: several batches
    together = scorer.score(pairs)
    assert [len(s.logprobs) for s in together[:8]] == [1, 5, 2, 8, 30, 1, 1, 14]
    assert [len(s.logprobs) for s in together[8:]] == [1, 4, 9, 1, 30, 12, 3, 3, 4, 5]
    assert together[-2] == together[9] and together[-1] == together[1]
    # no context shared: the training forward pass (the backend's kernel, no [L, L] mask)
    singles = pairs[:8]
    for got, pair in zip(scorer.score(singles), singles, strict=True):
        np.testing.assert_allclose(got.logprobs, alone(*pair)[0], atol=1e-5, rtol=0)
    for got, pair in zip(together, pairs, strict=True):
        want, greedy = alone(*pair)
        # f32; the passes differ only in which masked keys are summed: ~1e-7 per token
        np.testing.assert_allclose(got.logprobs, want, atol=1e-5, rtol=0)
        assert got.greedy == greedy
    assert [scorer.row_length(n) for n in (5, 20, 40, 64)] == [32, 32, 64, 64]


def test_prompts_and_special_tokens_read_alike_for_every_tokenizer_kind(tmp_path):
    # what /tokenize, /tokenizer_info and prompts rely on, for byte, BPE and SentencePiece
    import sysconfig
    from pathlib import Path

    import sentencepiece as spm

    from bigjax.data import tokenizer as tk

    corpus = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text().splitlines()
    sp = tmp_path / "sp"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(sp), vocab_size=300, pad_id=3,
        minloglevel=2,
    )  # fmt: skip
    kinds = [tk.ByteTokenizer(), tk.train_bpe(corpus, 320),
             tk.SentencePieceTokenizer((tmp_path / "sp.model").read_bytes())]  # fmt: skip
    for tok in kinds:
        names = tk.special_tokens(tok)
        assert sorted(names.values()) == sorted({tok.bos_id, tok.eos_id, tok.pad_id}), tok.kind
        eos = next(k for k, v in names.items() if v == tok.eos_id)
        ids = tk.encode_prompt(tok, f"def f(x):{eos} return x", add_bos=True)
        want = [tok.bos_id, *tok.encode("def f(x):"), tok.eos_id, *tok.encode(" return x")]
        assert ids == want, tok.kind
        assert tk.encode_prompt(tok, "return x", add_bos=False) == tok.encode("return x").tolist()


def test_calls_cross_the_wire_between_hosts_unchanged():
    # What process 0 broadcasts to the others: every field of a prefill and a decode call
    # (a shifted column would give another host other sampling, and its programs diverge).
    from bigjax.serving import hosts

    wire = hosts.Wire(max_len=32, slots=3)
    one = programs.row_sampling([(0.7, 40, 0.9, 0.05, 2**32 - 3, 0, True)])
    prefill = hosts.Call(hosts.PREFILL, np.arange(1, 17, dtype=np.int32), 5, 2, sampling=one)
    decode = hosts.Call(
        hosts.DECODE, active_B=np.array([True, False, True]),
        sampling=programs.row_sampling(
            [(0.0, 0, 1.0, 0.0, 7, 3, False), (1.5, 5, 0.5, 0.2, 2**31, 9, True),
             (0.2, 1, 0.1, 1.0, 1, 0, False)]
        ),
    )  # fmt: skip
    for call in (prefill, decode, hosts.Call(hosts.STOP)):
        got = wire.unpack(*wire.pack(call))
        assert (got.kind, got.n, got.row) == (call.kind, call.n, call.row)
        for a, b in ((got.tokens_T, call.tokens_T), (got.active_B, call.active_B)):
            assert (a is None and b is None) or np.array_equal(a, b)
        if call.sampling is not None:
            for name, a, b in zip(call.sampling._fields, got.sampling, call.sampling, strict=True):
                assert a.dtype == b.dtype and np.array_equal(a, b), name


def test_logit_adjustments_cross_the_wire_between_hosts_unchanged():
    # A prefill carries its request's bias and penalties to the other hosts: a shifted or
    # dropped entry would have one host sample other tokens and the programs diverge.
    from bigjax.serving import hosts

    wire = hosts.Wire(max_len=32, slots=3)
    bias = tuple(
        (int(t), float(b))
        for t, b in zip(range(5, 5 + 3 * 300, 3), np.linspace(-100, 100, 300), strict=True)
    )
    adjust = programs.adjustments(bias, presence=-1.25, frequency=2.0, repetition=1.3)
    one = programs.row_sampling([(0.7, 40, 0.9, 0.1, 5, 0, True)])
    call = hosts.Call(hosts.PREFILL, np.arange(1, 17, dtype=np.int32), 5, 2, sampling=one,
                      adjustments=adjust)  # fmt: skip
    got = wire.unpack(*wire.pack(call)).adjustments
    for name, a, b in zip(adjust._fields, got, adjust, strict=True):
        assert np.asarray(a).dtype == np.asarray(b).dtype and np.array_equal(a, b), name
    with pytest.raises(ValueError, match="at most 300"):
        programs.adjustments(((1, 1.0),) * 301)
