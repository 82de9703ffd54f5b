"""Move weights between glassmind and Hugging Face transformers: GPT-2, BERT, BART and Marian.

Each supported family is one ModelConfig with some fields fixed (GPT-2 is pre-norm with learned positions
and a final norm; BERT is post-norm with an embedding norm and token types; BART is post-norm with learned
positions offset by 2 and an embedding norm; Marian is post-norm with a [sin..., cos...] sinusoid) plus the
sizes read from the HF config. The weights move through one table per family that pairs each glassmind
tensor with the HF tensor(s) holding it; the table is read in both directions, so a round trip is exact.

    from_hf(hf_model)      a live transformers model -> Transformer
    to_hf(model)           Transformer -> a transformers model (call .save_pretrained(dir) on it)
    from_hf_dir(path)      a HF model directory -> Transformer, reading safetensors only (no transformers)
    load_hf_dir(path)      a HF model directory -> the transformers model, offline
    config_from_hf / config_to_hf   the configs alone

transformers is an optional dependency: only to_hf, load_hf_dir and config_to_hf import it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

import torch

from glassmind.common import GlassmindError
from glassmind.model.transformer import ModelConfig, Transformer, sinusoidal_table

# HF class name -> (family, glassmind head). The class fixes which head sits on the stacks.
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "GPT2LMHeadModel": ("gpt2", "lm"),
    "GPT2Model": ("gpt2", "none"),
    "BertModel": ("bert", "none"),
    "BertForMaskedLM": ("bert", "mlm"),
    "BertForSequenceClassification": ("bert", "classification"),
    "BertForTokenClassification": ("bert", "token_classification"),
    "BartForConditionalGeneration": ("bart", "lm"),
    "MarianMTModel": ("marian", "lm"),
}
FAMILIES = ("gpt2", "bert", "bart", "marian")
# the class used when a config.json names no architecture
DEFAULT_ARCHITECTURE = {"gpt2": "GPT2LMHeadModel", "bert": "BertModel", "bart": "BartForConditionalGeneration",
                        "marian": "MarianMTModel"}
# prefix of the base model inside the task classes (HF's `base_model_prefix`)
BASE_PREFIX = {"gpt2": "transformer.", "bert": "bert.", "bart": "model.", "marian": "model."}

# The ModelConfig fields each family fixes. They are the whole architectural difference between the four.
FIXED: dict[str, dict[str, Any]] = {
    "gpt2": dict(arch="decoder", norm="layernorm", norm_position="pre", final_norm=True, positional="learned",
                 position_offset=0, scale_embeddings=False, embedding_norm=False, bias=True, lm_head_bias=False),
    "bert": dict(arch="encoder", norm="layernorm", norm_position="post", final_norm=False, positional="learned",
                 position_offset=0, scale_embeddings=False, embedding_norm=True, bias=True),
    # BART/Marian build their LayerNorms without an eps argument: torch's default 1e-5
    "bart": dict(arch="encoder-decoder", norm="layernorm", norm_eps=1e-5, norm_position="post", final_norm=False,
                 positional="learned", position_offset=2, embedding_norm=True, bias=True),
    "marian": dict(arch="encoder-decoder", norm="layernorm", norm_eps=1e-5, norm_position="post",
                   final_norm=False, positional="sinusoidal", sinusoidal_layout="halves", embedding_norm=False,
                   bias=True),
}
HEADS_OF = {"gpt2": ("lm", "none"), "bert": ("none", "mlm", "classification", "token_classification"),
            "bart": ("lm",), "marian": ("lm",)}

# HF activation strings (transformers/activations.py ACT2CLS) -> ours. gelu_new is the tanh approximation
# written out by hand; it equals F.gelu(approximate="tanh") to float rounding.
ACT_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
               "silu": "silu", "swish": "silu"}
ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "silu": "silu"}

# HF defaults (transformers 5 configuration_*.py) for the fields read here, for config.json files written by
# old transformers versions that leave defaults out.
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt2": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
                 activation_function="gelu_new", resid_pdrop=0.1, attn_pdrop=0.1, layer_norm_epsilon=1e-5,
                 initializer_range=0.02, scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
                 add_cross_attention=False, tie_word_embeddings=True, pad_token_id=None),
    "bert": dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.1,
                 attention_probs_dropout_prob=0.1, max_position_embeddings=512, type_vocab_size=2,
                 initializer_range=0.02, layer_norm_eps=1e-12, pad_token_id=0, is_decoder=False,
                 add_cross_attention=False, tie_word_embeddings=True, position_embedding_type="absolute"),
    "bart": dict(vocab_size=50265, max_position_embeddings=1024, encoder_layers=12, encoder_ffn_dim=4096,
                 encoder_attention_heads=16, decoder_layers=12, decoder_ffn_dim=4096, decoder_attention_heads=16,
                 activation_function="gelu", d_model=1024, dropout=0.1, attention_dropout=0.0, init_std=0.02,
                 scale_embedding=False, pad_token_id=1, tie_word_embeddings=True),
    "marian": dict(vocab_size=58101, decoder_vocab_size=None, max_position_embeddings=1024, encoder_layers=12,
                   encoder_ffn_dim=4096, encoder_attention_heads=16, decoder_layers=12, decoder_ffn_dim=4096,
                   decoder_attention_heads=16, activation_function="gelu", d_model=1024, dropout=0.1,
                   attention_dropout=0.0, init_std=0.02, scale_embedding=False, pad_token_id=58100,
                   share_encoder_decoder_embeddings=True, tie_word_embeddings=True),
}


def _transformers():
    try:
        import transformers
    except ImportError:
        raise GlassmindError("this needs transformers: pip install 'glassmind[hf]' (from_hf_dir reads a Hugging "
                             "Face directory without it)") from None
    return transformers


def _supported() -> str:
    return ", ".join(ARCHITECTURES)


def _cannot(family: str, field: str, value: Any, why: str) -> GlassmindError:
    return GlassmindError(f"{family} config field {field}={value!r} cannot be represented by a glassmind model: "
                          f"{why}")


# ======================================================================================================
# Configs
# ======================================================================================================


def _as_dict(hf_config: Any) -> dict[str, Any]:
    if isinstance(hf_config, dict):
        return dict(hf_config)
    return hf_config.to_dict()


def architecture_of(hf_config: Any) -> str:
    """The HF class a config (object or config.json dict) is for: its `architectures[0]`, else the family's
    usual class. Raises naming the supported classes when it is not one of them."""
    d = _as_dict(hf_config)
    names = d.get("architectures") or []
    if names:
        name = names[0]
    elif d.get("model_type") in DEFAULT_ARCHITECTURE:
        name = DEFAULT_ARCHITECTURE[d["model_type"]]
    else:
        name = f"model_type {d.get('model_type')!r}"
    if name not in ARCHITECTURES:
        raise GlassmindError(f"Hugging Face architecture {name} is not supported; supported: {_supported()}")
    return name


def config_from_hf(hf_config: Any, architecture: str | None = None) -> ModelConfig:
    """A transformers config (or a config.json dict) -> ModelConfig. `architecture` (an HF class name) picks
    the head; default: the config's own `architectures[0]`. Raises naming any field glassmind cannot express."""
    architecture = architecture or architecture_of(hf_config)
    if architecture not in ARCHITECTURES:
        raise GlassmindError(f"Hugging Face architecture {architecture} is not supported; supported: "
                             f"{_supported()}")
    family, head = ARCHITECTURES[architecture]
    c = {**HF_DEFAULTS[family], **_as_dict(hf_config)}
    if family == "gpt2":
        return _gpt2_config(c, head)
    if family == "bert":
        return _bert_config(c, head)
    return _seq2seq_config(c, family)


def _activation(family: str, field: str, value: str) -> str:
    if value not in ACT_FROM_HF:
        raise _cannot(family, field, value, f"glassmind has {sorted(set(ACT_FROM_HF.values()))}, i.e. HF's "
                                            f"{sorted(ACT_FROM_HF)}")
    return ACT_FROM_HF[value]


def _gpt2_config(c: dict, head: str) -> ModelConfig:
    if c["add_cross_attention"]:
        raise _cannot("gpt2", "add_cross_attention", True, "a glassmind decoder has no cross-attention; use BART")
    if not c["scale_attn_weights"]:
        raise _cannot("gpt2", "scale_attn_weights", False, "attention is always scaled by 1/sqrt(head_dim)")
    if c["scale_attn_by_inverse_layer_idx"]:
        raise _cannot("gpt2", "scale_attn_by_inverse_layer_idx", True,
                      "attention scores are never divided by the layer index")
    return ModelConfig(
        **FIXED["gpt2"], vocab_size=c["vocab_size"], context_length=c["n_positions"], d_model=c["n_embd"],
        n_heads=c["n_head"], n_layers=c["n_layer"], d_ff=c["n_inner"] or 4 * c["n_embd"],
        activation=_activation("gpt2", "activation_function", c["activation_function"]),
        norm_eps=float(c["layer_norm_epsilon"]), tie_embeddings=bool(c["tie_word_embeddings"]),
        dropout=float(c["resid_pdrop"]), attention_dropout=float(c["attn_pdrop"]), head=head,
        pad_token_id=c["pad_token_id"], init_std=float(c["initializer_range"]))


def _bert_config(c: dict, head: str) -> ModelConfig:
    if c["is_decoder"] or c["add_cross_attention"]:
        raise _cannot("bert", "is_decoder/add_cross_attention", True, "a glassmind encoder is bidirectional with "
                      "no cross-attention; use GPT-2 or BART for decoders")
    if c["position_embedding_type"] != "absolute":
        raise _cannot("bert", "position_embedding_type", c["position_embedding_type"],
                      "glassmind's learned positions are absolute")
    if c["type_vocab_size"] < 1:
        raise _cannot("bert", "type_vocab_size", c["type_vocab_size"], "BERT needs at least one token type")
    num_labels = len(c["id2label"]) if c.get("id2label") else int(c.get("num_labels", 2))
    return ModelConfig(
        **FIXED["bert"], vocab_size=c["vocab_size"], context_length=c["max_position_embeddings"],
        d_model=c["hidden_size"], n_heads=c["num_attention_heads"], n_layers=c["num_hidden_layers"],
        d_ff=c["intermediate_size"], activation=_activation("bert", "hidden_act", c["hidden_act"]),
        norm_eps=float(c["layer_norm_eps"]), type_vocab_size=c["type_vocab_size"],
        tie_embeddings=bool(c["tie_word_embeddings"]), dropout=float(c["hidden_dropout_prob"]),
        attention_dropout=float(c["attention_probs_dropout_prob"]), head=head, num_labels=num_labels,
        pad_token_id=c["pad_token_id"], init_std=float(c["initializer_range"]))


def _seq2seq_config(c: dict, family: str) -> ModelConfig:
    # One ModelConfig has one head count and one FFN width for both stacks.
    for enc, dec in (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim")):
        if c[enc] != c[dec]:
            raise _cannot(family, dec, c[dec], f"glassmind uses one value for both stacks and {enc}={c[enc]}")
    if family == "marian":
        if not c["share_encoder_decoder_embeddings"]:
            raise _cannot("marian", "share_encoder_decoder_embeddings", False,
                          "glassmind's encoder and decoder share one token embedding")
        if c["decoder_vocab_size"] not in (None, c["vocab_size"]):
            raise _cannot("marian", "decoder_vocab_size", c["decoder_vocab_size"],
                          f"glassmind has one vocabulary (vocab_size={c['vocab_size']})")
    return ModelConfig(
        **FIXED[family], vocab_size=c["vocab_size"], context_length=c["max_position_embeddings"],
        d_model=c["d_model"], n_heads=c["encoder_attention_heads"], n_layers=c["decoder_layers"],
        n_encoder_layers=c["encoder_layers"], d_ff=c["encoder_ffn_dim"],
        activation=_activation(family, "activation_function", c["activation_function"]),
        scale_embeddings=bool(c["scale_embedding"]), lm_head_bias=True,  # final_logits_bias
        tie_embeddings=bool(c["tie_word_embeddings"]), dropout=float(c["dropout"]),
        attention_dropout=float(c["attention_dropout"]), head="lm", pad_token_id=c["pad_token_id"],
        init_std=float(c["init_std"]))


def _mismatches(cfg: ModelConfig, family: str) -> list[str]:
    """Every reason `cfg` is not expressible as `family`, each naming the field: empty when it is."""
    bad = [f"{k}={getattr(cfg, k)!r} (needs {v!r})" for k, v in FIXED[family].items() if getattr(cfg, k) != v]
    if cfg.n_kv_heads != cfg.n_heads:
        bad.append(f"n_kv_heads={cfg.n_kv_heads} (needs n_heads={cfg.n_heads}: no grouped-query attention)")
    if cfg.activation not in ACT_TO_HF:
        bad.append(f"activation={cfg.activation!r} (needs one of {sorted(ACT_TO_HF)})")
    if cfg.head not in HEADS_OF[family]:
        bad.append(f"head={cfg.head!r} (needs one of {HEADS_OF[family]})")
    if family == "bert" and cfg.type_vocab_size < 1:
        bad.append(f"type_vocab_size={cfg.type_vocab_size} (needs >= 1)")
    return bad


def family_of(cfg: ModelConfig) -> str:
    """The HF family whose fixed fields `cfg` matches; raises naming, per family, the fields that differ."""
    reasons = {}
    for family in FAMILIES:
        bad = _mismatches(cfg, family)
        if not bad:
            return family
        reasons[family] = bad
    detail = "; ".join(f"{f}: {', '.join(r[:3])}" for f, r in reasons.items())
    raise GlassmindError(f"this model matches no Hugging Face family glassmind converts to ({detail})")


def _check_family(cfg: ModelConfig, family: str) -> None:
    if family not in FAMILIES:
        raise GlassmindError(f"unknown family {family!r}: use one of {FAMILIES}")
    bad = _mismatches(cfg, family)
    if bad:
        raise GlassmindError(f"this model cannot be written as {family}: {'; '.join(bad)}")


def architecture_for(cfg: ModelConfig, family: str) -> str:
    return next(name for name, fh in ARCHITECTURES.items() if fh == (family, cfg.head))


def config_to_hf(cfg: ModelConfig, family: str | None = None, *, base: dict | None = None):
    """ModelConfig -> the transformers config of `family` (default: inferred with family_of).

    `base` (an original HF config.json dict, kept by `glassmind convert --from-hf`) supplies what a
    ModelConfig does not hold: special token ids, label names. Architectural fields always come from `cfg`."""
    transformers = _transformers()
    family = family or family_of(cfg)
    _check_family(cfg, family)
    act = ACT_TO_HF[cfg.activation]
    if family == "gpt2":
        arch = dict(vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.d_model,
                    n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.d_ff, activation_function=act,
                    layer_norm_epsilon=cfg.norm_eps, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
                    attn_pdrop=cfg.attention_dropout, initializer_range=cfg.init_std, scale_attn_weights=True,
                    scale_attn_by_inverse_layer_idx=False, add_cross_attention=False)
        defaults = dict(bos_token_id=50256, eos_token_id=50256)
    elif family == "bert":
        arch = dict(vocab_size=cfg.vocab_size, max_position_embeddings=cfg.context_length,
                    hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                    intermediate_size=cfg.d_ff, hidden_act=act, layer_norm_eps=cfg.norm_eps,
                    type_vocab_size=cfg.type_vocab_size, hidden_dropout_prob=cfg.dropout,
                    attention_probs_dropout_prob=cfg.attention_dropout, initializer_range=cfg.init_std,
                    is_decoder=False, add_cross_attention=False, num_labels=cfg.num_labels)
        defaults = {}
    else:
        arch = dict(vocab_size=cfg.vocab_size, max_position_embeddings=cfg.context_length, d_model=cfg.d_model,
                    encoder_layers=cfg.n_encoder_layers, decoder_layers=cfg.n_layers,
                    encoder_attention_heads=cfg.n_heads, decoder_attention_heads=cfg.n_heads,
                    encoder_ffn_dim=cfg.d_ff, decoder_ffn_dim=cfg.d_ff, activation_function=act,
                    scale_embedding=cfg.scale_embeddings, dropout=cfg.dropout,
                    attention_dropout=cfg.attention_dropout, activation_dropout=0.0, init_std=cfg.init_std,
                    encoder_layerdrop=0.0, decoder_layerdrop=0.0)
        if family == "marian":
            arch.update(decoder_vocab_size=cfg.vocab_size, share_encoder_decoder_embeddings=True)
            defaults = dict(eos_token_id=0, forced_eos_token_id=0)
        else:
            defaults = dict(bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2)
    arch.update(tie_word_embeddings=cfg.tie_embeddings, pad_token_id=cfg.pad_token_id,
                architectures=[architecture_for(cfg, family)])
    doc = {**defaults, **(base or {}), **arch}
    for k in ("model_type", "transformers_version", "_name_or_path", "torch_dtype", "dtype"):
        doc.pop(k, None)
    if doc.get("id2label") and len(doc["id2label"]) != cfg.num_labels:
        doc.pop("id2label"), doc.pop("label2id", None)
    # Special ids past the end of the vocabulary (a small model with a family's default ids) would index
    # outside the embedding; drop them.
    for k in ("bos_token_id", "eos_token_id", "decoder_start_token_id", "forced_eos_token_id", "sep_token_id"):
        if isinstance(doc.get(k), int) and doc[k] >= cfg.vocab_size:
            doc[k] = None
    if family == "marian" and doc.get("decoder_start_token_id") is None:
        # MarianConfig requires one; Marian starts decoding from pad, by default the last id
        doc["decoder_start_token_id"] = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.vocab_size - 1
    cls = {"gpt2": transformers.GPT2Config, "bert": transformers.BertConfig, "bart": transformers.BartConfig,
           "marian": transformers.MarianConfig}[family]
    return cls(**doc)


# ======================================================================================================
# Weights: one table per family
# ======================================================================================================


class Pair(NamedTuple):
    """One glassmind tensor (or several, stacked on dim 0) and the HF keys holding it.

    hf: the keys, read in order (the first present wins: a save_pretrained file keeps one key of a tied
        group, and which one varies), and all written. kind: 'copy'; 'conv1d' (GPT-2's Conv1D stores
        (in, out), the transpose of nn.Linear's (out, in)); 'row' (BART's final_logits_bias is (1, V))."""
    ours: tuple[str, ...]
    hf: tuple[str, ...]
    kind: str = "copy"


def _pairs_of(ours: str, hf: str, kind: str = "copy", params: tuple[str, ...] = ("weight", "bias")) -> list[Pair]:
    return [Pair((f"{ours}.{p}",), (f"{hf}.{p}",), kind if p == "weight" else "copy") for p in params]


def _table(cfg: ModelConfig, architecture: str) -> tuple[list[Pair], list[str]]:
    """(pairs, patterns of HF keys that carry nothing glassmind keeps) for one HF class and config."""
    family, head = ARCHITECTURES[architecture]
    if family == "gpt2":
        return _gpt2_table(cfg, "transformer." if head == "lm" else "")
    if family == "bert":
        return _bert_table(cfg, "" if architecture == "BertModel" else "bert.")
    return _seq2seq_table(cfg, family)


def _gpt2_table(cfg: ModelConfig, p: str) -> tuple[list[Pair], list[str]]:
    tied_head = ("lm_head.weight",) if cfg.head == "lm" and cfg.tie_embeddings else ()
    pairs = [Pair(("token_embedding.weight",), (f"{p}wte.weight", *tied_head)),
             Pair(("decoder.position_embedding.weight",), (f"{p}wpe.weight",))]
    for i in range(cfg.n_layers):
        b, h = f"decoder.blocks.{i}.", f"{p}h.{i}."
        qkv = tuple(f"{b}self_attn.{x}_proj" for x in "qkv")
        pairs += [Pair(tuple(f"{n}.weight" for n in qkv), (f"{h}attn.c_attn.weight",), "conv1d"),
                  Pair(tuple(f"{n}.bias" for n in qkv), (f"{h}attn.c_attn.bias",))]
        pairs += _pairs_of(f"{b}self_attn.out_proj", f"{h}attn.c_proj", "conv1d")
        pairs += _pairs_of(f"{b}self_attn_norm", f"{h}ln_1")
        pairs += _pairs_of(f"{b}ffn_norm", f"{h}ln_2")
        pairs += _pairs_of(f"{b}ffn.up", f"{h}mlp.c_fc", "conv1d")
        pairs += _pairs_of(f"{b}ffn.down", f"{h}mlp.c_proj", "conv1d")
    pairs += _pairs_of("decoder.final_norm", f"{p}ln_f")
    if cfg.head == "lm" and not cfg.tie_embeddings:
        pairs.append(Pair(("lm_head.weight",), ("lm_head.weight",)))
    # causal-mask buffers that old GPT-2 checkpoints (e.g. openai-community/gpt2) still carry
    return pairs, [r"\.attn\.bias$", r"\.attn\.masked_bias$"]


def _bert_table(cfg: ModelConfig, p: str) -> tuple[list[Pair], list[str]]:
    e = f"{p}embeddings."
    tied_decoder = ("cls.predictions.decoder.weight",) if cfg.head == "mlm" and cfg.tie_embeddings else ()
    pairs = [Pair(("token_embedding.weight",), (f"{e}word_embeddings.weight", *tied_decoder)),
             Pair(("encoder.position_embedding.weight",), (f"{e}position_embeddings.weight",)),
             Pair(("encoder.token_type_embedding.weight",), (f"{e}token_type_embeddings.weight",)),
             *_pairs_of("encoder.embedding_norm", f"{e}LayerNorm")]
    for i in range(cfg.n_layers):
        b, h = f"encoder.blocks.{i}.", f"{p}encoder.layer.{i}."
        for ours, theirs in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
            pairs += _pairs_of(f"{b}self_attn.{ours}", f"{h}attention.self.{theirs}")
        pairs += _pairs_of(f"{b}self_attn.out_proj", f"{h}attention.output.dense")
        pairs += _pairs_of(f"{b}self_attn_norm", f"{h}attention.output.LayerNorm")
        pairs += _pairs_of(f"{b}ffn.up", f"{h}intermediate.dense")
        pairs += _pairs_of(f"{b}ffn.down", f"{h}output.dense")
        pairs += _pairs_of(f"{b}ffn_norm", f"{h}output.LayerNorm")
    ignore = [r"embeddings\.position_ids$"]  # a buffer old checkpoints saved
    if cfg.head == "mlm":
        pairs += _pairs_of("head.dense", "cls.predictions.transform.dense")
        pairs += _pairs_of("head.norm", "cls.predictions.transform.LayerNorm")
        # The forward adds decoder.bias; with tied embeddings it is cls.predictions.bias itself, untied (in
        # transformers 5) it is a separate tensor and cls.predictions.bias is unused.
        pairs.append(Pair(("head.bias",), ("cls.predictions.decoder.bias", "cls.predictions.bias")))
        if not cfg.tie_embeddings:
            pairs.append(Pair(("head.decoder.weight",), ("cls.predictions.decoder.weight",)))
    elif cfg.head == "classification":
        pairs += _pairs_of("head.pooler", f"{p}pooler.dense") + _pairs_of("head.classifier", "classifier")
    elif cfg.head == "token_classification":
        pairs += _pairs_of("head.classifier", "classifier")
    if cfg.head != "classification":
        # BertModel's pooler (dense + tanh on [CLS]): ModelConfig has no pooler-only head, so it is dropped
        ignore.append(r"(^|\.)pooler\.dense\.(weight|bias)$")
    return pairs, ignore


def _seq2seq_table(cfg: ModelConfig, family: str) -> tuple[list[Pair], list[str]]:
    tied_head = ("lm_head.weight",) if cfg.tie_embeddings else ()
    # Read the encoder's embedding first: it is the one the forward uses even when transformers 5 unties
    # the three (tie_word_embeddings=False unties shared, encoder and decoder embeddings). The decoder's is
    # checked equal in _check_one_embedding.
    pairs = [Pair(("token_embedding.weight",), ("model.encoder.embed_tokens.weight", "model.shared.weight",
                                                "model.decoder.embed_tokens.weight", *tied_head))]
    ignore = []
    for stack in ("encoder", "decoder"):
        if family == "bart":
            pairs.append(Pair((f"{stack}.position_embedding.weight",), (f"model.{stack}.embed_positions.weight",)))
            pairs += _pairs_of(f"{stack}.embedding_norm", f"model.{stack}.layernorm_embedding")
        else:
            ignore.append(rf"^model\.{stack}\.embed_positions\.weight$")  # a frozen sinusoid, checked apart
        n = cfg.n_encoder_layers if stack == "encoder" else cfg.n_layers
        for i in range(n):
            b, h = f"{stack}.blocks.{i}.", f"model.{stack}.layers.{i}."
            attn = [("self_attn", "self_attn")] + ([("cross_attn", "encoder_attn")] if stack == "decoder" else [])
            for ours, theirs in attn:
                for x in ("q_proj", "k_proj", "v_proj", "out_proj"):
                    pairs += _pairs_of(f"{b}{ours}.{x}", f"{h}{theirs}.{x}")
                pairs += _pairs_of(f"{b}{ours}_norm", f"{h}{theirs}_layer_norm")
            pairs += _pairs_of(f"{b}ffn.up", f"{h}fc1") + _pairs_of(f"{b}ffn.down", f"{h}fc2")
            pairs += _pairs_of(f"{b}ffn_norm", f"{h}final_layer_norm")
    if cfg.lm_head_bias:
        pairs.append(Pair(("lm_bias",), ("final_logits_bias",), "row"))
    else:
        ignore.append(r"^final_logits_bias$")  # left at HF's zeros
    if not cfg.tie_embeddings:
        pairs.append(Pair(("lm_head.weight",), ("lm_head.weight",)))
    return pairs, ignore


# -- moving tensors through the table ------------------------------------------------------------------


def _to_ours(hf_sd: dict[str, torch.Tensor], pairs: list[Pair]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for pair in pairs:
        key = next((k for k in pair.hf if k in hf_sd), None)
        if key is None:
            raise GlassmindError(f"the Hugging Face weights lack {pair.hf[0]}: the checkpoint does not match "
                                 "its config.json")
        t = hf_sd[key]
        if pair.kind == "row":
            t = t[0]
        elif pair.kind == "conv1d":
            t = t.t()
        for name, part in zip(pair.ours, t.chunk(len(pair.ours), dim=0)):  # fused q, k, v: (3C, ...) -> 3 x (C, ...)
            out[name] = part.detach().clone(memory_format=torch.contiguous_format)
    return out


def _from_ours(sd: dict[str, torch.Tensor], pair: Pair) -> torch.Tensor:
    t = torch.cat([sd[n] for n in pair.ours], dim=0) if len(pair.ours) > 1 else sd[pair.ours[0]]
    if pair.kind == "row":
        return t[None]
    return t.t() if pair.kind == "conv1d" else t


def _unused(keys, used: set[str], ignore: list[str]) -> list[str]:
    return sorted(k for k in keys if k not in used and not any(re.search(p, k) for p in ignore))


def _align_prefix(hf_sd: dict[str, torch.Tensor], pairs: list[Pair], prefix: str) -> dict[str, torch.Tensor]:
    """A checkpoint saved from the base model has no `transformer.`/`bert.` prefix, one saved from a task
    class has it; rename keys to the form the table expects (transformers does the same on load)."""
    wanted = {k for pair in pairs for k in pair.hf}
    out = {}
    for k, v in hf_sd.items():
        if k not in wanted and prefix + k in wanted:
            k = prefix + k
        elif k not in wanted and k.startswith(prefix) and k[len(prefix):] in wanted:
            k = k[len(prefix):]
        out[k] = v
    return out


def _check_one_embedding(hf_sd: dict[str, torch.Tensor], family: str) -> None:
    if family not in ("bart", "marian"):
        return
    enc, dec = hf_sd.get("model.encoder.embed_tokens.weight"), hf_sd.get("model.decoder.embed_tokens.weight")
    if enc is not None and dec is not None and not torch.equal(enc, dec):
        raise _cannot(family, "tie_word_embeddings", False, "the encoder and decoder token embeddings differ "
                      "(transformers 5 unties them with tie_word_embeddings=False) and glassmind's two stacks "
                      "share one token embedding")


def _check_sinusoid(hf_sd: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """Marian's positions are a frozen table; ours is recomputed, so make sure the file holds the same one."""
    expected = sinusoidal_table(cfg.context_length, cfg.d_model, cfg.sinusoidal_layout)
    for stack in ("encoder", "decoder"):
        t = hf_sd.get(f"model.{stack}.embed_positions.weight")
        if t is not None and (t.shape != expected.shape or (t.float() - expected).abs().max() > 1e-4):
            raise GlassmindError(f"model.{stack}.embed_positions.weight is not Marian's sinusoid for "
                                 f"{cfg.context_length} positions: glassmind recomputes the sinusoid and cannot "
                                 "carry trained position embeddings")


def _from_hf_state(hf_sd: dict[str, torch.Tensor], cfg: ModelConfig, architecture: str) -> Transformer:
    family = ARCHITECTURES[architecture][0]
    pairs, ignore = _table(cfg, architecture)
    hf_sd = _align_prefix(hf_sd, pairs, BASE_PREFIX[family])
    _check_one_embedding(hf_sd, family)
    if family == "marian":
        _check_sinusoid(hf_sd, cfg)
    extra = _unused(hf_sd, {k for pair in pairs for k in pair.hf}, ignore)
    if extra:
        raise GlassmindError(f"{architecture} weights glassmind has no place for: {extra[:6]}"
                             f"{' ...' if len(extra) > 6 else ''}; is the config.json the model's own?")
    ours = _to_ours(hf_sd, pairs)
    with torch.device("meta"):
        model = Transformer(cfg)
    missing = sorted(set(model.state_dict()) - set(ours))
    assert not missing, f"interop table for {architecture} misses {missing}"
    model.load_state_dict(ours, strict=True, assign=True)
    return model.rebuild_buffers().eval()  # the sinusoid is a buffer, not in any file


# ======================================================================================================
# Entry points
# ======================================================================================================


def from_hf(hf_model: Any) -> Transformer:
    """A transformers model (one of ARCHITECTURES) -> a glassmind Transformer with the same weights (copies,
    in the same dtype), in eval mode."""
    name = type(hf_model).__name__
    if name not in ARCHITECTURES:
        raise GlassmindError(f"Hugging Face architecture {name} is not supported; supported: {_supported()}")
    cfg = config_from_hf(hf_model.config, name)
    return _from_hf_state(hf_model.state_dict(), cfg, name)


def to_hf(model: Transformer, family: str | None = None, *, base_config: dict | None = None):
    """A glassmind Transformer -> the transformers model of `family` (default: inferred from the config) with
    the same weights, in eval mode; `.save_pretrained(dir)` writes it. `base_config`: see config_to_hf."""
    transformers = _transformers()
    cfg = model.config
    family = family or family_of(cfg)
    hf_config = config_to_hf(cfg, family, base=base_config)
    architecture = architecture_for(cfg, family)
    cls = getattr(transformers, architecture)
    sd = model.state_dict()
    dtype = next(iter(sd.values())).dtype
    hf = cls(hf_config, add_pooling_layer=False) if architecture == "BertModel" else cls(hf_config)
    hf = hf.to(dtype)
    hf_sd = hf.state_dict()  # tensors share storage with the parameters: copy_ writes the model
    pairs, ignore = _table(cfg, architecture)
    written: set[str] = set()
    with torch.no_grad():
        for pair in pairs:
            value = _from_ours(sd, pair)
            for key in pair.hf:
                if key in hf_sd:
                    hf_sd[key].copy_(value)
                    written.add(key)
    unwritten = _unused(hf_sd, written, ignore)
    assert not unwritten, f"interop table for {architecture} leaves {unwritten} unset"
    return hf.eval()


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise GlassmindError(f"{file} is corrupt or truncated ({e}); download or save it again") from None


def _read_hf_weights(path: Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    if (path / "model.safetensors").exists():
        return _load_safetensors(path / "model.safetensors")
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return {k: v for shard in shards for k, v in _load_safetensors(path / shard).items()}
    if (path / "pytorch_model.bin").exists():
        if not allow_pickle:
            raise GlassmindError(f"{path / 'pytorch_model.bin'} is a pickle file, which can run arbitrary code "
                                 "when loaded; refusing. If you trust it, pass allow_pickle=True "
                                 "(--allow-pickle)")
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise GlassmindError(f"{path} holds no model.safetensors (nor a sharded index): is it a Hugging Face model "
                         "directory?")


def _read_hf_config(path: str | os.PathLike) -> dict:
    path = Path(path)
    f = path / "config.json"
    if not f.exists():
        raise GlassmindError(f"{f} not found: is {path} a Hugging Face model directory?")
    try:
        doc = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GlassmindError(f"{f} is not valid JSON ({e}); the file is corrupt") from None
    if "model_type" not in doc and "arch" in doc:
        raise GlassmindError(f"{path} is a glassmind run directory, not a Hugging Face one: load it with "
                             "glassmind.model.load, or convert it with `glassmind convert --to-hf`")
    return doc


def from_hf_dir(path: str | os.PathLike, *, allow_pickle: bool = False) -> Transformer:
    """A Hugging Face model directory (config.json + model.safetensors) -> Transformer, without transformers."""
    doc = _read_hf_config(path)
    name = architecture_of(doc)
    cfg = config_from_hf(doc, name)
    return _from_hf_state(_read_hf_weights(Path(path), allow_pickle=allow_pickle), cfg, name)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def load_hf_dir(path: str | os.PathLike, *, allow_pickle: bool = False):
    """The transformers model in a local directory, built offline (never downloads), in eval mode.

    Like from_hf_dir it reads safetensors only unless allow_pickle: a directory whose weights are a pickle
    (pytorch_model.bin, *.pt, ...) is refused before transformers opens it, since unpickling can run code."""
    transformers = _transformers()
    name = architecture_of(_read_hf_config(path))
    path = Path(path)
    has_safetensors = any(path.glob("*.safetensors"))
    if not has_safetensors and not allow_pickle:
        pickles = sorted(f.name for f in path.iterdir()
                         if f.name.endswith(PICKLE_SUFFIXES) or f.name.endswith(".bin.index.json"))
        if pickles:
            raise GlassmindError(f"{path} holds its weights as {', '.join(pickles)}: pickle files, which can run "
                                 "arbitrary code when loaded; refusing. If you trust them, pass "
                                 "allow_pickle=True (--allow-pickle)")
    # use_safetensors=True: transformers itself must not fall back to a pickle the check above did not name
    kw = {} if allow_pickle else {"use_safetensors": True}
    return getattr(transformers, name).from_pretrained(str(path), local_files_only=True, **kw).eval()
