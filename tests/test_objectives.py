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
