"""Causes, not only correlations: direct logit attribution, ablation, activation patching, head detectors.

Components of the explained stack (the decoder's for an encoder-decoder) are named for people:

    embed        the residual stream entering block 0 (token + position embeddings, after any embedding norm)
    L{i}.H{h}    head h of block i's self-attention (its write z_h W_O,h into the residual stream)
    L{i}.X{h}    head h of block i's cross-attention (encoder-decoders)
    L{i}.FFN     block i's feed-forward network
    P{t}         the token at position t (ablation only: its embedding row)

Direct logit attribution (Elhage et al. 2021, "A Mathematical Framework for Transformer Circuits", sec. 2):
the final hidden state is a sum of every component's write passed through the norms that follow it. A norm
y = g * (x - mean x) / s + b is linear in x once its scale s is frozen at the value it had in this forward
pass, so each write c travels alone: c -> g * (c - mean c) / s, and the offsets b (plus every bias, and
the output bias) collect in "rest". Pre-norm models pass each write through the final norm only; post-norm
models (BERT, BART) through every later norm. Then value_c = W_U[target] . c', and
sum_c value_c + rest = the target's logit exactly (pinned in tests/test_autopsy_fidelity.py). An encoder's
MLM head (dense, activation, norm) is not linear: there value_c = grad . c' with grad the head's gradient at
the final hidden state, and rest is what the linearisation leaves (reported as `exact: false`).

Ablation replaces one component's activation by zero or by its mean over the prompt's positions (Nanda's
"mean ablation"); activation patching (Meng et al. 2022, "causal tracing"; Wang et al. 2022) runs the
corrupted prompt with one component's activation taken from the clean run. Both report the target's
log-probability before and after.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from glassmind.common import GlassmindError
from glassmind.model.transformer import Transformer
from glassmind.autopsy.hooks import forward, hooked, run_with_cache, ActivationCache
from glassmind.autopsy.lens import explained_prefix, explained_stack

_COMPONENT = re.compile(r"^(?:L(\d+)\.(H|X)(\d+)|L(\d+)\.FFN|P(\d+)|embed)$")


def component_names(model: Transformer, *, cross: bool = True) -> list[str]:
    stack = explained_stack(model)
    out = []
    for i, block in enumerate(stack.blocks):
        out += [f"L{i}.H{h}" for h in range(block.self_attn.n_heads)]
        if cross and block.cross_attn is not None:
            out += [f"L{i}.X{h}" for h in range(block.cross_attn.n_heads)]
        out.append(f"L{i}.FFN")
    return out


def check_component(model: Transformer, name: str, n_positions: int | None = None) -> None:
    """Raise naming the valid range when `name` is not a component of this model."""
    m = _COMPONENT.match(name)
    stack = explained_stack(model)
    n_layers, n_heads = len(stack.blocks), model.config.n_heads
    if m is None:
        raise GlassmindError(f"component {name!r}: write L<layer>.H<head>, L<layer>.X<head> (cross-attention), "
                             f"L<layer>.FFN or P<position>")
    layer = m.group(1) or m.group(4)
    if layer is not None and int(layer) >= n_layers:
        raise GlassmindError(f"component {name!r}: layer {layer} is out of range; this model has layers "
                             f"0..{n_layers - 1}")
    if m.group(3) is not None and int(m.group(3)) >= n_heads:
        raise GlassmindError(f"component {name!r}: head {m.group(3)} is out of range; this model has heads "
                             f"0..{n_heads - 1}")
    if m.group(2) == "X" and stack.blocks[int(layer)].cross_attn is None:
        raise GlassmindError(f"component {name!r}: this model has no cross-attention (X heads are for "
                             "encoder-decoders); use H")
    if m.group(5) is not None and n_positions is not None and int(m.group(5)) >= n_positions:
        raise GlassmindError(f"component {name!r}: the prompt has positions 0..{n_positions - 1}")


# ----------------------------------------------------------------------------------- attribution


def _frozen_norm(norm: nn.Module, x: torch.Tensor) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    """(linear map v -> g*(v - mean v)/s with s frozen at x's, offset b) of LayerNorm or RMSNorm at input x (C,)."""
    eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
    g = norm.weight if norm.weight is not None else torch.ones_like(x)
    if isinstance(norm, nn.LayerNorm):
        s = torch.sqrt(x.var(unbiased=False) + eps)
        b = norm.bias if norm.bias is not None else torch.zeros_like(x)
        return (lambda v: g * (v - v.mean()) / s), b
    s = torch.sqrt(x.pow(2).mean() + eps)
    return (lambda v: g * v / s), torch.zeros_like(x)


@torch.no_grad()
def decompose_final_hidden(model: Transformer, cache: ActivationCache, position: int
                           ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({component: its vector in the final hidden state (C,)}, rest (C,)) at batch row 0, `position`;
    their sum is the explained stack's final hidden state (after its final norm, if any)."""
    pre = explained_prefix(model)
    stack = explained_stack(model)
    parts: dict[str, torch.Tensor] = {"embed": cache[f"{pre}blocks.0.hook_resid_pre"][0, position].clone()}
    rest = torch.zeros_like(parts["embed"])
    x = parts["embed"].clone()  # the running stream, to freeze each norm's scale at its true input

    def through(norm: nn.Module, x_in: torch.Tensor) -> torch.Tensor:
        nonlocal rest
        f, b = _frozen_norm(norm, x_in)
        for k in parts:
            parts[k] = f(parts[k])
        rest = f(rest) + b
        return norm(x_in)

    for i, block in enumerate(stack.blocks):
        P = f"{pre}blocks.{i}"
        subs = [("attn", "H", block.self_attn, block.self_attn_norm)]
        if block.cross_attn is not None:
            subs.append(("cross_attn", "X", block.cross_attn, block.cross_attn_norm))
        for a, letter, attn, norm in subs:
            result = cache[f"{P}.{a}.hook_result"][0, position]                         # (H, C)
            for h in range(result.shape[0]):
                parts[f"L{i}.{letter}{h}"] = result[h].clone()
            if attn.out_proj.bias is not None:
                rest = rest + attn.out_proj.bias
            x = x + result.sum(0) + (attn.out_proj.bias if attn.out_proj.bias is not None else 0)
            if not block.pre:
                x = through(norm, x)
        parts[f"L{i}.FFN"] = cache[f"{P}.hook_mlp_out"][0, position].clone()
        x = x + parts[f"L{i}.FFN"]
        if not block.pre:
            x = through(block.ffn_norm, x)
    if stack.final_norm is not None:
        x = through(stack.final_norm, x)
    return parts, rest


def direct_logit_attribution(model: Transformer, cache: ActivationCache, position: int, target: int
                             ) -> dict[str, Any]:
    """{"components": [(name, logit contribution)], "rest", "logit", "exact"} for the target's logit at
    `position` (see the module docstring)."""
    parts, rest = decompose_final_hidden(model, cache, position)
    hidden = sum(parts.values()) + rest                                                 # (C,)
    if model.config.arch == "encoder" and model.config.head == "none":  # embedding-dot readout: linear
        w, bias, exact = model.token_embedding.weight[target].detach(), 0.0, True
        logit = float(w @ hidden)
    elif model.config.arch == "encoder":  # nonlinear MLM head: linearise at the true final hidden state
        h = hidden.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            logit = model.head(h[None], model.token_embedding.weight)[0, target]
            (w,) = torch.autograd.grad(logit, h)
        logit, exact, bias = float(logit), False, 0.0
    else:
        W, b = model.output_projection()
        w, bias, exact = W[target].detach(), (float(b[target].detach()) if b is not None else 0.0), True
        logit = float(w @ hidden) + bias
    comps = [(k, float(w @ v)) for k, v in parts.items()]
    # exact: rest is the offsets' own contribution, computed from them (so the sum is a check, not a
    # definition); linearised head: rest is what the linearisation leaves
    rest_value = float(w @ rest) + bias if exact else logit - sum(v for _, v in comps)
    return {"components": comps, "rest": rest_value, "logit": logit, "exact": exact, "hidden": hidden,
            "rest_vector": rest}


# -------------------------------------------------------------------------------- ablation, patching


def _edit_for(model: Transformer, name: str, replace: Callable[[torch.Tensor, tuple], torch.Tensor]
              ) -> dict[str, Callable]:
    """The edit that applies `replace(activation, index)` to the activation slice of component `name`."""
    check_component(model, name)
    pre = explained_prefix(model)
    m = _COMPONENT.match(name)
    if m.group(1) is not None:
        hook = "attn.hook_z" if m.group(2) == "H" else "cross_attn.hook_z"
        h = int(m.group(3))
        key, index = f"{pre}blocks.{m.group(1)}.{hook}", (slice(None), slice(None), h)  # (B, T, H, D)
    elif m.group(4) is not None:
        key, index = f"{pre}blocks.{m.group(4)}.hook_mlp_out", (slice(None),)
    elif m.group(5) is not None:
        key, index = f"{pre}blocks.0.hook_resid_pre", (slice(None), int(m.group(5)))
    else:
        key, index = f"{pre}blocks.0.hook_resid_pre", (slice(None),)

    def edit(value: torch.Tensor) -> torch.Tensor:
        value = value.clone()
        value[index] = replace(value, index)
        return value

    return {key: edit}


def ablation_edit(model: Transformer, name: str, mode: str = "mean") -> dict[str, Callable]:
    if mode not in ("zero", "mean"):
        raise GlassmindError(f"ablation mode {mode!r}: use zero or mean")

    def replace(value: torch.Tensor, index: tuple) -> torch.Tensor:
        if mode == "zero":
            return torch.zeros_like(value[index])
        # mean over the prompt's positions (dim 1) of the same slice, broadcast back
        mean = value.mean(dim=1, keepdim=True)
        if len(index) > 1 and isinstance(index[1], int):  # a position: its row becomes the mean row
            return mean[:, 0]
        return mean.expand_as(value)[index]

    return _edit_for(model, name, replace)


def patch_edit(model: Transformer, name: str, source: ActivationCache) -> dict[str, Callable]:
    """Replace component `name`'s activation by the one in `source` (a cache of another run)."""
    edit = _edit_for(model, name, lambda v, i: v[i])
    (key,) = edit
    src = source[key]

    def replace(value: torch.Tensor, index: tuple) -> torch.Tensor:
        if src.shape != value.shape:
            raise GlassmindError(f"patching needs prompts of the same length: {tuple(src.shape)} vs "
                                 f"{tuple(value.shape)}; make the corrupted prompt the same number of tokens")
        return src[index]

    return _edit_for(model, name, replace)


def target_logprob(logits: torch.Tensor, position: int, target: int) -> float:
    return float(logits[0, position].float().log_softmax(-1)[target])


@torch.no_grad()
def logprob_with(model: Transformer, ids: torch.Tensor, tgt_ids: torch.Tensor | None, position: int, target: int,
                 edits: dict[str, Callable] | None = None) -> float:
    with hooked(model, (), edits or {}):
        return target_logprob(forward(model, ids, tgt_ids), position, target)


def ablate(model: Transformer, ids: torch.Tensor, tgt_ids: torch.Tensor | None, position: int, target: int,
           components: Sequence[str], mode: str = "mean") -> list[dict[str, Any]]:
    """[{component, mode, logprob_before, logprob_after}] ablating each component alone."""
    before = logprob_with(model, ids, tgt_ids, position, target)
    return [{"component": c, "mode": mode, "logprob_before": before,
             "logprob_after": logprob_with(model, ids, tgt_ids, position, target, ablation_edit(model, c, mode))}
            for c in components]


def _cache_for_patching(model: Transformer, ids: torch.Tensor, tgt_ids: torch.Tensor | None) -> ActivationCache:
    pre = explained_prefix(model)
    keep = ("attn.hook_z", "hook_mlp_out", "hook_resid_pre")
    return run_with_cache(model, ids, tgt_ids, names=lambda n: n.startswith(f"{pre}blocks.") and n.endswith(keep))[1]


def patch(model: Transformer, clean: torch.Tensor, corrupted: torch.Tensor, tgt_ids: torch.Tensor | None,
          position: int, target: int, components: Sequence[str],
          corrupted_tgt: torch.Tensor | None = None) -> list[dict[str, Any]]:
    """Run the corrupted prompt with each component taken from the clean run: [{component, logprob_clean,
    logprob_corrupted, logprob_patched, restored}] where restored = (patched - corrupted) / (clean -
    corrupted), 1 = this component alone carries the difference."""
    corrupted_tgt = tgt_ids if corrupted_tgt is None else corrupted_tgt
    source = _cache_for_patching(model, clean, tgt_ids)
    lp_clean = logprob_with(model, clean, tgt_ids, position, target)
    lp_corr = logprob_with(model, corrupted, corrupted_tgt, position, target)
    out = []
    for c in components:
        lp = logprob_with(model, corrupted, corrupted_tgt, position, target, patch_edit(model, c, source))
        gap = lp_clean - lp_corr
        out.append({"component": c, "logprob_clean": lp_clean, "logprob_corrupted": lp_corr,
                    "logprob_patched": lp, "restored": (lp - lp_corr) / gap if abs(gap) > 1e-6 else 0.0})
    return out


# ------------------------------------------------------------------------------------------ detectors


@torch.no_grad()
def head_scores(model: Transformer, *, half: int | None = None, n_seqs: int = 16, seed: int = 0,
                vocab: Sequence[int] | None = None) -> dict[str, list[list[float]]]:
    """Previous-token and induction scores per (layer, head) of the explained stack's self-attention, on
    sequences [r, r] of `half` uniformly random tokens repeated once (Olsson et al. 2022, sec. "Induction
    heads"): previous-token = mean attention from position q to q-1; induction = mean attention, over the
    second copy, from q to q - half + 1 (the token after the previous occurrence of q's token)."""
    cfg = model.config
    half = half or min(32, cfg.context_length // 2)
    if 2 * half > cfg.context_length:
        raise GlassmindError(f"detector sequences of 2 x {half} tokens exceed the context {cfg.context_length}")
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor(list(vocab)) if vocab is not None else torch.arange(cfg.vocab_size)
    r = pool[torch.randint(0, len(pool), (n_seqs, half), generator=g)]
    ids = torch.cat([r, r], 1)                                                        # (N, 2*half)
    pre = explained_prefix(model)
    src = r if cfg.arch == "encoder-decoder" else None
    names = lambda n: n.startswith(f"{pre}blocks.") and n.endswith(".attn.hook_pattern")  # noqa: E731
    if cfg.arch == "encoder-decoder":
        _, cache = run_with_cache(model, src, ids, names=names)
    else:
        _, cache = run_with_cache(model, ids, names=names)
    prev, ind = [], []
    q = torch.arange(1, 2 * half)
    qi = torch.arange(half, 2 * half)
    for i in range(len(explained_stack(model).blocks)):
        p = cache[f"{pre}blocks.{i}.attn.hook_pattern"]                               # (N, H, T, T)
        prev.append(p[:, :, q, q - 1].mean((0, 2)).tolist())
        ind.append(p[:, :, qi, qi - half + 1].mean((0, 2)).tolist())
    return {"previous_token": prev, "induction": ind, "half": half, "n_seqs": n_seqs}


def best_head(scores: list[list[float]]) -> tuple[int, int, float]:
    flat = [(v, l, h) for l, row in enumerate(scores) for h, v in enumerate(row)]
    v, l, h = max(flat)
    return l, h, v
