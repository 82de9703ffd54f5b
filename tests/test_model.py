"""The Transformer's textbook properties, its config, and its files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from glassmind.common import GlassmindError
from glassmind.infer.kv_cache import KVCache
from glassmind.model import EncoderOutput, ModelConfig, Transformer, load_model, save_model
from glassmind.model.transformer import attention_mask, sinusoidal_table

torch.manual_seed(0)


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=97, context_length=32, d_model=32, n_heads=4, n_layers=2)
    base.update(kw)
    return ModelConfig(**base)


# ------------------------------------------------------------------------------------------ families


@pytest.mark.parametrize("positional", ["sinusoidal", "learned", "rope", "none"])
@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_decoder_is_causal(positional, norm_position):
    """Changing future tokens never changes the logits of earlier positions."""
    m = Transformer(tiny(positional=positional, norm_position=norm_position)).eval()
    ids = torch.randint(0, 97, (2, 12))
    changed = ids.clone()
    changed[:, 7:] = torch.randint(0, 97, (2, 5))
    a, b = m(ids), m(changed)
    assert a.shape == (2, 12, 97)
    assert torch.equal(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_encoder_returns_hidden_and_head_output():
    for head, shape in [("mlm", (2, 9, 97)), ("classification", (2, 3)), ("token_classification", (2, 9, 3))]:
        m = Transformer(tiny(arch="encoder", head=head, num_labels=3)).eval()
        out = m(torch.randint(0, 97, (2, 9)))
        assert isinstance(out, EncoderOutput)
        assert out.hidden.shape == (2, 9, 32) and out.logits.shape == shape


def test_encoder_decoder_takes_source_and_target():
    m = Transformer(tiny(arch="encoder-decoder", n_encoder_layers=3)).eval()
    src, tgt = torch.randint(0, 97, (2, 10)), torch.randint(0, 97, (2, 6))
    logits = m(src, tgt)
    assert logits.shape == (2, 6, 97)
    assert len(m.encoder.blocks) == 3 and len(m.decoder.blocks) == 2
    # the decoder is causal on the target side and sees the whole source
    tgt2 = tgt.clone()
    tgt2[:, 4:] = (tgt2[:, 4:] + 1) % 97
    assert torch.equal(m(src, tgt2)[:, :4], logits[:, :4])
    src2 = src.clone()
    src2[:, -1] = (src2[:, -1] + 1) % 97
    assert not torch.allclose(m(src2, tgt)[:, 0], logits[:, 0])
    with pytest.raises(GlassmindError, match="source and target"):
        m(src)


def permutation_equivariance_error(positional: str) -> float:
    m = Transformer(tiny(arch="encoder", positional=positional, head="none")).eval()
    ids = torch.randint(0, 97, (1, 10))
    perm = torch.randperm(10)
    out = m(ids).hidden
    out_perm = m(ids[:, perm]).hidden
    return (out[:, perm] - out_perm).abs().max().item()


def test_encoder_without_positions_is_permutation_equivariant():
    assert permutation_equivariance_error("none") < 1e-5
    assert permutation_equivariance_error("sinusoidal") > 1e-2
    assert permutation_equivariance_error("learned") > 1e-3


@pytest.mark.parametrize("layout", ["interleaved", "halves"])
def test_sinusoid_offset_is_one_linear_map(layout):
    """For an offset k, PE(pos + k) = M_k PE(pos) with ONE matrix M_k for every pos: a rotation by k * w_i of
    each (sin, cos) pair at frequency w_i = 10000^(-2i/d). Build M_k from the frequencies alone and check it
    maps every row of the table to the row k further on."""
    d, k, n = 16, 7, 300
    pe = sinusoidal_table(n, d, layout).double()
    half = d // 2
    w = 10000.0 ** (-torch.arange(half, dtype=torch.float64) * 2 / d)
    sin_idx, cos_idx = (torch.arange(0, d, 2), torch.arange(1, d, 2)) if layout == "interleaved" else (
        torch.arange(half), torch.arange(half, d))
    M = torch.zeros(d, d, dtype=torch.float64)  # row vector convention: PE(pos + k) = PE(pos) @ M
    c, s = torch.cos(k * w), torch.sin(k * w)
    # sin(a + b) = sin a cos b + cos a sin b;  cos(a + b) = cos a cos b - sin a sin b
    M[sin_idx, sin_idx], M[cos_idx, sin_idx] = c, s
    M[sin_idx, cos_idx], M[cos_idx, cos_idx] = -s, c
    assert torch.allclose(pe[: n - k] @ M, pe[k:], atol=1e-5)
    assert torch.allclose(M.T @ M, torch.eye(d, dtype=torch.float64), atol=1e-12)  # a rotation
    # and the same M_k fails for another offset: the map really depends on k only
    assert not torch.allclose(pe[: n - k - 1] @ M, pe[k + 1:], atol=1e-2)
    pos = torch.arange(n, dtype=torch.float64)  # the columns follow Vaswani et al. sec. 3.5
    assert torch.allclose(pe[:, sin_idx[1]], torch.sin(pos / 10000 ** (2 / d)), atol=1e-5)
    assert torch.allclose(pe[:, cos_idx[1]], torch.cos(pos / 10000 ** (2 / d)), atol=1e-5)


def attention_seen_from_outside(m, *args, **kw):
    """(weights (B, H, Tq, Tk), weighted values (B, T, H, D)) of every block, observed from outside the model
    by the autopsy's hooks: the weights recomputed from the captured q and k, the values the fused kernel's
    own output (out_proj's input)."""
    from glassmind.autopsy.hooks import ActivationCache, hooked

    with torch.no_grad(), hooked(m, lambda name: name.endswith(("attn.hook_pattern", "attn.hook_z",
                                                                "attn.hook_v"))) as store:
        m(*args, **kw)
    return ActivationCache(store, m)


def test_attention_weights_sum_to_one_and_masked_keys_get_zero():
    m = Transformer(tiny(arch="encoder", head="none")).eval()
    ids = torch.randint(0, 97, (3, 8))
    key_mask = torch.ones(3, 8, dtype=torch.bool)
    key_mask[1, 5:] = False
    key_mask[2, 2:] = False
    cache = attention_seen_from_outside(m, ids, attention_mask=key_mask)
    for i in range(len(m.encoder.blocks)):
        w = cache[f"blocks.{i}.attn.hook_pattern"]  # (B, H, T, T)
        assert w.shape == (3, 4, 8, 8)
        assert torch.allclose(w.sum(-1), torch.ones(3, 4, 8), atol=1e-6)
        assert (w[1, :, :, 5:] == 0).all() and (w[2, :, :, 2:] == 0).all()
        # these are the weights the fused kernel used: weights @ values is its output, row for row
        v = cache[f"blocks.{i}.attn.hook_v"].transpose(1, 2)                       # (B, H, T, D)
        z = cache[f"blocks.{i}.attn.hook_z"].transpose(1, 2)                       # (B, H, T, D)
        assert torch.allclose(w @ v, z, atol=1e-5)


def test_causal_weights_are_zero_above_the_diagonal():
    m = Transformer(tiny()).eval()
    w = attention_seen_from_outside(m, torch.randint(0, 97, (1, 6)))["blocks.0.attn.hook_pattern"][0, 0]
    assert torch.equal(w.triu(1), torch.zeros(6, 6))
    assert torch.allclose(w.sum(-1), torch.ones(6))


def test_padding_does_not_change_real_positions():
    """A right-padded encoder batch and a left-padded decoder batch give the same outputs at real positions
    as each sequence alone."""
    enc = Transformer(tiny(arch="encoder", head="none")).eval()
    ids = torch.randint(0, 97, (1, 5))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = torch.tensor([[1] * 5 + [0] * 3])
    assert torch.allclose(enc(padded, attention_mask=mask).hidden[:, :5], enc(ids).hidden, atol=1e-5)

    dec = Transformer(tiny(positional="learned")).eval()
    left = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.tensor([[0] * 3 + [1] * 5])
    out = dec(left, attention_mask=mask)
    assert torch.isfinite(out).all()
    assert torch.allclose(out[:, 3:], dec(ids), atol=1e-5)


@pytest.mark.parametrize("arch", ["decoder", "encoder-decoder"])
def test_kv_cache_matches_full_recompute(arch):
    cfg = tiny(arch=arch, n_kv_heads=2, positional="rope")
    m = Transformer(cfg).eval()
    src = torch.randint(0, 97, (2, 7))
    ids = torch.randint(0, 97, (2, 11))
    cache = KVCache.for_model(m, batch=2, max_len=16)
    if arch == "decoder":
        full = m(ids)
        steps = [m(ids[:, :5], cache=cache)] + [m(ids[:, t:t + 1], cache=cache) for t in range(5, 11)]
    else:
        full = m(src, ids)
        memory = m.encode(src)
        steps = [m.decode(ids[:, :5], memory, cache=cache)]
        steps += [m.decode(ids[:, t:t + 1], None, cache=cache) for t in range(5, 11)]
    assert cache.pos == 11
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-5


def test_grouped_query_attention_shrinks_kv():
    full, gqa = Transformer(tiny(n_heads=4)), Transformer(tiny(n_heads=4, n_kv_heads=1))
    k_full = full.decoder.blocks[0].self_attn.k_proj.weight.shape
    k_gqa = gqa.decoder.blocks[0].self_attn.k_proj.weight.shape
    assert k_full == (32, 32) and k_gqa == (8, 32)


@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu"])
def test_activations_and_norms_run_and_train(activation):
    m = Transformer(tiny(activation=activation, norm="rmsnorm"))
    ids = torch.randint(0, 97, (2, 8))
    loss = torch.nn.functional.cross_entropy(m(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    assert all(p.grad is not None for p in m.parameters())


# ------------------------------------------------------------------------------------------ config


def test_param_count_matches_hand_count():
    """GPT-2 small's famous 124,439,808 (tied embeddings, learned positions, biases, pre-norm)."""
    cfg = ModelConfig(vocab_size=50257, context_length=1024, d_model=768, n_heads=12, n_layers=12,
                      activation="gelu_tanh")
    assert cfg.num_params() == 124_439_808
    # by hand for a tiny one: embeddings V*C + P*C; per layer 4*(C*C + C) attn + (C*4C + 4C) + (4C*C + C)
    # ffn + 2 norms * 2C; final norm 2C
    V, P, C, L = 97, 32, 32, 2
    per_layer = 4 * (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C) + 4 * C
    assert tiny().num_params() == V * C + P * C + L * per_layer + 2 * C
    assert Transformer(tiny()).num_params() == tiny().num_params()
    assert tiny().num_params(non_embedding=True) == L * per_layer + 2 * C


def test_flops_per_token_is_six_n_plus_attention():
    cfg = tiny()
    n = cfg.num_params(non_embedding=True) + cfg.vocab_size * cfg.d_model
    assert cfg.flops_per_token(16) == 3 * (2 * n + 4 * cfg.n_layers * 16 * cfg.d_model)
    assert cfg.flops_per_token(16, training=False) == cfg.flops_per_token(16) / 3


@pytest.mark.parametrize("bad, match", [
    (dict(d_model=30, n_heads=4), "divisible by n_heads"),
    (dict(n_heads=4, n_kv_heads=3), "divisible by n_kv_heads"),
    (dict(arch="transformer"), "arch"),
    (dict(positional="alibi"), "positional"),
    (dict(arch="encoder", head="lm"), "no causal LM head"),
])
def test_bad_config_is_a_clear_error(bad, match):
    with pytest.raises(GlassmindError, match=match):
        tiny(**bad)


def test_bad_inputs_are_clear_errors():
    m = Transformer(tiny()).eval()
    with pytest.raises(GlassmindError, match="out of range"):
        m(torch.tensor([[1, 97]]))
    with pytest.raises(GlassmindError, match="context length"):
        m(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(GlassmindError, match="batch, time"):
        m(torch.zeros(5, dtype=torch.long))
    with pytest.raises(GlassmindError, match="mask covers"):
        attention_mask(4, 0, torch.ones(1, 5), causal=True, device=torch.device("cpu"))


# ------------------------------------------------------------------------------------------ files


@pytest.mark.parametrize("arch", ["decoder", "encoder", "encoder-decoder"])
def test_save_load_round_trip_is_bit_exact(tmp_path, arch):
    m = Transformer(tiny(arch=arch, positional="sinusoidal" if arch != "decoder" else "learned",
                         tie_embeddings=arch != "encoder-decoder", lm_head_bias=arch == "decoder"
                         )).eval()
    save_model(m, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    back = load_model(tmp_path)
    assert back.config == m.config
    sd, sd2 = m.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    ids = torch.randint(0, 97, (2, 6))
    a = m(ids, ids) if arch == "encoder-decoder" else m(ids)
    b = back(ids, ids) if arch == "encoder-decoder" else back(ids)
    a, b = (a.hidden, b.hidden) if arch == "encoder" else (a, b)
    assert torch.equal(a, b)


def test_load_refuses_pickle_unless_opted_in(tmp_path):
    m = Transformer(tiny())
    save_model(m, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(m.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(GlassmindError, match="pickle"):
        load_model(tmp_path)
    back = load_model(tmp_path, allow_pickle=True)
    assert torch.equal(back.token_embedding.weight, m.token_embedding.weight)


def test_corrupt_and_mismatched_files_are_clear_errors(tmp_path):
    m = Transformer(tiny())
    save_model(m, tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(GlassmindError, match="model.safetensors.*corrupt"):
        load_model(tmp_path)
    save_model(m, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["d_model"] = 64
    cfg["n_heads"] = 4
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GlassmindError, match="shape mismatch"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(GlassmindError, match="config.json"):
        load_model(tmp_path)


KILL_DURING_SAVE = r"""
import os, sys, torch
import safetensors.torch as st
from glassmind.model import ModelConfig, Transformer, save_model
real_save = st.save_file
def save_then_die(tensors, path, metadata=None):
    real_save(tensors, path, metadata=metadata)
    os.kill(os.getpid(), 9)  # SIGKILL after the bytes are written, before the rename
st.save_file = save_then_die
cfg = ModelConfig(vocab_size=97, context_length=32, d_model=32, n_heads=4, n_layers=2)
torch.manual_seed(1)
save_model(Transformer(cfg), sys.argv[1])
"""


def test_kill_during_save_keeps_the_old_checkpoint(tmp_path):
    old = Transformer(tiny())
    save_model(old, tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(tmp_path)], capture_output=True)
    assert proc.returncode == -9
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert torch.equal(load_model(tmp_path).token_embedding.weight, old.token_embedding.weight)
    leftovers = [p for p in os.listdir(tmp_path) if p not in ("config.json", "model.safetensors")]
    assert all(p.endswith(".tmp") for p in leftovers)  # a torn temp file never takes the final name
