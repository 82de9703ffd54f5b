"""The autopsy pinned to transformers: on GPT-2-, BERT- and BART-shaped models imported with from_hf, the
captured attention weights equal `output_attentions`, each layer's residual equals `output_hidden_states`
(1e-5), the logit lens equals a hand computation from those hidden states, ablating nothing and patching a
run into itself change nothing, and direct attributions plus the rest equal the target logit."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

from glassmind.common import GlassmindError  # noqa: E402
from glassmind.model import ModelConfig, Transformer, interop  # noqa: E402
from glassmind.autopsy import all_names, hooked, run_with_cache  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only adds sync

TOL = 1e-5


def perturb(model, scale: float = 0.1):
    """Move every weight, bias and gain off its init, so a tensor read from the wrong place shows."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
        for name, b in model.named_buffers():
            if name.endswith("final_logits_bias"):
                b.add_(torch.randn_like(b) * scale)
    return model.eval()


def eager(config):
    config._attn_implementation = "eager"  # output_attentions needs the explicit softmax path
    return config


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    h = perturb(transformers.GPT2LMHeadModel(eager(transformers.GPT2Config(
        n_layer=3, n_head=4, n_embd=32, vocab_size=101, n_positions=64))))
    ids = torch.randint(0, 101, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = h(ids, output_attentions=True, output_hidden_states=True)
    return interop.from_hf(h).eval(), h, ids, ref


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    h = perturb(transformers.BertForMaskedLM(eager(transformers.BertConfig(
        num_hidden_layers=2, num_attention_heads=2, hidden_size=32, intermediate_size=48, vocab_size=103,
        max_position_embeddings=40))))
    ids = torch.randint(0, 103, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = h(input_ids=ids, output_attentions=True, output_hidden_states=True)
    return interop.from_hf(h).eval(), h, ids, ref


@pytest.fixture(scope="module")
def bart():
    torch.manual_seed(0)
    h = perturb(transformers.BartForConditionalGeneration(eager(transformers.BartConfig(
        vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=48,
        pad_token_id=1, decoder_start_token_id=2))))
    gen = torch.Generator().manual_seed(3)
    src, tgt = torch.randint(3, 99, (2, 11), generator=gen), torch.randint(3, 99, (2, 7), generator=gen)
    with torch.no_grad():
        ref = h(input_ids=src, decoder_input_ids=tgt, output_attentions=True, output_hidden_states=True)
    return interop.from_hf(h).eval(), h, (src, tgt), ref


def close(a, b) -> float:
    return float((a - b).detach().abs().max())


# ------------------------------------------------------------------------------------- capture (part 1)


def test_gpt2_captured_attention_and_residuals_equal_transformers(gpt2):
    g, h, ids, ref = gpt2
    logits, cache = run_with_cache(g, ids)
    assert close(logits, ref.logits) < TOL
    L = g.config.n_layers
    for i in range(L):
        assert close(cache[f"blocks.{i}.attn.hook_pattern"], ref.attentions[i]) < TOL, i
        assert close(cache[f"blocks.{i}.hook_resid_pre"], ref.hidden_states[i]) < TOL, i
    # HF's last hidden state is after ln_f
    assert close(cache["ln_final.hook_normalized"], ref.hidden_states[L]) < TOL
    # the heads' writes plus out_proj's bias rebuild the attention sublayer's output
    for i in range(L):
        rebuilt = cache[f"blocks.{i}.attn.hook_result"].sum(2) + g.decoder.blocks[i].self_attn.out_proj.bias
        assert close(rebuilt, cache[f"blocks.{i}.hook_attn_out"]) < TOL
        assert close(cache[f"blocks.{i}.hook_resid_pre"] + cache[f"blocks.{i}.hook_attn_out"]
                     + cache[f"blocks.{i}.hook_mlp_out"], cache[f"blocks.{i}.hook_resid_post"]) < TOL


def test_bert_captured_attention_and_residuals_equal_transformers(bert):
    g, h, ids, ref = bert
    _, cache = run_with_cache(g, ids)
    for i in range(g.config.n_layers):
        assert close(cache[f"blocks.{i}.attn.hook_pattern"], ref.attentions[i]) < TOL, i
        assert close(cache[f"blocks.{i}.hook_resid_pre"], ref.hidden_states[i]) < TOL, i
        assert close(cache[f"blocks.{i}.hook_resid_post"], ref.hidden_states[i + 1]) < TOL, i


def test_bart_captured_self_and_cross_attention_equal_transformers(bart):
    g, h, (src, tgt), ref = bart
    logits, cache = run_with_cache(g, src, tgt)
    assert close(logits, ref.logits) < TOL
    for i in range(2):
        assert close(cache[f"encoder.blocks.{i}.attn.hook_pattern"], ref.encoder_attentions[i]) < TOL
        assert close(cache[f"encoder.blocks.{i}.hook_resid_pre"], ref.encoder_hidden_states[i]) < TOL
        assert close(cache[f"decoder.blocks.{i}.attn.hook_pattern"], ref.decoder_attentions[i]) < TOL
        assert close(cache[f"decoder.blocks.{i}.cross_attn.hook_pattern"], ref.cross_attentions[i]) < TOL
        assert close(cache[f"decoder.blocks.{i}.hook_resid_pre"], ref.decoder_hidden_states[i]) < TOL
    assert close(cache["decoder.blocks.1.hook_resid_post"], ref.decoder_hidden_states[2]) < TOL


@pytest.mark.parametrize("kw", [dict(positional="rope", n_kv_heads=2, norm="rmsnorm", activation="swiglu"),
                                dict(positional="sinusoidal", norm_position="post")])
def test_pattern_times_values_is_what_the_fused_kernel_computed(kw):
    """No outside reference has rope + GQA in glassmind's layout: pin the recomputed pattern to the model's
    own fused attention instead (pattern @ v must equal hook_z, which is the kernel's output)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, context_length=16, d_model=32, n_heads=4, n_layers=2, **kw)
    g = Transformer(cfg).eval()
    ids = torch.randint(0, 50, (2, 12))
    _, cache = run_with_cache(g, ids)
    for i in range(2):
        p, v = cache[f"blocks.{i}.attn.hook_pattern"], cache[f"blocks.{i}.attn.hook_v"]   # v: (B, T, Hkv, D)
        v = v.transpose(1, 2).repeat_interleave(cfg.n_heads // cfg.n_kv_heads, dim=1)   # (B, H, T, D)
        assert close((p @ v).transpose(1, 2), cache[f"blocks.{i}.attn.hook_z"]) < TOL
        assert torch.allclose(p.sum(-1), torch.ones(())) and float(p.triu(1).abs().max()) == 0.0  # causal
    if cfg.positional == "rope":
        assert "hook_rope_cos" in cache and "blocks.0.attn.hook_rot_q" in cache
    else:
        assert close(cache["hook_pos_embed"][0], g.decoder.sinusoid[:12]) == 0.0


def test_capture_is_opt_in_and_hooks_leave_no_trace(gpt2):
    g, h, ids, ref = gpt2
    want = ["blocks.1.attn.hook_pattern", "blocks.2.hook_resid_post"]
    _, cache = run_with_cache(g, ids, names=want)
    assert sorted(cache.keys()) == sorted(want)
    _, full = run_with_cache(g, ids)
    assert set(full.keys()) == set(all_names(g))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in g.modules())
    with pytest.raises(GlassmindError, match="unknown hook names"):
        run_with_cache(g, ids, names=["blocks.9.hook_resid_post"])
    with pytest.raises(GlassmindError, match="observed, not edited"):
        with hooked(g, (), {"blocks.0.attn.hook_pattern": lambda t: t}):
            pass


# ---------------------------------------------------------------------------- lens (part 2)


def piece(i: int) -> str:
    return str(i)


def test_gpt2_logit_lens_equals_hand_computation_from_hidden_states(gpt2):
    from glassmind.autopsy.lens import logit_lens

    g, h, ids, ref = gpt2
    _, cache = run_with_cache(g, ids)
    target, T = 7, ids.shape[1]
    grid = logit_lens(g, cache, range(T), target, 3, piece)
    L = g.config.n_layers
    assert len(grid) == L + 1
    with torch.no_grad():
        for l in range(L + 1):
            logits = ref.logits[0] if l == L else h.lm_head(h.transformer.ln_f(ref.hidden_states[l][0]))  # (T, V)
            p = logits.softmax(-1)
            for t in range(T):
                cell = grid[l][t]
                assert abs(cell["target_prob"] - float(p[t, target])) < TOL
                assert cell["top"][0][0] == str(int(p[t].argmax()))
                assert cell["target_rank"] == int((p[t] > p[t, target]).sum()) + 1
                kl = float((ref.logits[0, t].softmax(-1) * (ref.logits[0, t].log_softmax(-1)
                                                            - logits[t].log_softmax(-1))).sum())
                assert abs(cell["kl_to_final"] - max(kl, 0.0)) < 1e-4
    assert all(abs(c["kl_to_final"]) < 1e-5 for c in grid[L])


def test_bert_logit_lens_equals_the_mlm_head_on_each_hidden_state(bert):
    from glassmind.autopsy.lens import logit_lens

    g, h, ids, ref = bert
    _, cache = run_with_cache(g, ids)
    grid = logit_lens(g, cache, range(ids.shape[1]), 5, 3, piece)
    with torch.no_grad():
        for l, hs in enumerate(ref.hidden_states):
            p = h.cls(hs[0]).softmax(-1)
            for t in range(ids.shape[1]):
                assert abs(grid[l][t]["target_prob"] - float(p[t, 5])) < TOL


# ------------------------------------------------------------------- attribution, ablation, patching (3)


def test_gpt2_direct_attributions_plus_rest_equal_the_target_logit(gpt2):
    from glassmind.autopsy.causal import decompose_final_hidden, direct_logit_attribution

    g, h, ids, ref = gpt2
    _, cache = run_with_cache(g, ids)
    for pos, target in ((9, 3), (4, 50)):
        dla = direct_logit_attribution(g, cache, pos, target)
        assert dla["exact"] and len(dla["components"]) == 1 + 3 * (4 + 1)
        total = sum(v for _, v in dla["components"]) + dla["rest"]
        assert abs(total - float(ref.logits[0, pos, target])) < 1e-4
        # the rest is ln_f's offset plus the attention biases through ln_f with its scale frozen: by hand
        x = cache["blocks.2.hook_resid_post"][0, pos]
        ln = h.transformer.ln_f
        s = torch.sqrt(x.var(unbiased=False) + ln.eps)
        b = sum(blk.attn.c_proj.bias for blk in h.transformer.h)
        hand_rest = ln.weight * (b - b.mean()) / s + ln.bias
        assert close(dla["rest_vector"], hand_rest) < TOL
        parts, rest = decompose_final_hidden(g, cache, pos)
        assert close(sum(parts.values()) + rest, ref.hidden_states[3][0, pos]) < TOL


def test_post_norm_decomposition_rebuilds_bert_and_bart_final_states(bert, bart):
    from glassmind.autopsy.causal import decompose_final_hidden, direct_logit_attribution

    g, h, ids, ref = bert
    _, cache = run_with_cache(g, ids)
    parts, rest = decompose_final_hidden(g, cache, 4)
    assert close(sum(parts.values()) + rest, ref.hidden_states[-1][0, 4]) < TOL
    g, h, (src, tgt), ref = bart
    _, cache = run_with_cache(g, src, tgt)
    dla = direct_logit_attribution(g, cache, 5, 17)
    assert dla["exact"] and any(k == "L1.X3" for k, _ in dla["components"])
    assert abs(sum(v for _, v in dla["components"]) + dla["rest"] - float(ref.logits[0, 5, 17])) < 1e-4


def test_ablating_nothing_and_patching_a_run_into_itself_change_nothing(gpt2, bart):
    from glassmind.autopsy.causal import component_names, patch
    from glassmind.autopsy.hooks import EDITABLE_SUFFIXES, hooked, forward

    g, h, ids, ref = gpt2
    identity = {n: (lambda t: t) for n in all_names(g) if n.endswith(EDITABLE_SUFFIXES)}
    with hooked(g, None, identity):
        assert torch.equal(forward(g, ids), g(ids))
    one = ids[:1]
    for row in patch(g, one, one, None, 9, 3, component_names(g) + ["P0", "P5"]):
        assert row["logprob_patched"] == row["logprob_clean"]
    g, h, (src, tgt), ref = bart
    for row in patch(g, src[:1], src[:1], tgt[:1], 4, 11, ["L0.H1", "L1.X2", "L1.FFN"]):
        assert row["logprob_patched"] == row["logprob_clean"]


def test_zero_ablating_a_head_equals_transformers_with_that_heads_output_rows_zeroed(gpt2):
    """An outside reference for ablation: zeroing head h's z equals zeroing the rows of GPT-2's c_proj that
    read head h (Conv1D weight is (in, out))."""
    import copy

    from glassmind.autopsy.causal import ablate

    g, h, ids, ref = gpt2
    one = ids[:1]
    row = ablate(g, one, None, 8, 21, ["L1.H2"], mode="zero")[0]
    h2 = copy.deepcopy(h)
    with torch.no_grad():
        h2.transformer.h[1].attn.c_proj.weight[2 * 8:3 * 8] = 0
        want = float(h2(one).logits[0, 8].log_softmax(-1)[21])
    assert abs(row["logprob_after"] - want) < TOL
    assert abs(row["logprob_before"] - float(ref.logits[0, 8].log_softmax(-1)[21])) < TOL
    assert abs(row["logprob_after"] - row["logprob_before"]) > 1e-3  # the ablation did something


def test_bad_components_name_the_valid_range(gpt2):
    from glassmind.autopsy.causal import check_component

    g = gpt2[0]
    for bad, msg in (("L3.H0", "layers 0..2"), ("L0.H4", "heads 0..3"), ("L0.X0", "no cross-attention"),
                     ("head1", "write L<layer>")):
        with pytest.raises(GlassmindError, match=msg):
            check_component(g, bad)


def test_head_detectors_equal_a_hand_computation_from_transformers_attentions(gpt2):
    """Previous-token score: mean attention q -> q-1; induction score: mean attention, over the second copy,
    q -> q - half + 1; computed here from transformers' own output_attentions on the same sequences."""
    from glassmind.autopsy.causal import head_scores

    g, h, _, _ = gpt2
    half, n = 7, 4
    s = head_scores(g, half=half, n_seqs=n, seed=5)
    gen = torch.Generator().manual_seed(5)
    r = torch.arange(g.config.vocab_size)[torch.randint(0, g.config.vocab_size, (n, half), generator=gen)]
    with torch.no_grad():
        att = h(torch.cat([r, r], 1), output_attentions=True).attentions
    for l, a in enumerate(att):                                                      # (n, H, 2h, 2h)
        prev = torch.stack([a[:, :, q, q - 1] for q in range(1, 2 * half)], -1).mean((0, 2))
        ind = torch.stack([a[:, :, q, q - half + 1] for q in range(half, 2 * half)], -1).mean((0, 2))
        assert close(torch.tensor(s["previous_token"][l]), prev) < TOL
        assert close(torch.tensor(s["induction"][l]), ind) < TOL
