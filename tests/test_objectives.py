"""The three self-supervised objectives: causal LM shift, BERT masking statistics (and whole-word units),
T5 span corruption (round trip, sizes, span statistics)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from glassmind.data import objectives as obj
from glassmind.data.objectives import IGNORE_INDEX


def test_causal_lm_targets_are_inputs_shifted_by_one():
    window = torch.arange(20).reshape(2, 10)
    inputs, targets = obj.causal_lm(window)
    assert inputs.shape == targets.shape == (2, 9)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert torch.equal(targets, window[:, 1:])


def test_cross_entropy_ignores_minus_100_and_matches_manual_mean():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    targets = torch.tensor([[1, IGNORE_INDEX, 3, 4, IGNORE_INDEX], [0, 6, IGNORE_INDEX, 2, 5]])
    logp = logits.log_softmax(-1)
    keep = targets != IGNORE_INDEX
    manual = -logp[keep].gather(1, targets[keep][:, None]).mean()
    assert torch.allclose(obj.cross_entropy(logits, targets), manual, atol=1e-6)
    # bf16 logits are upcast: the loss is computed in fp32
    assert obj.cross_entropy(logits.bfloat16(), targets).dtype == torch.float32


# ----------------------------------------------------------------------------------------------------
# masked LM


MASK, SPECIAL, V = 1, 2, 30000


def _masked(seed=0, B=64, T=512, **kw):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, V, (B, T), generator=g)
    ids[:, ::50] = SPECIAL  # separators sprinkled through the stream
    inputs, labels = obj.mask_tokens(ids, mask_id=MASK, vocab_size=V, special_ids=[SPECIAL], generator=g, **kw)
    return ids, inputs, labels


def test_mlm_statistics_15_percent_then_80_10_10():
    ids, inputs, labels = _masked()
    chosen = labels != IGNORE_INDEX
    eligible = ids != SPECIAL
    n = int(eligible.sum())
    rate = chosen.sum().item() / n
    assert abs(rate - 0.15) < 0.005, rate  # ~28k eligible tokens: the std of the rate is 0.002
    c = chosen.sum().item()
    to_mask = (inputs[chosen] == MASK).sum().item() / c
    unchanged = (inputs[chosen] == ids[chosen]).sum().item() / c
    randomised = 1 - to_mask - unchanged
    assert abs(to_mask - 0.8) < 0.015 and abs(unchanged - 0.1) < 0.01 and abs(randomised - 0.1) < 0.01


def test_mlm_labels_and_untouched_positions():
    ids, inputs, labels = _masked(seed=1)
    chosen = labels != IGNORE_INDEX
    assert torch.equal(labels[chosen], ids[chosen])          # the label is the original token
    assert torch.equal(inputs[~chosen], ids[~chosen])        # nothing else changes
    assert not chosen[ids == SPECIAL].any()                  # separators are never chosen
    assert (labels[~chosen] == IGNORE_INDEX).all()


def test_mlm_is_a_function_of_the_generator_seed():
    a, b = _masked(seed=3), _masked(seed=3)
    c = _masked(seed=4)
    assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    assert not torch.equal(a[2], c[2])


def test_whole_word_masking_chooses_words_as_units():
    # ids >= 20000 play WordPiece '##' continuation pieces
    continuation = torch.zeros(V, dtype=torch.bool)
    continuation[20000:] = True
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, V, (64, 256), generator=g)
    inputs, labels = obj.mask_tokens(ids, mask_id=MASK, vocab_size=V, generator=g, continuation=continuation)
    chosen = labels != IGNORE_INDEX
    is_start = ~continuation[ids]
    is_start[:, 0] = True
    word = is_start.long().cumsum(1)  # word number of each position in its row
    n_words, n_chosen_words = 0, 0
    for row in range(ids.shape[0]):
        for w in word[row].unique():
            c = chosen[row][word[row] == w]
            assert c.all() or not c.any(), "a word was split by masking"
            n_words += 1
            n_chosen_words += int(c[0])
    assert abs(n_chosen_words / n_words - 0.15) < 0.02
    # and whole words really span several pieces here (the test would be vacuous otherwise)
    assert (chosen & ~is_start).any()


def test_continuation_table_reads_wordpiece_prefixes():
    from glassmind.tokenizer.wordpiece import WordPieceTokenizer

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "play", "##ing", "##", "un"])}
    table = obj.continuation_table(WordPieceTokenizer(vocab))
    assert table.tolist() == [False, False, False, False, False, False, True, False, False]


# ----------------------------------------------------------------------------------------------------
# span corruption

SENTINELS = list(range(1000, 1200))
START = END = 999


@settings(max_examples=60)
@given(raw=st.integers(2, 300), batch=st.integers(1, 3), seed=st.integers(0, 2**31 - 1),
       density=st.sampled_from([0.15, 0.3, 0.5]), mean=st.sampled_from([1.0, 3.0, 5.0]))
def test_span_corruption_round_trip(raw, batch, seed, density, mean):
    g = torch.Generator().manual_seed(seed)
    window = torch.randint(0, 999, (batch, raw), generator=g)
    window[0, 0] = END  # the end token may occur in the text itself
    sb = obj.span_corrupt(window, sentinel_ids=SENTINELS, start_id=START, end_id=END, noise_density=density,
                          mean_span=mean, generator=g)
    sl = obj.span_lengths(raw, density, mean)
    assert sb.encoder_ids.shape == (batch, sl.encoder)
    assert sb.decoder_target.shape == sb.decoder_input.shape == (batch, sl.decoder)
    assert (sb.decoder_input[:, 0] == START).all()
    assert torch.equal(sb.decoder_input[:, 1:], sb.decoder_target[:, :-1])
    assert (sb.decoder_target[:, -1] == END).all()
    for i in range(batch):
        enc_sentinels = [t for t in sb.encoder_ids[i].tolist() if t in SENTINELS]
        assert enc_sentinels == SENTINELS[: sl.spans]  # one per span, in order
        assert obj.reconstruct_spans(sb.encoder_ids[i], sb.decoder_target[i], SENTINELS, END) == window[i].tolist()


def test_span_corruption_sizes_and_mean_span_length():
    sl = obj.span_lengths(1000)
    assert (sl.noise, sl.spans) == (150, 50)
    g = torch.Generator().manual_seed(0)
    lengths, first_positions = [], 0
    for _ in range(50):
        mask = obj.noise_mask(sl, g)
        assert int(mask.sum()) == 150
        first_positions += int(mask[0])
        edges = torch.cat([torch.tensor([False]), mask, torch.tensor([False])]).int().diff()
        starts, ends = (edges == 1).nonzero().flatten(), (edges == -1).nonzero().flatten()
        assert len(starts) == 50  # exactly `spans` noise spans, never merged
        lengths += (ends - starts).tolist()
    assert abs(sum(lengths) / len(lengths) - 3.0) < 1e-9  # 150 noise tokens / 50 spans, by construction
    assert max(lengths) > 3  # lengths vary (a random segmentation), not all equal to the mean
    assert first_positions == 0  # T5 starts with a kept span


def test_span_lengths_for_context_fill_the_context():
    for context in (16, 64, 256, 512):
        sl = obj.span_lengths_for_context(context)
        assert sl.encoder <= context and sl.decoder <= context
        assert obj.span_lengths(sl.raw + 1).encoder > context  # the longest raw window that fits
    # T5's standard: 568 raw tokens -> 85 noise tokens in 28 spans; targets 85 + 28 + EOS = 114
    sl = obj.span_lengths(568)
    assert (sl.noise, sl.spans, sl.decoder) == (85, 28, 114)


def test_span_corruption_needs_enough_sentinels():
    with pytest.raises(ValueError, match="sentinel"):
        obj.span_corrupt(torch.zeros(1, 100, dtype=torch.long), sentinel_ids=[1, 2], start_id=0, end_id=0)


# ----------------------------------------------------------------------------------------------------
# the fused output projection + cross-entropy (linear_cross_entropy)


def _lce_problem(N=100, C=24, V=50, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, C, generator=g)
    weight = torch.randn(V, C, generator=g) * 0.3
    b = torch.randn(V, generator=g) if bias else None
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::7] = IGNORE_INDEX
    return hidden, weight, b, targets


def _loss_and_grads(loss_fn, hidden, weight, bias, targets, *, autocast=False, dtype=None, scale=0.5):
    """Loss and gradients (hidden, weight[, bias]) of `scale * loss` (a caller's 1/accum reaches backward)."""
    leaves = [x.detach().to(dtype or x.dtype).requires_grad_() for x in (hidden, weight, bias) if x is not None]
    h, w, b = (leaves + [None])[:3]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = loss_fn(h, w, b, targets)
    (scale * loss).backward()
    return [loss.detach().double()] + [x.grad.double() for x in leaves]


def _materialised(h, w, b, t):
    return obj.cross_entropy(torch.nn.functional.linear(h, w, b), t)


def _fused(chunk_rows):
    return lambda h, w, b, t: obj.linear_cross_entropy(h, w, t, b, chunk_rows=chunk_rows)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 1000])  # 7 and 64 do not divide N = 100; 1000 > N
def test_linear_cross_entropy_equals_materialised_logits_in_fp32(bias, chunk_rows):
    problem = _lce_problem(bias=bias)
    want = _loss_and_grads(_materialised, *problem)
    got = _loss_and_grads(_fused(chunk_rows), *problem)
    assert len(got) == len(want) == (4 if bias else 3)
    for g, w in zip(got, want):
        assert _rel(g, w) < 1e-6
    assert float(want[1][::7].abs().max()) == 0  # ignored rows: no gradient reaches their hidden states
    assert float(got[1][::7].abs().max()) == 0


@pytest.mark.parametrize("bias", [False, True])
def test_linear_cross_entropy_under_bf16_autocast_is_as_accurate_as_the_autocast_reference(bias):
    problem = _lce_problem(N=300, C=32, V=200, bias=bias, seed=1)
    truth = _loss_and_grads(_materialised, *problem, dtype=torch.float64)
    ref = _loss_and_grads(_materialised, *problem, autocast=True)
    got = _loss_and_grads(_fused(64), *problem, autocast=True)
    assert got[0].item() != truth[0].item()  # bf16 products really ran
    for g, r, t in zip(got, ref, truth):
        assert _rel(g, r) < 1e-2                          # bf16 agreement with the materialised path
        assert _rel(g, t) <= 1.5 * _rel(r, t) + 1e-6      # and no less accurate than it, against fp64
    # the gradients come back in the dtype of each input, as autograd requires
    h, w = problem[0].requires_grad_(), problem[1].requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        obj.linear_cross_entropy(h, w, problem[3]).backward()
    assert h.grad.dtype == w.grad.dtype == torch.float32


def test_linear_cross_entropy_tied_weight_accumulates_both_gradients():
    """A weight used as the token embedding and as the output projection (GPT-2's tying) gets the sum of
    both gradients, as with materialised logits."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 40, (3, 9), generator=g)
    targets = torch.randint(0, 40, (3, 9), generator=g)
    targets[0, :4] = IGNORE_INDEX
    mix = torch.randn(16, 16, generator=g)

    def grad_of(loss_fn):
        emb = torch.nn.Embedding(40, 16)
        with torch.no_grad():
            emb.weight.copy_(torch.randn(40, 16, generator=torch.Generator().manual_seed(3)))
        hidden = torch.tanh(emb(ids) @ mix)                                         # (B, T, C)
        loss = loss_fn(hidden, emb.weight, targets)
        loss.backward()
        return loss.detach(), emb.weight.grad

    want_loss, want = grad_of(lambda h, w, t: obj.cross_entropy(h @ w.t(), t))
    got_loss, got = grad_of(lambda h, w, t: obj.linear_cross_entropy(h, w, t, chunk_rows=5))
    assert _rel(got_loss, want_loss) < 1e-6 and _rel(got, want) < 1e-6
    lookup_only = torch.zeros_like(got)
    lookup_only[ids.unique()] = 1
    assert (got * (1 - lookup_only)).abs().sum() > 0  # rows never looked up still get the head's gradient


def test_linear_cross_entropy_without_grad_and_edge_cases():
    hidden, weight, bias, targets = _lce_problem(bias=True)
    want = _materialised(hidden, weight, bias, targets)
    with torch.no_grad():
        got = obj.linear_cross_entropy(hidden, weight, targets, bias, chunk_rows=9)
    assert not got.requires_grad and _rel(got, want) < 1e-6
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # evaluation under autocast
        assert abs(float(obj.linear_cross_entropy(hidden, weight, targets, bias)) - float(want)) < 0.05
    # fp16 autocast computes in fp32: its gradients would be formed before a loss scaler could protect them
    with torch.autocast("cpu", dtype=torch.float16):
        fp16 = obj.linear_cross_entropy(hidden, weight, targets, bias, chunk_rows=9)
    assert torch.equal(fp16, got)
    # a model held in bf16 (no autocast): bf16 products, gradients in bf16
    got_bf, want_bf = (_loss_and_grads(f, hidden, weight, bias, targets, dtype=torch.bfloat16)
                       for f in (_fused(9), _materialised))
    assert all(_rel(a, b) < 1e-2 for a, b in zip(got_bf, want_bf))
    hb = hidden.bfloat16().requires_grad_()
    obj.linear_cross_entropy(hb, weight.bfloat16(), targets).backward()
    assert hb.grad.dtype == torch.bfloat16
    # (B, T, C) hidden states and (B, T) targets, as a model gives them
    got3 = obj.linear_cross_entropy(hidden.view(4, 25, -1), weight, targets.view(4, 25), bias)
    assert _rel(got3, want) < 1e-6
    # nothing to predict: NaN, as F.cross_entropy's mean over no targets
    none = torch.full_like(targets, IGNORE_INDEX)
    assert torch.isnan(obj.linear_cross_entropy(hidden, weight, none)) and torch.isnan(obj.cross_entropy(
        hidden @ weight.t(), none))
    # extreme logits stay finite (the log-softmax is taken on fp32 with the max subtracted)
    big = obj.linear_cross_entropy(hidden * 1e3, weight, targets)
    assert torch.isfinite(big) and _rel(big, _materialised(hidden * 1e3, weight, None, targets)) < 1e-5


@pytest.mark.parametrize("arch", ["decoder", "encoder", "encoder-decoder"])
def test_pretrain_forward_loss_fused_equals_logits_path(arch):
    """glassmind pretrain's forward_loss with --fused-loss on gives the logits path's loss and gradients
    (fp32: tight; under bf16 autocast, where `auto` turns it on: bf16 agreement)."""
    from glassmind.model import ModelConfig, Transformer
    from glassmind.recipes.pretrain import PretrainConfig, forward_loss, fused_loss_applies

    V, context = 64, 24
    torch.manual_seed(0)
    model = Transformer(ModelConfig(arch=arch, vocab_size=V, context_length=context, d_model=16, n_heads=2,
                                    n_layers=1))
    sl = obj.span_lengths_for_context(context)
    tok_ids = {"vocab": V, "sep": 1, "specials": [0, 1, 2], "mask": 2, "sentinels": list(range(V - sl.spans, V))}
    width = sl.raw if arch == "encoder-decoder" else context + (arch == "decoder")
    window = torch.randint(3, V - sl.spans, (4, width), generator=torch.Generator().manual_seed(5))

    def run(fused_loss, autocast):
        model.zero_grad(set_to_none=True)
        cfg = PretrainConfig(arch=arch, fused_loss=fused_loss)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = forward_loss(model, arch, window, tok_ids=tok_ids, generator=torch.Generator().manual_seed(9),
                                cfg=cfg, device=torch.device("cpu"))
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    cpu = torch.device("cpu")
    assert fused_loss_applies(model, PretrainConfig(fused_loss="on"), cpu)
    assert not fused_loss_applies(model, PretrainConfig(fused_loss="auto"), cpu)  # fp32 keeps the golden path
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused_loss_applies(model, PretrainConfig(fused_loss="auto"), cpu)
        assert not fused_loss_applies(model, PretrainConfig(fused_loss="off"), cpu)
    with torch.autocast("cpu", dtype=torch.float16):
        assert not fused_loss_applies(model, PretrainConfig(fused_loss="auto"), cpu)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        wrapped = torch.nn.Sequential(model)  # a wrapper (DDP, FSDP, compile) works in forward(): logits path
        assert not fused_loss_applies(wrapped, PretrainConfig(fused_loss="on"), cpu)
    want_loss, want = run("off", False)
    got_loss, got = run("on", False)
    assert _rel(got_loss, want_loss) < 1e-6 and _rel(got, want) < 1e-5 and got.numel() == want.numel()
    bf_loss, bf = run("auto", True)
    ref_loss, ref = run("off", True)
    assert abs(float(bf_loss - ref_loss)) < 0.02 and _rel(bf, ref) < 0.05
