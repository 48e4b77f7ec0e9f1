"""The V4 runtime on the CPU reference: prefill ≡ prefill + decode, continuing prefills, ragged batches, MTP,
generate, and clear errors for bad input.

Tolerances. Prefill and decode run the same math, but a CPU BLAS blocks an fp32 GEMM differently for 140 rows
and for 1 row, so the activations of a token differ by about an ulp between the two paths. Most of that
vanishes, but now and then it moves an FP8/FP4-simulated value (kv cache, compressed entries, indexer
queries) across a rounding boundary; that one step (1/16 of the value for e4m3) then shows in every later
logit, by up to ~5e-3 in what we measured (4 seeds × 140 positions). Discrete choices would turn an ulp into
an O(1) jump (another expert, another top-k entry), so the equivalence tests use ``tiny`` with every expert
active and an indexer top-k larger than the visible entries: the math is then continuous except for those
quantisation steps, and a logit tolerance of 1e-2 holds. While writing these tests we injected the bugs a
cache implementation makes — a window one key short, an HCA entry hidden from the query that completes it,
the CSA overlap lost across the prefill/decode boundary, a wrong indexer visibility, a wrong inverse-RoPE
position — and each moved some decode step's logits by 1.9e-2 to 0.8, above the tolerance.
"""

import pytest
import torch

from tilev4.model import Config, KVCache, Model, random_checkpoint_tensors, write_random_checkpoint
from tilev4.model.backend import KernelOps, ReferenceOps, ops_for_device

LOGIT_TOL = 1e-2  # see the module docstring
CAPACITY = 256


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: the model is tiny and the CI machine's two cores are shared (two threads spin)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def smooth() -> Model:
    """``tiny`` with no discrete choice: all 8 experts active, indexer top-k 64 >= the visible entries (<= 35)."""
    cfg = Config.tiny().replace(name="tiny-smooth", n_activated_experts=8, index_topk=64)
    return Model(cfg, random_checkpoint_tensors(cfg, seed=11))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Model:
    """The ``tiny`` preset, written to disk in the release format and loaded back."""
    directory = write_random_checkpoint(Config.tiny(), tmp_path_factory.mktemp("tiny"), seed=5)
    return Model.from_checkpoint(directory)


def _tokens(gen: torch.Generator, n: int, vocab: int = 512) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=gen).tolist()


@pytest.mark.parametrize(("n", "k"), [(140, 1), (140, 120)])
def test_decode_matches_prefill(smooth, gen, n, k):
    # (140, 1) decodes through 34 CSA entries, the first HCA entry (t = 127) and the ring wrap (t = 128);
    # (140, 120) starts decoding inside a CSA block and an HCA block.
    toks = _tokens(gen, n)
    ref_cache = smooth.new_cache(1, CAPACITY)
    ref = smooth.prefill([toks], ref_cache, all_logits=True)[0]  # [n, vocab], the logits after each token
    assert ref.shape == (n, 512) and torch.isfinite(ref).all()

    cache = smooth.new_cache(1, CAPACITY)
    first = smooth.prefill([toks[:k]], cache)
    assert (first[0] - ref[k - 1]).abs().max() < 1e-4  # the last-position head alone vs per-position heads
    worst = 0.0
    for t in range(k, n):
        out = smooth.decode([toks[t]], cache)  # [1, vocab]
        assert torch.isfinite(out).all()
        worst = max(worst, (out[0] - ref[t]).abs().max().item())
    assert worst < LOGIT_TOL
    assert cache.lengths.tolist() == [n] == ref_cache.lengths.tolist()
    for a, b in zip(cache.layers, ref_cache.layers):  # same cache contents, up to the odd quantisation step
        if a.compressed is not None:
            assert a.compressor.num_tokens.tolist() == [n]
            assert (a.compressed - b.compressed).abs().max() < 0.5
            assert ((a.compressed - b.compressed).abs() > 1e-4).float().mean() < 0.01


@pytest.mark.parametrize("k", [61, 127, 128])
def test_continuing_prefill_matches_prefill(smooth, gen, k):
    # k = 61: mid CSA block; 127 / 128: either side of the first HCA entry and of the ring wrap
    n = 140
    toks = _tokens(gen, n)
    ref = smooth.prefill([toks], smooth.new_cache(1, CAPACITY), all_logits=True)[0]
    cache = smooth.new_cache(1, CAPACITY)
    smooth.prefill([toks[:k]], cache)
    rest = smooth.prefill([toks[k:]], cache, all_logits=True)[0]  # [n - k, vocab]
    assert (rest - ref[k:]).abs().max() < LOGIT_TOL
    chunked = smooth.prefill([toks], smooth.new_cache(1, CAPACITY), chunk_size=37, all_logits=True)[0]
    assert (chunked - ref).abs().max() < LOGIT_TOL


def test_ragged_batch_matches_each_sequence_alone(smooth, gen):
    lengths, more = (5, 70, 130), (3, 1, 9)
    prompts = [_tokens(gen, n) for n in lengths]
    conts = [_tokens(gen, n) for n in more]
    steps = [_tokens(gen, 3) for _ in range(5)]

    batch = smooth.new_cache(3, CAPACITY, mtp=True)
    first = smooth.prefill(prompts, batch)  # [3, vocab]
    second = smooth.prefill(conts, batch)
    decoded = [smooth.decode(s, batch) for s in steps]  # 5 × [3, vocab], each sequence at its own position
    draft = smooth.mtp_draft([1, 2, 3], batch)
    assert batch.lengths.tolist() == [n + m + 5 for n, m in zip(lengths, more)]

    for i in range(3):
        alone = smooth.new_cache(1, CAPACITY, mtp=True)
        # a prefill runs each group of equal (position, length) alone: bit-identical to running it alone
        assert torch.equal(smooth.prefill([prompts[i]], alone)[0], first[i])
        assert torch.equal(smooth.prefill([conts[i]], alone)[0], second[i])
        for s, out in zip(steps, decoded):  # a batched decode step differs only in GEMM blocking
            assert (smooth.decode([s[i]], alone)[0] - out[i]).abs().max() < LOGIT_TOL
        assert (smooth.mtp_draft([i + 1], alone)[0] - draft[i]).abs().max() < LOGIT_TOL

    # a right-padded tensor with lengths is the same input as the lists
    padded = torch.zeros(3, 130, dtype=torch.int64)
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = torch.tensor(p)
    again = smooth.prefill(padded, smooth.new_cache(3, CAPACITY, mtp=True), lengths=list(lengths))
    assert torch.equal(again, first)


def test_mtp_draft_is_the_same_after_prefill_or_decode(smooth, gen):
    toks = _tokens(gen, 90)
    whole = smooth.new_cache(1, CAPACITY, mtp=True)
    smooth.prefill([toks[:-1]], whole)
    ref = smooth.mtp_draft([toks[-1]], whole)  # [1, vocab]: prediction for the token after toks[-1]
    assert torch.isfinite(ref).all() and ref.std() > 0.1

    stepped = smooth.new_cache(1, CAPACITY, mtp=True)
    drafted = smooth.new_cache(1, CAPACITY, mtp=True)
    smooth.prefill([toks[:30]], stepped)
    smooth.prefill([toks[:30]], drafted)
    for t in toks[30:-1]:
        smooth.decode([t], stepped)
        smooth.mtp_draft([t], drafted)  # a draft then the decode of the same token (speculative pattern)
        smooth.decode([t], drafted)
    assert (smooth.mtp_draft([toks[-1]], stepped) - ref).abs().max() < LOGIT_TOL
    assert (smooth.mtp_draft([toks[-1]], drafted) - ref).abs().max() < LOGIT_TOL
    assert not torch.equal(ref, smooth.prefill([toks], smooth.new_cache(1, CAPACITY)))  # not the main head

    with pytest.raises(ValueError, match="already drafted"):
        smooth.mtp_draft([toks[-1]], whole)
    with pytest.raises(ValueError, match="mtp=True"):
        smooth.mtp_draft([1], smooth.new_cache(1, 8))


def test_generate_greedy_and_seeded_sampling(tiny, gen):
    prompts = [_tokens(gen, 7), _tokens(gen, 19)]
    greedy = tiny.generate(prompts, max_new_tokens=6)
    assert [len(g) for g in greedy] == [6, 6]
    assert tiny.generate(prompts, max_new_tokens=6) == greedy  # deterministic
    for i, p in enumerate(prompts):  # the first token is the argmax after the prompt, run alone
        assert greedy[i][0] == int(tiny.prefill([p], tiny.new_cache(1, 32)).argmax())

    sampled = tiny.generate(prompts, max_new_tokens=6, temperature=1.0, seed=123)
    assert tiny.generate(prompts, max_new_tokens=6, temperature=1.0, seed=123) == sampled  # reproducible
    assert tiny.generate(prompts, max_new_tokens=6, temperature=1.0, seed=124) != sampled
    assert all(0 <= t < 512 for seq in sampled for t in seq)

    eos = greedy[0][2]
    stopped = tiny.generate(prompts, max_new_tokens=6, eos_token_id=eos)
    assert stopped[0] == greedy[0][: greedy[0].index(eos) + 1]
    assert tiny.generate(prompts, max_new_tokens=0) == [[], []]


def test_logits_are_finite_and_depend_on_the_input(tiny):
    cache = tiny.new_cache(2, 16)
    logits = tiny.prefill([[1, 2, 3], [1, 2, 4]], cache)
    assert logits.shape == (2, 512) and logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert 0.3 < logits.std().item() < 3.0  # random weights of sensible scale: O(1) logits
    assert (logits[0] - logits[1]).abs().max() > 1e-3


def test_bad_inputs_raise_clear_errors(tiny):
    cache = tiny.new_cache(2, 8)
    with pytest.raises(ValueError, match=r"tokens\[1\]\[2\] must be a token id in \[0, vocab_size=512\), got 512"):
        tiny.prefill([[1], [1, 2, 512]], cache)
    with pytest.raises(ValueError, match=r"tokens\[0\]\[0\] must be a token id .* got -1"):
        tiny.prefill([[-1], [1]], cache)
    with pytest.raises(ValueError, match=r"tokens\[0\]\[0\] must be an int token id, got float 1.5"):
        tiny.prefill([[1.5], [1]], cache)
    with pytest.raises(ValueError, match=r"tokens\[1\] is empty"):
        tiny.prefill([[1], []], cache)
    with pytest.raises(ValueError, match=r"one sequence per cache row \(2\), got 1"):
        tiny.prefill([[1]], cache)
    with pytest.raises(ValueError, match=r"sequence 1 would hold 9 tokens .* capacity 8"):
        tiny.prefill([[1], list(range(9))], cache)
    assert cache.lengths.tolist() == [0, 0]  # nothing was written by the failed calls
    with pytest.raises(ValueError, match=r"next_tokens\[1\] must be a token id .* got 600"):
        tiny.decode([1, 600], cache)
    with pytest.raises(ValueError, match=r"one token per cache row \(2\), got 3"):
        tiny.decode([1, 2, 3], cache)
    other = Config.tiny().replace(name="tiny-smooth", n_activated_experts=8, index_topk=64)
    with pytest.raises(ValueError, match="cache was made for config 'tiny-smooth'"):
        tiny.prefill([[1]], KVCache(other, 1, 8))
    with pytest.raises(TypeError, match="cache must be a KVCache"):
        tiny.decode([1], None)
    with pytest.raises(ValueError, match=r"tokens\[0\] is empty"):
        tiny.generate([[]], max_new_tokens=2)
    with pytest.raises(ValueError, match="temperature must be a number >= 0, got -1"):
        tiny.generate([[1]], max_new_tokens=2, temperature=-1)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0, got -1"):
        tiny.generate([[1]], max_new_tokens=-1)
    with pytest.raises(ValueError, match="prompts must be a non-empty list"):
        tiny.generate([], max_new_tokens=1)
    with pytest.raises(ValueError, match=r"lengths\[0\] must be <= the padded length 2, got 3"):
        tiny.prefill(torch.ones(2, 2, dtype=torch.int64), cache, lengths=[3, 1])


def test_backend_per_device():
    assert type(ops_for_device("cpu")) is ReferenceOps
    assert isinstance(ops_for_device("cuda"), KernelOps)  # constructing it needs no GPU
