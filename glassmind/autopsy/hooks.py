"""Observe and edit a forward pass from outside the model: PyTorch hooks on the existing modules.

The model file keeps no autopsy code. Every name below is captured by a forward hook or pre-hook on a module
that `glassmind/model/transformer.py` already has (attention's q/k/v/out projections, the block, its norms, the
FFN's up and down maps, the stack). What a fused kernel never materialises (attention scores and weights, each
head's write into the residual stream) is recomputed from captured tensors, exactly as the model computes it:

    scores  = (q_rot @ k_rot^T) / sqrt(d_head), masked like the model masks   (Vaswani et al. 2017, eq. 1)
    pattern = softmax(scores)
    result_h = z_h @ W_O[:, h*D:(h+1)*D]^T   (out_proj's column block for head h; out_proj(z) = sum_h result_h + b_O)

Names follow TransformerLens (Nanda & Bloom 2022) so its users recognise them. One table, the whole list
(P = `blocks.{i}` for a decoder or encoder, `encoder.blocks.{i}` / `decoder.blocks.{i}` for an encoder-decoder;
S = `` for one stack, `encoder.` / `decoder.`; B batch, T positions, H heads, D head dim, C d_model, F d_ff):

| name                          | shape          | what it is                                                      | editable |
|-------------------------------|----------------|-----------------------------------------------------------------|----------|
| S hook_embed                  | (B, T, C)      | token embeddings (before scaling and positions)                 | no       |
| S hook_pos_embed              | (B, T, C)      | learned or sinusoidal position vectors added to the embeddings  | no       |
| S hook_rope_cos / _sin        | (B, 1, T, D)   | rotary angles' cos/sin (rope models)                            | no       |
| P.hook_resid_pre              | (B, T, C)      | residual stream entering the block                              | yes      |
| P.ln1.hook_normalized         | (B, T, C)      | self-attention norm output (pre-norm: attention input)          | no       |
| P.attn.hook_q / _k / _v       | (B, T, H|Hkv, D) | projections, before rotary                                    | no       |
| P.attn.hook_rot_q / _rot_k    | (B, T, H|Hkv, D) | after rotary (rope models)                                    | no       |
| P.attn.hook_attn_scores       | (B, H, Tq, Tk) | scaled, masked (-inf) scores                                    | no       |
| P.attn.hook_pattern           | (B, H, Tq, Tk) | attention weights                                               | no       |
| P.attn.hook_z                 | (B, T, H, D)   | each head's weighted values (out_proj's input)                  | yes      |
| P.attn.hook_result            | (B, T, H, C)   | each head's write into the residual stream (no bias)            | no       |
| P.hook_attn_out               | (B, T, C)      | attention sublayer output (sum of results + out_proj bias)      | yes      |
| P.hook_resid_mid              | (B, T, C)      | stream after the attention sublayer (post-norm: after its norm) | no       |
| P.cross_attn.*, P.hook_cross_attn_out, P.ln_cross.hook_normalized, P.hook_resid_mid_cross | | the same for cross-attention (Tk = source length) | z, out |
| P.ln2.hook_normalized         | (B, T, C)      | FFN norm output                                                 | no       |
| P.mlp.hook_pre                | (B, T, F)      | up projection, before the non-linearity                         | no       |
| P.mlp.hook_pre_gate           | (B, T, F)      | gate projection (SwiGLU/GeGLU)                                  | no       |
| P.mlp.hook_post               | (B, T, F)      | after the non-linearity (the down projection's input)           | yes      |
| P.hook_mlp_out                | (B, T, C)      | FFN output                                                      | yes      |
| P.hook_resid_post             | (B, T, C)      | residual stream leaving the block                               | yes      |
| S ln_final.hook_normalized    | (B, T, C)      | the stack's final norm output (pre-norm models)                 | no       |

Capture is opt-in per name (`names=`: a list, a predicate, or None for everything): a hook whose names are not
wanted stores nothing and recomputes nothing, so a long prompt on a large model holds only what was asked for.
Edits (`edits={name: fn(value) -> value}`) replace an editable activation in flight: ablation and patching are
built on them (glassmind/autopsy/causal.py).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn as nn

from glassmind.common import GlassmindError
from glassmind.model.transformer import Transformer, apply_rope

Edit = Callable[[torch.Tensor], torch.Tensor]
EDITABLE_SUFFIXES = ("hook_resid_pre", "attn.hook_z", "hook_attn_out", "cross_attn.hook_z",
                     "hook_cross_attn_out", "mlp.hook_post", "hook_mlp_out", "hook_resid_post")


class ActivationCache:
    """Activations of one forward pass, keyed by hook name (see the module docstring's table)."""

    def __init__(self, store: dict[str, torch.Tensor], model: Transformer):
        self._store = store
        self.model = model

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self._store[name]
        except KeyError:
            raise KeyError(f"{name!r} was not captured: pass it in names= (captured: "
                           f"{', '.join(sorted(self._store)[:8])}{' ...' if len(self._store) > 8 else ''})") from None

    def __contains__(self, name: str) -> bool:
        return name in self._store

    def __iter__(self) -> Iterator[str]:
        return iter(self._store)

    def __len__(self) -> int:
        return len(self._store)

    def keys(self):
        return self._store.keys()

    def items(self):
        return self._store.items()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._store.values())


def stack_prefixes(model: Transformer) -> list[tuple[str, nn.Module]]:
    """(name prefix, stack) in execution order: ('', stack) for one stack, encoder then decoder otherwise."""
    arch = model.config.arch
    if arch == "decoder":
        return [("", model.decoder)]
    if arch == "encoder":
        return [("", model.encoder)]
    return [("encoder.", model.encoder), ("decoder.", model.decoder)]


def all_names(model: Transformer) -> list[str]:
    """Every name this model can capture, in forward order."""
    cfg = model.config
    out: list[str] = []
    for s, stack in stack_prefixes(model):
        out.append(f"{s}hook_embed")
        if cfg.positional in ("learned", "sinusoidal"):
            out.append(f"{s}hook_pos_embed")
        if cfg.positional == "rope":
            out += [f"{s}hook_rope_cos", f"{s}hook_rope_sin"]
        for i, block in enumerate(stack.blocks):
            P = f"{s}blocks.{i}"
            out.append(f"{P}.hook_resid_pre")
            subs = [("attn", "ln1", "hook_attn_out", "hook_resid_mid")]
            if block.cross_attn is not None:
                subs.append(("cross_attn", "ln_cross", "hook_cross_attn_out", "hook_resid_mid_cross"))
            for a, ln, aout, mid in subs:
                out.append(f"{P}.{ln}.hook_normalized")
                out += [f"{P}.{a}.hook_{x}" for x in ("q", "k", "v")]
                if cfg.positional == "rope" and a == "attn":
                    out += [f"{P}.{a}.hook_rot_q", f"{P}.{a}.hook_rot_k"]
                out += [f"{P}.{a}.hook_{x}" for x in ("attn_scores", "pattern", "z", "result")]
                out += [f"{P}.{aout}", f"{P}.{mid}"]
            out.append(f"{P}.ln2.hook_normalized")
            out.append(f"{P}.mlp.hook_pre")
            if block.ffn.gate is not None:
                out.append(f"{P}.mlp.hook_pre_gate")
            out += [f"{P}.mlp.hook_post", f"{P}.hook_mlp_out", f"{P}.hook_resid_post"]
        if stack.final_norm is not None:
            out.append(f"{s}ln_final.hook_normalized")
    return out


def _name_filter(model: Transformer, names: Iterable[str] | Callable[[str], bool] | None) -> Callable[[str], bool]:
    if names is None:
        return lambda n: True
    if callable(names):
        return names
    wanted = set(names)
    unknown = sorted(wanted - set(all_names(model)))
    if unknown:
        raise GlassmindError(f"unknown hook names {unknown[:5]}: see glassmind.autopsy.hooks.all_names(model)")
    return wanted.__contains__


def _heads(x: torch.Tensor, n: int) -> torch.Tensor:
    B, T, _ = x.shape
    return x.view(B, T, n, -1)  # (B, T, n*D) -> (B, T, n, D): TransformerLens's layout


def attention_pattern(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, is_causal: bool
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """scores, weights (B, H, Tq, Tk) from q (B, H, Tq, D) and k (B, H, Tk, D), masked the way
    MultiHeadAttention masks (a boolean mask True = may attend; is_causal with no mask: the triangle)."""
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if mask is None and is_causal:
        Tq, Tk = scores.shape[-2:]
        mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores, scores.softmax(dim=-1)


class _Recorder:
    """Registers the hooks for one forward pass; `store` fills with the wanted names."""

    def __init__(self, model: Transformer, want: Callable[[str], bool], edits: dict[str, Edit]):
        self.model, self.want, self.edits = model, want, edits
        self.store: dict[str, torch.Tensor] = {}
        self.handles: list[Any] = []
        self.scratch: dict[int, dict[str, Any]] = {}

    def keep(self, name: str, value: torch.Tensor | Callable[[], torch.Tensor]) -> None:
        if self.want(name):
            self.store[name] = (value() if callable(value) else value).detach()

    def edit(self, name: str, value: torch.Tensor) -> torch.Tensor:
        fn = self.edits.get(name)
        if fn is None:
            return value
        new = fn(value)
        if new.shape != value.shape:
            raise GlassmindError(f"edit of {name} changed its shape {tuple(value.shape)} -> {tuple(new.shape)}")
        return new

    def any_of(self, *names: str) -> bool:
        return any(self.want(n) or n in self.edits for n in names)

    def add(self, handle: Any) -> None:
        self.handles.append(handle)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    # -- registration ---------------------------------------------------------------------------------
    def install(self) -> None:
        cfg = self.model.config
        for s, stack in stack_prefixes(self.model):
            self._stack(s, stack, cfg)
            for i, block in enumerate(stack.blocks):
                P = f"{s}blocks.{i}"
                self._block(P, block, cfg)
                self._attention(P, "attn", "ln1", "hook_attn_out", block.self_attn, block.self_attn_norm,
                                block, cfg)
                if block.cross_attn is not None:
                    self._attention(P, "cross_attn", "ln_cross", "hook_cross_attn_out", block.cross_attn,
                                    block.cross_attn_norm, block, cfg)
                self._ffn(P, block, cfg)
            if stack.final_norm is not None:
                self.add(stack.final_norm.register_forward_hook(
                    lambda m, a, out, s=s: self.keep(f"{s}ln_final.hook_normalized", out)))

    def _stack(self, s: str, stack: nn.Module, cfg) -> None:
        def pre(m, args, kwargs):
            x, positions = args[0], args[1]
            self.keep(f"{s}hook_embed", x)
            if cfg.positional == "sinusoidal":
                self.keep(f"{s}hook_pos_embed", lambda: m.sinusoid[positions].to(x.dtype))
            if cfg.positional == "rope" and self.any_of(f"{s}hook_rope_cos", f"{s}hook_rope_sin"):
                from glassmind.model.transformer import rope_cos_sin

                cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
                self.keep(f"{s}hook_rope_cos", cos)
                self.keep(f"{s}hook_rope_sin", sin)

        self.add(stack.register_forward_pre_hook(pre, with_kwargs=True))
        if cfg.positional == "learned":
            self.add(stack.position_embedding.register_forward_hook(
                lambda m, a, out: self.keep(f"{s}hook_pos_embed", out)))

    def _block(self, P: str, block: nn.Module, cfg) -> None:
        def pre(m, args, kwargs):
            x = self.edit(f"{P}.hook_resid_pre", args[0])
            self.keep(f"{P}.hook_resid_pre", x)
            self.scratch[id(m)] = {"resid": x}
            return (x, *args[1:]), kwargs

        def post(m, args, kwargs, out):
            out = self.edit(f"{P}.hook_resid_post", out)
            self.keep(f"{P}.hook_resid_post", out)
            return out

        self.add(block.register_forward_pre_hook(pre, with_kwargs=True))
        self.add(block.register_forward_hook(post, with_kwargs=True))

    def _attention(self, P: str, a: str, ln: str, out_name: str, attn: nn.Module, norm: nn.Module,
                   block: nn.Module, cfg) -> None:
        A = f"{P}.{a}"
        mid = "hook_resid_mid" if a == "attn" else "hook_resid_mid_cross"
        need_qk = lambda: self.any_of(f"{A}.hook_attn_scores", f"{A}.hook_pattern")  # noqa: E731
        sc: dict[str, Any] = {}

        def norm_hook(m, args, out):
            self.keep(f"{P}.{ln}.hook_normalized", out)
            if not block.pre:  # post-norm: this norm's output is the stream after the sublayer
                self.keep(f"{P}.{mid}", out)

        def attn_pre(m, args, kwargs):
            sc.clear()
            sc.update(kwargs)
            sc["x"] = args[0]

        def proj_hook(which: str, n: int):
            def hook(m, args, out):
                if self.want(f"{A}.hook_{which}") or (which in "qk" and need_qk()) or (
                        which == "q" and self.want(f"{A}.hook_rot_q")) or (
                        which == "k" and self.want(f"{A}.hook_rot_k")):
                    sc[which] = _heads(out, n)                                      # (B, T, n, D)
                    self.keep(f"{A}.hook_{which}", sc[which])
            return hook

        def out_pre(m, args):
            z = _heads(args[0], attn.n_heads)                                      # (B, T, H, D)
            z = self.edit(f"{A}.hook_z", z)
            self.keep(f"{A}.hook_z", z)
            if self.want(f"{A}.hook_result"):
                W = m.weight.view(m.weight.shape[0], attn.n_heads, attn.head_dim)  # (C, H, D)
                self.keep(f"{A}.hook_result", lambda: torch.einsum("bthd,chd->bthc", z, W))
            if "q" in sc and "k" in sc:
                q, k = sc["q"].transpose(1, 2), sc["k"].transpose(1, 2)          # (B, H|Hkv, T, D)
                rope = sc.get("rope")
                if rope is not None:
                    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
                    self.keep(f"{A}.hook_rot_q", q.transpose(1, 2))
                    self.keep(f"{A}.hook_rot_k", k.transpose(1, 2))
                if need_qk():
                    if attn.n_kv_heads != attn.n_heads:
                        k = k.repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=1)
                    scores, pattern = attention_pattern(q, k, sc.get("mask"), bool(sc.get("is_causal")))
                    self.keep(f"{A}.hook_attn_scores", scores)
                    self.keep(f"{A}.hook_pattern", pattern)
            return (z.reshape(args[0].shape),)

        def attn_post(m, args, kwargs, out):
            out = self.edit(f"{P}.{out_name}", out)
            self.keep(f"{P}.{out_name}", out)
            if block.pre and self.want(f"{P}.{mid}"):
                # pre-norm: x_mid = x + attn(norm(x)); the block's input for self-attention is the resid
                # entering the block, for cross-attention the self-attention's x_mid (kept below)
                resid = self.scratch[id(block)]["resid"]
                self.keep(f"{P}.{mid}", resid + out)
            if block.pre:
                self.scratch[id(block)]["resid"] = self.scratch[id(block)]["resid"] + out
            sc.clear()
            return out

        self.add(norm.register_forward_hook(norm_hook))
        self.add(attn.register_forward_pre_hook(attn_pre, with_kwargs=True))
        self.add(attn.q_proj.register_forward_hook(proj_hook("q", attn.n_heads)))
        self.add(attn.k_proj.register_forward_hook(proj_hook("k", attn.n_kv_heads)))
        self.add(attn.v_proj.register_forward_hook(proj_hook("v", attn.n_kv_heads)))
        self.add(attn.out_proj.register_forward_pre_hook(out_pre))
        self.add(attn.register_forward_hook(attn_post, with_kwargs=True))

    def _ffn(self, P: str, block: nn.Module, cfg) -> None:
        ffn = block.ffn
        self.add(block.ffn_norm.register_forward_hook(
            lambda m, a, out: self.keep(f"{P}.ln2.hook_normalized", out)))
        self.add(ffn.up.register_forward_hook(lambda m, a, out: self.keep(f"{P}.mlp.hook_pre", out)))
        if ffn.gate is not None:
            self.add(ffn.gate.register_forward_hook(lambda m, a, out: self.keep(f"{P}.mlp.hook_pre_gate", out)))

        def down_pre(m, args):
            h = self.edit(f"{P}.mlp.hook_post", args[0])
            self.keep(f"{P}.mlp.hook_post", h)
            return (h,)

        def ffn_post(m, args, out):
            out = self.edit(f"{P}.hook_mlp_out", out)
            self.keep(f"{P}.hook_mlp_out", out)
            return out

        self.add(ffn.down.register_forward_pre_hook(down_pre))
        self.add(ffn.register_forward_hook(ffn_post))


@contextmanager
def hooked(model: Transformer, names: Iterable[str] | Callable[[str], bool] | None = (),
           edits: dict[str, Edit] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, forward passes of `model` capture `names` into the yielded dict and apply `edits`.
    The hooks are removed on exit, even on error."""
    edits = dict(edits or {})
    known = set(all_names(model))
    for name in edits:
        if name not in known:
            raise GlassmindError(f"unknown hook name {name!r}: see glassmind.autopsy.hooks.all_names(model)")
        if not name.endswith(EDITABLE_SUFFIXES) or name.endswith("hook_result"):
            raise GlassmindError(f"{name} is observed, not edited (it is recomputed beside the fused kernel); "
                                 f"edit one of {', '.join(EDITABLE_SUFFIXES)}")
    rec = _Recorder(model, _name_filter(model, names), edits)
    rec.install()
    try:
        yield rec.store
    finally:
        rec.remove()


def forward(model: Transformer, ids: torch.Tensor, tgt_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The family's prediction logits: (B, T, V) for decoders and encoder-decoders (over tgt_ids), the
    head's output for an encoder."""
    arch = model.config.arch
    if arch == "encoder":
        out = model(ids)
        if model.config.head == "none":  # no MLM head (a sentence encoder): read hidden states against the
            return torch.nn.functional.linear(out.hidden, model.token_embedding.weight)  # token embeddings
        if model.config.head != "mlm":
            raise GlassmindError(f"this encoder's head is {model.config.head!r}: the autopsy explains a token "
                                 "prediction (head 'mlm', or 'none' read against the token embeddings)")
        return out.logits
    if arch == "encoder-decoder":
        if tgt_ids is None:
            raise GlassmindError("an encoder-decoder needs target ids (the decoder's prefix): pass tgt_ids")
        return model(ids, tgt_ids)
    return model(ids)


@torch.no_grad()
def run_with_cache(model: Transformer, ids: torch.Tensor, tgt_ids: torch.Tensor | None = None, *,
                   names: Iterable[str] | Callable[[str], bool] | None = None,
                   edits: dict[str, Edit] | None = None) -> tuple[torch.Tensor, ActivationCache]:
    """(logits, ActivationCache) of one forward pass; `names=None` captures every name."""
    with hooked(model, names, edits) as store:
        logits = forward(model, ids, tgt_ids)
    return logits, ActivationCache(store, model)


@torch.no_grad()
def run_with_edits(model: Transformer, ids: torch.Tensor, tgt_ids: torch.Tensor | None = None, *,
                   edits: dict[str, Edit]) -> torch.Tensor:
    with hooked(model, (), edits):
        return forward(model, ids, tgt_ids)
