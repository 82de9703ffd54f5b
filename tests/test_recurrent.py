"""The recurrent models on torch's fused kernels equal the step-by-step equations written from the papers."""

import pytest
import torch

from glassmind.model.recurrent import (RecurrentConfig, RecurrentLM, Seq2Seq, Seq2SeqConfig, hidden_for_params,
                                       recurrent_params, reference_lm_forward, reference_seq2seq_forward)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("layers", [1, 2])
def test_recurrent_lm_equals_the_step_by_step_cell_equations(cell, layers):
    torch.manual_seed(0)
    model = RecurrentLM(RecurrentConfig(cell=cell, vocab_size=50, d_embed=12, d_hidden=16, n_layers=layers))
    for p in model.parameters():  # weights large enough that every gate is away from its linear regime
        torch.nn.init.uniform_(p, -0.6, 0.6)
    ids = torch.randint(0, 50, (3, 9))
    fast = model(ids)
    ref = reference_lm_forward(model, ids)
    assert fast.shape == (3, 9, 50)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


def test_recurrent_lm_state_carries_across_calls():
    torch.manual_seed(1)
    model = RecurrentLM(RecurrentConfig(cell="lstm", vocab_size=30, d_embed=8, d_hidden=8))
    ids = torch.randint(0, 30, (2, 10))
    whole = model(ids)
    first, state = model(ids[:, :6], return_state=True)
    second = model(ids[:, 6:], state)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_parameter_count_formula_matches_the_module(cell):
    model = RecurrentLM(RecurrentConfig(cell=cell, vocab_size=40, d_embed=24, d_hidden=37, n_layers=2))
    assert model.num_params(non_embedding=True) == recurrent_params(cell, 24, 37, 2)
    h = hidden_for_params(cell, 64, 100_000)
    assert abs(recurrent_params(cell, 64, h) - 100_000) < recurrent_params(cell, 64, h + 1) - recurrent_params(cell, 64, h)


def test_seq2seq_additive_attention_equals_the_equations_with_padding_masked():
    torch.manual_seed(2)
    model = Seq2Seq(Seq2SeqConfig(vocab_size=20, d_embed=6, d_hidden=8, d_attn=7))
    for p in model.parameters():
        torch.nn.init.uniform_(p, -0.5, 0.5)
    src = torch.randint(0, 20, (2, 5))
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    tgt = torch.randint(0, 20, (2, 4))
    logits, alpha = model(src, tgt, mask, return_attention=True)
    ref_logits, ref_alpha = reference_seq2seq_forward(model, src, tgt, mask)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alpha, ref_alpha, atol=1e-6, rtol=1e-5)
    assert torch.all(alpha[1, :, 3:] == 0)  # no weight on padding
    torch.testing.assert_close(alpha.sum(-1), torch.ones(2, 4))


def test_seq2seq_learns_to_reverse_a_sequence():
    """A task only attention solves quickly at this size: output the source reversed (the alignment is the
    anti-diagonal). A model that never trained is at chance (1/8 per token)."""
    torch.manual_seed(3)
    V, S, bos = 10, 5, 9
    model = Seq2Seq(Seq2SeqConfig(vocab_size=V, d_embed=16, d_hidden=32, d_attn=32))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(120):  # ~2 s of one core; accuracy passes 0.95 by step 60
        src = torch.randint(1, 9, (32, S))
        tgt = src.flip(1)
        tgt_in = torch.cat([torch.full((32, 1), bos), tgt[:, :-1]], dim=1)
        loss = torch.nn.functional.cross_entropy(model(src, tgt_in).reshape(-1, V), tgt.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    src = torch.randint(1, 9, (200, S))
    acc = (model.greedy(src, bos, S) == src.flip(1)).float().mean().item()
    assert acc > 0.9


def test_recall_rows_answer_the_value_paired_with_the_queried_key():
    from glassmind.studies.architectures import (FILLER0, KEY0, QUERY, RECALL_KEYS, VALUE0, recall_batch)

    g = torch.Generator().manual_seed(0)
    src, ans = recall_batch(64, 3, 10, g)
    assert src.shape == (64, 2 * 3 + 10 + 2)
    for row, a in zip(src.tolist(), ans.tolist()):
        keys, values = row[0:6:2], row[1:6:2]
        assert len(set(keys)) == 3 and all(KEY0 <= k < KEY0 + RECALL_KEYS for k in keys)
        assert all(FILLER0 <= t for t in row[6:16]) and row[16] == QUERY
        assert a == values[keys.index(row[17])] and VALUE0 <= a < FILLER0
