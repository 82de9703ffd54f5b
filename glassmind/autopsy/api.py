"""One forward pass, explained: every measurement of the autopsy as one JSON-serialisable dict.

`autopsy_json` is the seam the web server and the report use; its schema is in docs/contracts.md.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from glassmind.common import GlassmindError
from glassmind.model.transformer import Transformer
from glassmind.autopsy.causal import (ablate as run_ablation, component_names,
                                      direct_logit_attribution, head_scores, patch)
from glassmind.autopsy.hooks import run_with_cache
from glassmind.autopsy.lens import explained_prefix, explained_stack, layer_labels, logit_lens
from glassmind.autopsy.narrate import narrate

MASK_TOKENS = ("[MASK]", "<|mask|>", "<mask>")
START_TOKENS = ("<|endoftext|>", "[SEP]", "</s>", "<s>")


def piece_of(tokenizer, i: int) -> str:
    """What a person reads for token i: its decoded text (byte-level BPE pieces decode to readable text)."""
    try:
        s = tokenizer.decode([i])
    except Exception:  # a piece that is not valid UTF-8 alone (half a multi-byte character)
        s = ""
    if not s or "\ufffd" in s:
        s = tokenizer.id_to_token(i) if hasattr(tokenizer, "id_to_token") else f"#{i}"
    return s


def mask_id(tokenizer) -> int | None:
    for t in MASK_TOKENS:
        if t in tokenizer.special_tokens:
            return tokenizer.special_tokens[t]
    return None


def decoder_start_id(model: Transformer, tokenizer) -> int:
    """The token an encoder-decoder's decoder starts from: the separator glassmind's span corruption uses
    (<|endoftext|> or [SEP]), else the config's pad id, else 0."""
    for t in START_TOKENS:
        if t in tokenizer.special_tokens:
            return tokenizer.special_tokens[t]
    return model.config.pad_token_id or 0


def resolve_position(model: Transformer, tokenizer, ids: Sequence[int], position: int | None) -> int:
    T = len(ids)
    if model.config.arch == "encoder" and (position is None or position == -1):
        m = mask_id(tokenizer)
        if m is not None and m in ids:
            return list(ids).index(m)  # masked-token prediction: the first mask
    pos = -1 if position is None else position
    if not -T <= pos < T:
        raise GlassmindError(f"position {pos} is outside the prompt's {T} tokens: use 0..{T - 1} or -1 (the last)")
    return pos % T


def validate(model: Transformer, ids: Sequence[int], tgt_ids: Sequence[int] | None, layers, heads) -> None:
    cfg = model.config
    if not ids:
        raise GlassmindError("the prompt is empty: give at least one token")
    if len(ids) > cfg.context_length:
        raise GlassmindError(f"the prompt is {len(ids)} tokens but the model's context is {cfg.context_length}: "
                             "shorten the prompt")
    if tgt_ids is not None and len(tgt_ids) > cfg.context_length:
        raise GlassmindError(f"the decoder prefix is {len(tgt_ids)} tokens, over the context {cfg.context_length}")
    bad = [i for i in list(ids) + list(tgt_ids or []) if not 0 <= i < cfg.vocab_size]
    if bad:
        raise GlassmindError(f"token ids {bad[:3]} are outside the vocabulary [0, {cfg.vocab_size}): is the "
                             "tokenizer the run's?")
    n_layers = len(explained_stack(model).blocks)
    for l in layers or ():
        if not 0 <= l < n_layers:
            raise GlassmindError(f"layer {l} is out of range: this model has layers 0..{n_layers - 1}")
    for h in heads or ():
        if not 0 <= h < cfg.n_heads:
            raise GlassmindError(f"head {h} is out of range: this model has heads 0..{cfg.n_heads - 1}")
    if cfg.arch == "encoder" and cfg.head not in ("mlm", "none"):
        raise GlassmindError(f"this encoder's head is {cfg.head!r}: the autopsy explains a token prediction "
                             "(head 'mlm', or 'none' read against the token embeddings)")


def _tolist(t: torch.Tensor, nd: int = 4) -> Any:
    return [[round(float(x), nd) for x in row] for row in t]


@torch.no_grad()
def autopsy_json(model: Transformer, tokenizer, ids: list[int], *, position: int = -1, target: int | None = None,
                 top_k: int = 5, ablate: bool = True, tgt_ids: list[int] | None = None,
                 compare_ids: list[int] | None = None, layers: Sequence[int] | None = None,
                 heads: Sequence[int] | None = None, tuned_lens: Any = None, detectors: bool = True,
                 ablation_mode: str = "mean") -> dict[str, Any]:
    """Explain one prediction. Decoder: the token after `position` (default the last). Encoder (MLM): the
    token at `position` (default the first mask token). Encoder-decoder: `ids` is the source and the
    decoder's prefix `tgt_ids` (default: its start token) is read; `position` indexes that prefix.
    `target`: the token id to explain (default: the model's top guess). `compare_ids`: a corrupted prompt of
    the same length for activation patching. `layers`/`heads` restrict the attention maps and the ablations.
    Every number is measured here; see docs/contracts.md for the schema."""
    model.eval()
    cfg = model.config
    arch = cfg.arch
    if arch == "encoder-decoder" and tgt_ids is None:
        tgt_ids = [decoder_start_id(model, tokenizer)]
    validate(model, ids, tgt_ids, layers, heads)
    explained = tgt_ids if arch == "encoder-decoder" else ids
    pos = resolve_position(model, tokenizer, explained, position)
    if target is not None and not 0 <= target < cfg.vocab_size:
        raise GlassmindError(f"target id {target} is outside the vocabulary [0, {cfg.vocab_size})")
    if compare_ids is not None and len(compare_ids) != len(ids):
        raise GlassmindError(f"the corrupted prompt is {len(compare_ids)} tokens and the clean one {len(ids)}: "
                             "patching pairs positions, so make them the same length")
    if top_k < 1:
        raise GlassmindError("top_k must be at least 1")

    x = torch.tensor([ids])
    tgt = torch.tensor([tgt_ids]) if tgt_ids is not None else None
    logits, cache = run_with_cache(model, x, tgt)
    logp = logits[0, pos].float().log_softmax(-1)
    if target is None:
        target = int(logp.argmax())
    piece = lambda i: piece_of(tokenizer, i)  # noqa: E731
    probs = logp.exp()
    top = torch.topk(probs, min(top_k, probs.numel()))
    pre = explained_prefix(model)
    stack = explained_stack(model)
    L = len(stack.blocks)
    keep_layers = list(layers) if layers else list(range(L))
    keep_heads = list(heads) if heads else list(range(cfg.n_heads))
    T = len(explained)

    r: dict[str, Any] = {
        "arch": arch,
        "tokens": [piece(i) for i in ids],
        "ids": list(ids),
        "position": pos,
        "target": {"id": target, "piece": piece(target), "prob": float(probs[target]),
                   "logprob": float(logp[target]), "rank": int((logp > logp[target]).sum()) + 1},
        "prediction": [[piece(int(i)), float(v)] for v, i in zip(top.values, top.indices)],
        "context_tail": tokenizer.decode(list(explained[max(0, pos - 4): pos + 1])),
        "layers": keep_layers, "heads": keep_heads,
        "readout": ("embedding" if arch == "encoder" and cfg.head == "none" else "head"),
    }
    if arch == "encoder-decoder":
        r["decoder_tokens"] = [piece(i) for i in tgt_ids]
        r["encoder_attention"] = [[_tolist(cache[f"encoder.blocks.{l}.attn.hook_pattern"][0, h]) for h in keep_heads]
                                  for l in range(cfg.n_encoder_layers_total) if l in keep_layers]
        r["cross_attention"] = [[_tolist(cache[f"decoder.blocks.{l}.cross_attn.hook_pattern"][0, h])
                                 for h in keep_heads] for l in keep_layers]
    r["attention"] = [[_tolist(cache[f"{pre}blocks.{l}.attn.hook_pattern"][0, h]) for h in keep_heads]
                      for l in keep_layers]

    # lenses over every position of the explained sequence
    r["lens_rows"] = layer_labels(model)
    r["lens"] = logit_lens(model, cache, range(T), target, top_k, piece)
    r["lens_position_index"] = pos
    if tuned_lens is not None:
        r["tuned_lens"] = logit_lens(model, cache, range(T), target, top_k, piece, tuned=tuned_lens)

    # direct logit attribution at the explained position
    dla = direct_logit_attribution(model, cache, pos, target)
    r["attribution"] = [{"component": c, "value": v} for c, v in dla["components"]]
    r["attribution"].append({"component": "rest", "value": dla["rest"]})
    r["attribution_exact"] = dla["exact"]
    r["logit"] = dla["logit"]
    # where each head looks from the explained position (for the narration's "attending most to")
    focus = {}
    for l in range(L):
        patt = cache[f"{pre}blocks.{l}.attn.hook_pattern"][0, :, pos]                  # (H, T)
        for h in range(patt.shape[0]):
            k = int(patt[h].argmax())
            focus[f"L{l}.H{h}"] = {"position": k, "piece": piece(explained[k]), "weight": float(patt[h, k])}
        if arch == "encoder-decoder":
            cp = cache[f"decoder.blocks.{l}.cross_attn.hook_pattern"][0, :, pos]       # (H, S)
            for h in range(cp.shape[0]):
                k = int(cp[h].argmax())
                focus[f"L{l}.X{h}"] = {"position": k, "piece": piece(ids[k]), "weight": float(cp[h, k])}
    r["head_focus"] = focus

    comps = [c for c in component_names(model)
             if int(c[1:].split(".")[0]) in keep_layers and (c.endswith("FFN") or int(c.split(".")[1][1:]) in keep_heads)]
    r["ablation"] = run_ablation(model, x, tgt, pos, target, comps, ablation_mode) if ablate else []
    if compare_ids is not None:
        corrupted = torch.tensor([compare_ids])
        if arch == "encoder-decoder":
            r["patching"] = patch(model, x, corrupted, tgt, pos, target, comps)
        else:
            r["patching"] = patch(model, x, corrupted, None, pos, target, comps + [f"P{t}" for t in range(T)])
        r["compare_tokens"] = [piece(i) for i in compare_ids]
    if detectors and 2 * 4 <= cfg.context_length:
        r["detectors"] = head_scores(model, half=min(32, cfg.context_length // 2), n_seqs=8)

    # embeddings: nearest neighbours (cosine) and a 2-D PCA of the prompt's token embeddings
    E = model.token_embedding.weight.float()                                          # (V, C)
    En = E / E.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    uniq = list(dict.fromkeys(ids))
    sims = En[uniq] @ En.T                                                            # (U, V)
    nb = []
    for row, i in zip(sims, uniq):
        row[i] = -2
        v, j = torch.topk(row, min(5, row.numel() - 1))
        nb.append({"token": piece(i), "neighbours": [[piece(int(b)), round(float(a), 4)] for a, b in zip(v, j)]})
    r["embedding_neighbours"] = nb
    P = E[torch.tensor(ids)]
    Pc = P - P.mean(0)
    if len(ids) >= 2:
        _, S, V = torch.linalg.svd(Pc, full_matrices=False)
        coords = Pc @ V[:2].T if V.shape[0] >= 2 else torch.cat([Pc @ V[:1].T, torch.zeros(len(ids), 1)], 1)
        var = (S ** 2 / (S ** 2).sum().clamp(min=1e-12))[:2].tolist()
    else:
        coords, var = torch.zeros(1, 2), [0.0, 0.0]
    r["embedding_pca"] = {"coords": _tolist(coords), "explained_variance": [round(v, 4) for v in var]}

    # positional encodings of the explained positions
    if cfg.positional in ("learned", "sinusoidal"):
        pe = cache[f"{pre}hook_pos_embed"][0]                                           # (T, C)
        r["positional"] = {"kind": cfg.positional, "values": _tolist(pe)}
    elif cfg.positional == "rope":
        r["positional"] = {"kind": "rope", "values": _tolist(cache[f"{pre}hook_rope_cos"][0, 0])}
    else:
        r["positional"] = {"kind": "none", "values": []}
    r["narration"] = narrate(r)
    return r


def check_json(r: dict) -> None:
    """Raise if any number is not finite (JSON has no NaN)."""
    def walk(v: Any) -> None:
        if isinstance(v, float) and not math.isfinite(v):
            raise GlassmindError("the autopsy produced a non-finite number")
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
    walk(r)
