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
