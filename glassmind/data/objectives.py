"""The three self-supervised objectives, each a small function from a window of token ids to
(model inputs, targets). Targets hold -100 wherever no loss is taken (PyTorch's cross-entropy default).

- causal LM (decoder): predict token t+1 from tokens <= t.
- masked LM (encoder): BERT (Devlin et al. 2019, section 3.1): choose 15% of the tokens; of those, 80% become
  [MASK], 10% a random token, 10% stay; predict the chosen ones only. Optional whole-word masking.
- span corruption (encoder-decoder): T5 (Raffel et al. 2020, section 3.1.4): drop 15% of the tokens in
  spans of mean length 3, put one sentinel per span in the encoder input, and have the decoder write each
  sentinel followed by the tokens it replaced.

Randomness comes only from the `generator` passed in, so a batch's masks are a function of its seed: the
training loop seeds one generator per batch index, which makes masks identical after a resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the positions whose target is not IGNORE_INDEX.

    logits (..., V) are upcast to fp32 first: under bf16 autocast the log-softmax over a large vocab loses
    digits the loss curve needs.
    """
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX)


# ----------------------------------------------------------------------------------------------------
# the output projection and the loss in one pass (no full logits)

# logits per chunk (16 MiB in fp32): 512 rows at V = 8192, 80 at V = 50257. On the 2-core benchmark CPU the
# training step (benchmarks/bench_train_step.py) was flat within noise from 256 to 1024 rows on one thread;
# with two threads on a loaded machine fewer, larger chunks did better (fewer thread barriers).
LOSS_CHUNK_ELEMENTS = 2**22


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None, *, chunk_rows: int | None = None) -> torch.Tensor:
    """`cross_entropy(F.linear(hidden, weight, bias), targets)` without the (N, V) fp32 logits.

    hidden (..., C), weight (V, C), bias (V,) or None, targets (...) with IGNORE_INDEX where no loss is taken
    -> the mean over the other positions (NaN if there are none, as F.cross_entropy gives).

    Rows are processed `chunk_rows` at a time (default LOSS_CHUNK_ELEMENTS // V): the chunk's logits are
    computed in the compute dtype (the autocast dtype when autocast is on, as F.linear would; fp32 instead
    of fp16), upcast to fp32 for the log-softmax, and turned into the chunk's gradients right away:
    softmax - onehot, then its products with the weight (grad_h) and the hidden states (added to grad_w)
    (the chunked scheme of Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models", and
    of Liger-Kernel's fused linear cross-entropy). Backward only scales the stored gradients. Memory: one
    chunk's logits instead of (N, V) ones. Time: against the materialised path this skips the fp32 copy of
    the logits, the zero-filled (N, V) gradient of the NLL, log-softmax's backward (an in-place exp instead)
    and the cast of the logit gradient back to bf16 as separate passes over fresh memory.

    A weight tied to the token embedding gets this gradient added to the embedding's, as with F.linear.
    """
    C = hidden.size(-1)
    h, t = hidden.reshape(-1, C), targets.reshape(-1)
    chunk_rows = chunk_rows or max(1, LOSS_CHUNK_ELEMENTS // weight.size(0))
    device_type = h.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else h.dtype
    if dtype == torch.float16:
        # the gradients are formed in forward, before a loss scaler's factor reaches them: fp16's range would
        # flush small softmax entries to zero (and a (V, C) sum over many rows could overflow), so fp32
        dtype = torch.float32
    needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (h, weight, bias))
    with torch.autocast(device_type, enabled=False):  # every cast below is explicit
        if needs_grad:
            return _LinearCrossEntropy.apply(h, weight, bias, t, dtype, chunk_rows)
        return _linear_cross_entropy(h, weight, bias, t, dtype, chunk_rows, need_grads=False)[0]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, t, dtype, chunk_rows):
        loss, grads, n_valid = _linear_cross_entropy(h, weight, bias, t, dtype, chunk_rows, need_grads=True)
        ctx.save_for_backward(*grads, n_valid)                                      # grad_b may be None
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, grad_b, n_valid = ctx.saved_tensors
        scale = grad_loss / n_valid  # the mean's 1/n and the caller's factor (1/accum, a loss scaler) at once
        grad_b = grad_b * scale if grad_b is not None else None
        grad_h = (grad_h.float() * scale).to(grad_h.dtype) if grad_h.dtype != scale.dtype else grad_h * scale
        return grad_h, grad_w * scale, grad_b, None, None, None


def _linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, t: torch.Tensor,
                          dtype: torch.dtype, chunk_rows: int, *, need_grads: bool):
    """h (N, C), weight (V, C), t (N,) -> (mean loss (fp32 scalar), the gradients of the *summed* loss
    (grad_h (N, C), grad_w (V, C), grad_b (V,) or None), the count of kept targets).

    Buffers are allocated once and reused by every chunk: on a CPU a fresh (n, V) tensor per op costs page
    faults comparable to the op itself. Ignored rows are computed like the others, then zeroed."""
    N, C, V = h.size(0), h.size(1), weight.size(0)
    n, dev, lowp = max(1, min(chunk_rows, N)), h.device, dtype != torch.float32
    hc, wc = h.to(dtype), weight.to(dtype)                                          # (N, C), (V, C)
    bc = bias.to(dtype) if bias is not None else None
    keep = t != IGNORE_INDEX                                                        # (N,)
    safe_t, rows = torch.where(keep, t, 0), torch.arange(n, device=dev)
    z = torch.empty(n, V, dtype=torch.float32, device=dev)  # a chunk's fp32 logits -> log-probs -> gradient
    low = torch.empty(n, V, dtype=dtype, device=dev) if lowp else None  # the same in the compute dtype
    target_logp = torch.empty(N, dtype=torch.float32, device=dev)                   # (N,)
    if need_grads:
        grad_h = torch.empty(N, C, dtype=dtype, device=dev)                        # (N, C)
        grad_w = torch.zeros(V, C, dtype=torch.float32, device=dev)                # (V, C), summed in fp32
        # a CPU GEMM cannot add bf16 products into an fp32 output: each chunk's share is rounded to bf16
        # once (the materialised path rounds the whole sum once), upcast into a buffer, then added
        grad_w_low = torch.empty(V, C, dtype=dtype, device=dev) if lowp else None
        grad_w_up = torch.empty(V, C, dtype=torch.float32, device=dev) if lowp else None
        grad_b = torch.zeros(V, dtype=torch.float32, device=dev) if bias is not None else None
        hk = hc * keep[:, None].to(dtype)                                           # ignored rows: no grad_w
    for s in range(0, N, n):
        e = min(s + n, N)
        zc, r, tc = z[:e - s], rows[:e - s], safe_t[s:e]
        out = low[:e - s] if lowp else zc                                           # (n, V), compute dtype
        if bc is not None:
            torch.addmm(bc, hc[s:e], wc.t(), out=out)
        else:
            torch.mm(hc[s:e], wc.t(), out=out)
        if lowp:
            zc.copy_(out)                                                           # upcast this chunk only
        torch.log_softmax(zc, -1, out=zc)
        target_logp[s:e] = zc[r, tc]
        if not need_grads:
            continue
        zc.exp_()                                                                   # softmax
        zc[r, tc] -= 1.0                               # d(-log p_t)/d(logits) = softmax - onehot(t)
        if grad_b is not None:
            grad_b += keep[s:e].float() @ zc
        if lowp:
            out.copy_(zc)
        torch.mm(out, wc, out=grad_h[s:e])                                          # (n, C)
        if lowp:
            grad_w += grad_w_up.copy_(torch.mm(out.t(), hk[s:e], out=grad_w_low))  # (V, C)
        else:
            grad_w.addmm_(zc.t(), hk[s:e])
    n_valid = keep.sum()
    loss = -torch.where(keep, target_logp, 0.0).sum() / n_valid
    if not need_grads:
        return loss, (), n_valid
    grad_h = grad_h.to(h.dtype) * keep[:, None]
    grad_b = grad_b.to(bias.dtype) if grad_b is not None else None
    return loss, (grad_h, grad_w.to(weight.dtype), grad_b), n_valid


# ----------------------------------------------------------------------------------------------------
# causal language modelling


def causal_lm(window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """window (B, T+1) -> inputs (B, T) = window[:, :-1], targets (B, T) = window[:, 1:]."""
    return window[:, :-1], window[:, 1:]


# ----------------------------------------------------------------------------------------------------
# masked language modelling


def continuation_table(tokenizer) -> torch.Tensor:
    """(V,) bool: True for WordPiece pieces that continue a word (spelled `##...`). Whole-word masking
    treats a word start and its continuations as one unit."""
    table = torch.zeros(tokenizer.vocab_size, dtype=torch.bool)
    for i in range(tokenizer.vocab_size):
        token = tokenizer.id_to_token(i)
        table[i] = token is not None and token.startswith("##") and len(token) > 2
    return table


def mask_tokens(ids: torch.Tensor, *, mask_id: int, vocab_size: int, special_ids: Sequence[int] = (),
                mask_prob: float = 0.15, generator: torch.Generator | None = None,
                continuation: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking. ids (B, T) -> inputs (B, T), labels (B, T) (the original id where chosen, else -100).

    Each token is chosen independently with probability `mask_prob` (as Hugging Face's data collator does;
    BERT's script picks exactly round(0.15 T), the same in expectation). Special tokens are never chosen.
    Chosen tokens become [MASK] with probability 0.8, a uniformly random id with 0.1, and stay with 0.1,
    so the model cannot learn that only [MASK] positions matter.

    `continuation` ((V,) bool, see `continuation_table`) turns on whole-word masking: a word (a start piece
    and the `##` pieces after it) is chosen or not as a unit, with probability `mask_prob` per word; the
    80/10/10 replacement is still drawn per token, as in BERT's released whole-word-masking script.
    """
    B, T = ids.shape
    special = torch.zeros_like(ids, dtype=torch.bool)
    for s in special_ids:
        special |= ids == s
    u = torch.rand(B, T, generator=generator)
    if continuation is None:
        chosen = u < mask_prob
    else:
        is_start = ~continuation.to(ids.device)[ids] | special
        is_start[:, 0] = True  # a window may open mid-word: its first piece starts the unit
        pos = torch.arange(T).expand(B, T)
        word_start = torch.where(is_start, pos, torch.zeros_like(pos)).cummax(dim=1).values  # (B, T)
        chosen = torch.gather(u < mask_prob, 1, word_start)
    chosen &= ~special

    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
    v = torch.rand(B, T, generator=generator)
    random_ids = torch.randint(0, vocab_size, (B, T), generator=generator)
    inputs = torch.where(chosen & (v < 0.8), torch.full_like(ids, mask_id), ids)
    inputs = torch.where(chosen & (v >= 0.8) & (v < 0.9), random_ids, inputs)
    return inputs, labels


# ----------------------------------------------------------------------------------------------------
# span corruption


@dataclass(frozen=True)
class SpanLengths:
    """Sizes of one span-corrupted example: `raw` tokens in, `noise` of them dropped in `spans` spans;
    the encoder sees `encoder` = raw - noise + spans tokens, the decoder `decoder` = noise + spans + 1."""

    raw: int
    noise: int
    spans: int
    encoder: int
    decoder: int


def span_lengths(raw: int, noise_density: float = 0.15, mean_span: float = 3.0) -> SpanLengths:
    noise = min(max(int(round(raw * noise_density)), 1), raw - 1)
    spans = min(max(int(round(noise / mean_span)), 1), noise, raw - noise)
    return SpanLengths(raw, noise, spans, raw - noise + spans, noise + spans + 1)


def span_lengths_for_context(context: int, noise_density: float = 0.15, mean_span: float = 3.0) -> SpanLengths:
    """The longest raw window whose corrupted encoder input and decoder target both fit in `context`
    (T5's `random_spans_helper` does the same search, so packed inputs have no padding)."""
    best = None
    for raw in range(2, 4 * context):
        sl = span_lengths(raw, noise_density, mean_span)
        if sl.encoder <= context and sl.decoder <= context:
            best = sl
        elif sl.encoder > context:
            break
    if best is None:
        raise ValueError(f"context {context} is too short for span corruption")
    return best


def _segment(n: int, parts: int, generator: torch.Generator | None) -> torch.Tensor:
    """n items split into `parts` non-empty consecutive segments, uniformly at random: (parts,) lengths."""
    cuts = torch.randperm(n - 1, generator=generator)[: parts - 1].sort().values + 1
    edges = torch.cat([torch.tensor([0]), cuts, torch.tensor([n])])
    return edges.diff()


def noise_mask(sl: SpanLengths, generator: torch.Generator | None = None) -> torch.Tensor:
    """(raw,) bool, True on dropped tokens: `spans` noise spans interleaved with as many kept spans, kept
    first (T5's `random_spans_noise_mask`). Span lengths are random segmentations, mean noise/spans."""
    noise_lens = _segment(sl.noise, sl.spans, generator)
    keep_lens = _segment(sl.raw - sl.noise, sl.spans, generator)
    lens = torch.stack([keep_lens, noise_lens], dim=1).reshape(-1)  # keep, noise, keep, noise, ...
    ends = lens.cumsum(0)
    segment = torch.searchsorted(ends, torch.arange(sl.raw), right=True)  # which run each position is in
    return segment % 2 == 1  # odd runs are the noise


@dataclass
class SpanBatch:
    encoder_ids: torch.Tensor    # (B, S) kept tokens with one sentinel in place of each dropped span
    decoder_input: torch.Tensor  # (B, Td) start token, then decoder_target shifted right by one
    decoder_target: torch.Tensor  # (B, Td) sentinel_0 span_0 sentinel_1 span_1 ... end


def span_corrupt(window: torch.Tensor, *, sentinel_ids: Sequence[int], start_id: int, end_id: int,
                 noise_density: float = 0.15, mean_span: float = 3.0,
                 generator: torch.Generator | None = None) -> SpanBatch:
    """window (B, raw) -> SpanBatch. Example (T5 paper, Figure 2):
    "Thank you for inviting me to your party last week" -> encoder "Thank you <X> me to your party <Y> week",
    decoder target "<X> for inviting <Y> last <end>".
    """
    B, raw = window.shape
    sl = span_lengths(raw, noise_density, mean_span)
    if sl.spans > len(sentinel_ids):
        raise ValueError(f"{sl.spans} spans need as many sentinel tokens, the tokenizer has {len(sentinel_ids)}")
    sentinels = torch.tensor(list(sentinel_ids[: sl.spans]), dtype=window.dtype)
    enc, tgt = [], []
    for row in window:
        noise = noise_mask(sl, generator)  # (raw,)
        first = noise & torch.cat([torch.tensor([True]), ~noise[:-1]])  # first token of each noise span
        span_index = torch.cumsum(first, 0) - 1
        # encoder: kept tokens, and at each span's first position its sentinel; other noise positions vanish
        enc_row = torch.where(first, sentinels[span_index.clamp(min=0)], row)[~noise | first]
        # target: the mirror image: each span's sentinel, then the tokens it hides; kept tokens vanish.
        # Position p offers two slots, (its sentinel if p starts a span, its token if p is noise), read in order.
        slots = torch.stack([sentinels[span_index.clamp(min=0)], row], dim=1)       # (raw, 2)
        keep = torch.stack([first, noise], dim=1)                                   # (raw, 2)
        tgt_row = torch.cat([slots[keep], torch.tensor([end_id], dtype=window.dtype)])
        enc.append(enc_row)
        tgt.append(tgt_row)
    encoder_ids, decoder_target = torch.stack(enc), torch.stack(tgt)
    start = torch.full((B, 1), start_id, dtype=window.dtype)
    return SpanBatch(encoder_ids, torch.cat([start, decoder_target[:, :-1]], dim=1), decoder_target)


def reconstruct_spans(encoder_ids: Sequence[int], decoder_target: Sequence[int], sentinel_ids: Sequence[int],
                      end_id: int) -> list[int]:
    """Undo span corruption: put back, at each sentinel of the encoder input, the tokens that follow the
    same sentinel in the target. The round trip test: reconstruct(span_corrupt(x)) == x."""
    sentinel_set = set(int(s) for s in sentinel_ids)
    target = [int(x) for x in decoder_target]
    if target and target[-1] == end_id:  # only the last: the hidden text itself may hold the end token
        target = target[:-1]
    fills: dict[int, list[int]] = {}
    current = None
    for t in target:
        if t in sentinel_set:
            current = t
            fills[current] = []
        elif current is not None:
            fills[current].append(t)
    out: list[int] = []
    for t in (int(x) for x in encoder_ids):
        out.extend(fills.get(t, []) if t in sentinel_set else [t])
    return out
