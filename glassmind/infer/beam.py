"""Beam search: keep the k best partial sequences (by summed log-probability) instead of the single best.

Greedy decoding commits to the most likely next token; a token that looks worse now can lead to a better
sequence (a higher product of probabilities) later. Beam search keeps k hypotheses per prompt, extends each
by every token, and keeps the k best of the k x V continuations (Graves 2012; Sutskever et al. 2014).

The bookkeeping follows transformers v5's `GenerationMixin._beam_search` exactly, so that
`generate(num_beams=k, do_sample=False)` and ours pick the same hypotheses:

- each step takes the top 2k continuations (max(2, 1 + number of EOS ids) x k) of all beams' summed
  log-probabilities; those that end (EOS, stop sequence, or the length limit) and rank in the first k become
  finished hypotheses; the best k that do not end become the next running beams;
- a finished hypothesis scores sum(logprob) / generated_len ** length_penalty, where generated_len counts
  the new tokens including the EOS and **excludes the prompt** (transformers v5: `cur_len + 1 -
  decoder_prompt_len`, checked against it in tests/test_engine.py with length_penalty 2 and -0.5; older
  v4 releases divided by the full length, prompt included, for decoder-only models);
- each prompt keeps its k best finished hypotheses; it is done when the best running beam, scored at the
  current length, cannot beat the worst of k finished ones (early_stopping=False, the default), as soon as k
  are finished (early_stopping=True), or at its length limit. Done prompts leave the batch.

Logits processors (the repetition penalty) act on the log-probabilities, as in transformers' beam search.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from glassmind.infer.sampling import SamplingParams, process, stop_length

_NEG = -1.0e9  # transformers' "impossible" score: finite, so sums and comparisons stay defined


@dataclass
class Hypothesis:
    ids: list[int]
    score: float                      # sum of (processed) logprobs / generated_len ** length_penalty
    logprobs: list[float]             # raw logprob of each token (before the repetition penalty)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str = "length"     # "stop" | "length" | "context"
    stop_len: int = 0


def beam_search(batch: Any, params: SamplingParams, prompts: list[list[int]], max_new: list[int],
                limit_reasons: list[str], vocab_size: int) -> tuple[list[list[Hypothesis]], list[list[float]]]:
    """Run beam search for every prompt of `batch` (an engine batch with prefill/step/select).

    Returns, per prompt, its finished hypotheses best first (num_beams of them), and the wall-clock times at
    which each of its steps ended (for latency metrics)."""
    k, N, lp = params.num_beams, params.top_logprobs, params.length_penalty
    eos = frozenset(params.eos_token_ids)
    stops = tuple(tuple(s) for s in params.stop_sequences)
    eos_t = torch.tensor(sorted(eos), dtype=torch.long)
    n_keep = max(2, 1 + len(eos)) * k
    G = len(prompts)
    alive = list(range(G))                     # original prompt index of each group still searching
    finished: list[list[Hypothesis]] = [[] for _ in range(G)]
    clock: list[list[float]] = [[] for _ in range(G)]
    unsatisfied = [True] * G

    logits = batch.prefill()                                                          # (G, V)
    device = logits.device
    eos_t = eos_t.to(device)
    first_rows = torch.arange(G, device=device).repeat_interleave(k)
    batch.select(first_rows)                   # each prompt's cache copied into its k beams
    logits = logits.index_select(0, first_rows)                                       # (G*k, V)
    scores = torch.zeros(G, k, device=device)
    scores[:, 1:] = _NEG                       # only beam 0 may expand at first, or all k would be equal
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(G, vocab_size, dtype=torch.bool, device=device)
        for g, p in enumerate(prompts):
            seen[g, p] = True
        seen = seen.index_select(0, first_rows)
    hist_tok = torch.zeros(G, k, 0, dtype=torch.long, device=device)                  # (G, k, t)
    hist_lp = torch.zeros(G, k, 0, device=device)
    hist_top_id = torch.zeros(G, k, 0, N, dtype=torch.long, device=device)            # (G, k, t, N)
    hist_top_lp = torch.zeros(G, k, 0, N, device=device)
    t = 0
    while True:
        Ga = len(alive)
        raw = logits.float().log_softmax(-1)                                          # (Ga*k, V)
        V = raw.shape[-1]
        acc = (process(raw, params, seen).view(Ga, k, V) + scores[..., None]).view(Ga, k * V)
        cand_scores, cand_idx = acc.topk(n_keep, dim=-1)                              # (Ga, 2k)
        cand_beam, cand_tok = cand_idx // V, cand_idx % V
        rows = torch.arange(Ga, device=device)[:, None] * k + cand_beam               # (Ga, 2k) flat rows

        def extend(hist: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
            idx = cand_beam.view(Ga, n_keep, *([1] * (hist.dim() - 2))).expand(-1, -1, *hist.shape[2:])
            return torch.cat([hist.gather(1, idx), new.unsqueeze(2)], dim=2)

        c_tok = extend(hist_tok, cand_tok)                                            # (Ga, 2k, t+1)
        c_lp = extend(hist_lp, raw[rows, cand_tok])
        if N:
            top_lp, top_id = raw.topk(N, dim=-1)                                      # (Ga*k, N)
            c_top_id, c_top_lp = extend(hist_top_id, top_id[rows]), extend(hist_top_lp, top_lp[rows])
        else:
            c_top_id, c_top_lp = hist_top_id, hist_top_lp

        hits = torch.isin(cand_tok, eos_t) if eos else torch.zeros_like(cand_tok, dtype=torch.bool)
        stop_lens = hits.long()
        if stops:
            tok_lists = c_tok.tolist()
            for g in range(Ga):
                for j in range(n_keep):
                    n = stop_length(tok_lists[g][j], eos, stops)
                    stop_lens[g, j] = n
            hits = stop_lens > 0
        at_limit = torch.tensor([t + 1 >= max_new[o] for o in alive], device=device)[:, None]
        ends = hits | at_limit                                                        # (Ga, 2k)

        # finished hypotheses: only those ranked in the first k may enter (transformers' top_num_beam_mask)
        norm = cand_scores / ((t + 1) ** lp)
        ends_l, hits_l, norm_l = ends[:, :k].tolist(), hits[:, :k].tolist(), norm[:, :k].tolist()
        for g, o in enumerate(alive):
            if not unsatisfied[o] or (params.early_stopping and len(finished[o]) == k):
                continue
            for j in range(k):
                if ends_l[g][j]:
                    finished[o].append(_hypothesis(g, j, norm_l[g][j], c_tok, c_lp, c_top_id, c_top_lp,
                                                   stop_lens, hits_l[g][j], limit_reasons[o]))
            finished[o].sort(key=lambda h: -h.score)  # stable: earlier entries win exact ties
            del finished[o][k:]

        # the next running beams: the best k continuations that did not end
        masked = cand_scores + ends.float() * _NEG
        nxt = masked.topk(k, dim=-1).indices                                          # (Ga, k)
        scores = masked.gather(1, nxt)
        next_rows = rows.gather(1, nxt)
        next_tok = cand_tok.gather(1, nxt)

        def keep(c: torch.Tensor) -> torch.Tensor:
            return c.gather(1, nxt.view(Ga, k, *([1] * (c.dim() - 2))).expand(-1, -1, *c.shape[2:]))

        hist_tok, hist_lp, hist_top_id, hist_top_lp = keep(c_tok), keep(c_lp), keep(c_top_id), keep(c_top_lp)
        t += 1

        # is a prompt done? (transformers' _check_early_stop_heuristic, early_stopping False or True)
        best = (scores[:, 0] / (t ** lp)).tolist()
        now = time.perf_counter()
        done = []
        for g, o in enumerate(alive):
            clock[o].append(now)
            full = len(finished[o]) == k
            if full and not best[g] > min(h.score for h in finished[o]):
                unsatisfied[o] = False
            done.append(not unsatisfied[o] or (params.early_stopping and full) or t >= max_new[o])
        if all(done):
            break
        if any(done):
            kept = [g for g in range(Ga) if not done[g]]
            kept_t = torch.tensor(kept, device=device)
            alive = [alive[g] for g in kept]
            next_rows, next_tok, scores = next_rows[kept_t], next_tok[kept_t], scores[kept_t]
            hist_tok, hist_lp = hist_tok[kept_t], hist_lp[kept_t]
            hist_top_id, hist_top_lp = hist_top_id[kept_t], hist_top_lp[kept_t]
        flat_rows = next_rows.reshape(-1)
        batch.select(flat_rows)                # reorder the caches to follow the surviving beams
        if seen is not None:
            seen = seen.index_select(0, flat_rows)
            seen.scatter_(1, next_tok.reshape(-1, 1), True)
        logits = batch.step(next_tok.reshape(-1))
    return finished, clock


def _hypothesis(g, j, score, c_tok, c_lp, c_top_id, c_top_lp, stop_lens, hit, limit_reason) -> Hypothesis:
    ids = c_tok[g, j].tolist()
    tops: list[list[tuple[int, float]]] = [[] for _ in ids]
    if c_top_id.shape[-1]:
        tops = [list(zip(i, lp)) for i, lp in zip(c_top_id[g, j].tolist(), c_top_lp[g, j].tolist())]
    return Hypothesis(ids=ids, score=score, logprobs=c_lp[g, j].tolist(), top_logprobs=tops,
                      finish_reason="stop" if hit else limit_reason,
                      stop_len=int(stop_lens[g, j]) if hit else 0)
