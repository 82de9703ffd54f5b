"""The compiled decode step, a speed path beside the engine (engine.Engine(model, compile=True) picks it).

One decode step of a decoder runs as a torch.compile'd function of fixed shapes (CompiledStep) over a batch
whose rows keep their place and whose cache spans the whole context (CompiledDecoderBatch). The step calls
the model's own `next_token_logits`; it does not reach into the model's parts.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn as nn

from glassmind.common import GlassmindError, cpu_has_amx_bf16
from glassmind.infer.batch import DecoderBatch, Session
from glassmind.infer.kv_cache import StaticKVCache


class CompiledDecoderBatch(DecoderBatch):
    """A DecoderBatch whose decode steps run one compiled function of fixed shapes (see CompiledStep).

    The cache spans the whole context; a step writes at the tensor `slot` and attends over the slots
    written so far, under a 4-D mask that is False for padding. That key count is the one size that changes
    per step: it is marked dynamic, so one compilation serves every step (attending over all context slots
    instead would cost ~2x the attention at batch 8). The positions are tensors. Rows keep their place when
    their sequence finishes (a smaller batch would be a new shape, so a new compilation): finished rows are
    still computed, and only the live rows' logits are returned."""

    def __init__(self, model: nn.Module, prompts: list[list[int]], step_fn, *, session: Session | None = None):
        super().__init__(model, prompts, 0, slots=model.config.context_length, session=session)
        self.step_fn, self.first = step_fn, True
        self.mask[:, self.T:] = False        # slots after the prompt are unwritten until their step
        self.slot = torch.tensor([self.T], device=self.mask.device)                  # (1,) next slot
        self.pos = self.pos[:, None].contiguous()                                     # (B, 1)
        self.rows: torch.Tensor | None = None    # live rows (batch indices), None = all
        self.tokens = torch.zeros(len(prompts), 1, dtype=torch.long, device=self.mask.device)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.first:  # once per generate call: see CompiledStep.refresh
            self.step_fn.refresh()
            self.first = False
        if self.rows is None:
            self.tokens[:, 0] = tokens
        else:
            self.tokens.index_copy_(0, self.rows, tokens[:, None])
        self.mask.index_fill_(1, self.slot, True)
        mask = self.mask4[..., : self.cache.pos + 1]
        torch._dynamo.mark_dynamic(mask, 3)
        try:
            logits = self.step_fn(self.tokens, self.pos, self.slot, mask, self.cache.k, self.cache.v)
        except torch._dynamo.exc.TorchDynamoException as e:  # compilation runs on the first call
            raise GlassmindError(f"compiling the decode step failed ({type(e).__name__}); generate without "
                                 "compile=True / --compile (is a C++ compiler installed?)") from e
        self.pos += 1
        self.slot += 1
        self.cache.pos += 1
        if self.session is not None:
            self.session.ids.append(int(tokens[0]))
        return logits if self.rows is None else logits.index_select(0, self.rows)

    def select(self, index: torch.Tensor) -> None:
        self.rows = index if self.rows is None else self.rows.index_select(0, index)


def compile_options(model: nn.Module) -> dict[str, Any]:
    """inductor options for CompiledStep: freezing and the C++ wrapper always, the AMX-tuned extras only
    for a bf16 model on a CPU whose torch computes bf16 natively with AMX."""
    # bf16 only (measured per step, one thread, batch 1 / 8): concat_linear turns q, k, v into one product
    # (-10% / -10%: oneDNN's fixed cost per call dominates such small products) and max-autotune with
    # inductor's C++ GEMM template replaces oneDNN's calls with generated AMX kernels (a further -34% /
    # -31%), at ~30 s more compilation per batch size. In fp32 neither helps (concat: +15% at batch 8 with
    # MKL; autotune: +-2%), so fp32 keeps the shorter compile. Those bf16 numbers are AMX numbers: a CPU
    # whose torch has no native bf16 (AVX2; AMX hidden) keeps the plain compile too (cpu_has_amx_bf16).
    options: dict[str, Any] = {"freezing": True, "cpp_wrapper": True}
    weight = next(model.parameters())
    if weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and cpu_has_amx_bf16():
        options.update({"cpp.enable_concat_linear": True, "max_autotune": True,
                        "max_autotune_gemm_backends": "CPP,ATEN",
                        "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False})
    return options


_generations = itertools.count()  # weight snapshots of compiled steps, unique in the process


class CompiledStep:
    """One decode step of a decoder, compiled with torch.compile (inductor) from outside the model.

    (tokens (B, 1), positions (B, 1), slot (1,), mask (B, 1, 1, keys), k, v: per-layer cache buffers
    (B, H_kv, max_len, D)) -> next-token logits (B, V) float. The caller marks `keys` dynamic; every other
    shape is fixed, so it compiles once per batch size. `cpp_wrapper` calls the kernels from generated C++
    rather than Python, which removes most of the per-op overhead at batch 1 on CPU.

    `freezing` makes the weights constants of the compiled code, so that inductor packs every linear's
    weight once for the CPU GEMM (MKL in fp32, oneDNN/AMX in bf16): 1.3-1.5x faster steps at batch 8 and in
    bf16 (benchmarks/RESULTS.md). torch 2.13 freezes the parameters of a module that the compiled function
    closes over only while dynamo's `prepare_freezing` flag is on (without it they stay graph inputs and
    nothing is packed), hence the flag around every call (compilation happens inside a call).

    Constants go stale when the weights change, and dynamo reuses a compiled step function for any later
    one over the same model (its cache belongs to the code object). So the step also takes `generation`, an
    int that dynamo specialises on: refresh(), called once per generate call, compares the weights with the
    copy taken when they were frozen and, if any differs, moves to a new generation, i.e. a recompilation
    (seconds to a minute). A new CompiledStep starts a new generation too. Version counters cannot replace
    the comparison: a fused AdamW step changes the weights in place without bumping them."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.generation = next(_generations)
        self.frozen: list[torch.Tensor] | None = None   # the weights as the current generation froze them

        def step(tokens, positions, slot, mask, k, v, generation):
            # read `generation`, or dynamo would not guard on its value and a new one would not recompile
            assert generation >= 0
            cache = StaticKVCache(k, v, slot, mask.shape[-1])
            return model.next_token_logits(tokens, positions=positions, attention_mask=mask, cache=cache).float()

        options = compile_options(model)
        self.fn = torch.compile(step, fullgraph=True, dynamic=False, options=options)

    def refresh(self) -> None:
        """Start a new generation if the weights differ from those the current one froze (~1.3 ms per 10 MB)."""
        now = [*self.model.parameters(), *self.model.buffers()]
        if self.frozen is not None and len(now) == len(self.frozen) and all(
                _same_bits(p, f) for p, f in zip(now, self.frozen)):
            return
        if self.frozen is not None:
            self.generation = next(_generations)
        self.frozen = [p.detach().clone() for p in now]

    def __call__(self, tokens, positions, slot, mask, k, v) -> torch.Tensor:
        config = torch._dynamo.config  # set and restored by hand: config.patch() costs ~20 us per step
        if not hasattr(config, "prepare_freezing"):  # a torch without the flag: compile as it does by default
            return self.fn(tokens, positions, slot, mask, k, v, self.generation)
        before, config.prepare_freezing = config.prepare_freezing, True
        try:
            return self.fn(tokens, positions, slot, mask, k, v, self.generation)
        finally:
            config.prepare_freezing = before


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (a NaN equals itself). Compared as int64 words where the size allows: 4x faster
    than torch.equal on float tensors on this CPU (1 ms vs 4 ms for 8 MB)."""
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    if a.is_contiguous() and b.is_contiguous() and a.numel() * a.element_size() % 8 == 0:
        return torch.equal(a.reshape(-1).view(torch.int64), b.reshape(-1).view(torch.int64))
    return torch.equal(a, b)
