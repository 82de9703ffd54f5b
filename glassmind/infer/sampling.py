"""How the next token is chosen from the model's logits: the settings, their validation, and the logits
processors (repetition penalty, temperature, top-k, top-p, min-p) in the order transformers applies them.

Every processor works on a batch of rows (B, V) at once and returns a new tensor; a filtered-out token gets
-inf, so a softmax afterwards gives it probability exactly 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from glassmind.common import GlassmindError

STRATEGIES = ("greedy", "sample", "beam")


@dataclass
class SamplingParams:
    """Settings of one generate call (one request); every prompt of the call shares them.

    greedy ignores temperature, top_k, top_p and min_p (they cannot change the argmax); beam search uses
    only repetition_penalty, length_penalty, early_stopping, num_beams and num_return_sequences, as
    transformers' `generate(num_beams=k, do_sample=False)` does. temperature 0 with strategy "sample"
    means greedy (the convention of the OpenAI API and vLLM).
    """

    strategy: str = field(default="greedy", metadata={"help": "greedy | sample | beam",
                                                      "choices": STRATEGIES})
    max_new_tokens: int = field(default=64, metadata={"help": "generate at most this many tokens"})
    temperature: float = field(default=1.0, metadata={"help": "divide logits by this (sample); 0 = greedy"})
    top_k: int = field(default=0, metadata={"help": "keep the k most likely tokens (0 = off)"})
    top_p: float = field(default=1.0, metadata={"help": "keep the smallest set of tokens whose mass reaches "
                                                        "p (nucleus; 1 = off)"})
    min_p: float = field(default=0.0, metadata={"help": "drop tokens less likely than min_p x the most "
                                                        "likely one (0 = off)"})
    repetition_penalty: float = field(default=1.0, metadata={"help": "> 1 discourages tokens already in "
                                                                     "the prompt or output (1 = off)"})
    num_beams: int = field(default=4, metadata={"help": "beam width (beam)"})
    length_penalty: float = field(default=1.0, metadata={"help": "beam score = sum logprob / "
                                                                 "generated_len ** length_penalty"})
    early_stopping: bool = field(default=False, metadata={"help": "beam: stop a prompt as soon as "
                                                                  "num_beams hypotheses are finished"})
    num_return_sequences: int = field(default=1, metadata={"help": "beam: how many best hypotheses to "
                                                                   "return"})
    seed: int | None = field(default=None, metadata={"help": "seed for sampling (sequence i uses seed+i)"})
    eos_token_ids: tuple[int, ...] = ()       # a sequence stops after emitting any of these
    stop_sequences: tuple[tuple[int, ...], ...] = ()  # ... or after emitting any of these id sequences
    top_logprobs: int = field(default=0, metadata={"help": "report this many most likely alternatives per "
                                                           "token, with their logprobs"})

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise GlassmindError for any bad setting (before any work is done)."""
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise GlassmindError(msg)

        need(self.strategy in STRATEGIES, f"strategy {self.strategy!r} must be one of {', '.join(STRATEGIES)}")
        need(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
             f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        need(self.temperature >= 0, f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        need(isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be an integer >= 0 (0 = off), "
                                                              f"got {self.top_k!r}")
        need(0 < self.top_p <= 1, f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        need(0 <= self.min_p <= 1, f"min_p must be in [0, 1] (0 = off), got {self.min_p}")
        need(self.repetition_penalty > 0, f"repetition_penalty must be > 0 (1 = off), got "
                                          f"{self.repetition_penalty}")
        need(isinstance(self.num_beams, int) and self.num_beams >= 1,
             f"beam width (num_beams) must be an integer >= 1, got {self.num_beams!r}")
        need(isinstance(self.num_return_sequences, int) and self.num_return_sequences >= 1,
             f"num_return_sequences must be >= 1, got {self.num_return_sequences!r}")
        need(self.strategy == "beam" or self.num_return_sequences == 1,
             "num_return_sequences > 1 needs strategy='beam' (for several samples, repeat the prompt)")
        need(self.strategy != "beam" or self.num_return_sequences <= self.num_beams,
             f"num_return_sequences ({self.num_return_sequences}) cannot exceed num_beams ({self.num_beams})")
        need(isinstance(self.top_logprobs, int) and self.top_logprobs >= 0,
             f"top_logprobs must be an integer >= 0, got {self.top_logprobs!r}")
        need(self.seed is None or isinstance(self.seed, int), f"seed must be an integer, got {self.seed!r}")
        for s in self.stop_sequences:
            need(len(s) >= 1, "a stop sequence must hold at least one token id")
        if vocab_size is not None:
            need(self.top_logprobs <= vocab_size, f"top_logprobs {self.top_logprobs} exceeds the vocabulary "
                                                  f"({vocab_size})")
            need(self.strategy != "beam" or self.num_beams <= vocab_size,
                 f"num_beams {self.num_beams} exceeds the vocabulary ({vocab_size})")
            ids = list(self.eos_token_ids) + [t for s in self.stop_sequences for t in s]
            bad = [t for t in ids if not (isinstance(t, int) and 0 <= t < vocab_size)]
            need(not bad, f"stop/EOS token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")

    @property
    def is_greedy(self) -> bool:
        return self.strategy == "greedy" or (self.strategy == "sample" and self.temperature == 0)


# ----------------------------------------------------------------------------------------------------
# processors: (B, V) float logits in, (B, V) out


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019, eq. 3): for tokens already seen, divide a positive logit by the
    penalty and multiply a negative one by it, so both become less likely. `seen` (B, V) bool.

    transformers applies the same rule to every id in the prompt and output; we do too, except padding."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(z / T): T < 1 sharpens the distribution, T > 1 flattens it."""
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the k largest logits per row (Fan et al. 2018). Ties at the boundary are broken by
    torch.topk's order, so exactly k survive (transformers' threshold compare keeps every tied token)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    idx = logits.topk(k, dim=-1).indices                                             # (B, k)
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, idx, True)
    return logits.masked_fill(~keep, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2020, eq. 3): keep the smallest set of most likely tokens whose
    probability mass reaches p; always at least the most likely token.

    A token (in descending order) is kept iff the mass strictly before it is < p. The cumulative sum runs in
    float64 so that the boundary test is not decided by float32 rounding of a long sum."""
    if p >= 1.0:
        return logits
    probs, order = logits.double().softmax(-1).sort(dim=-1, descending=True)        # (B, V)
    mass_before = probs.cumsum(-1) - probs
    keep_sorted = mass_before < p
    keep_sorted[..., 0] = True
    keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    return logits.masked_fill(~keep, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Min-p (Nguyen et al. 2024, "Turning Up the Heat: Min-p Sampling"): keep tokens whose probability is
    at least min_p times the top token's. In log space: logit >= max_logit + log(min_p), which avoids the
    softmax."""
    if min_p <= 0.0:
        return logits
    threshold = logits.max(dim=-1, keepdim=True).values + math.log(min_p)
    return logits.masked_fill(logits < threshold, float("-inf"))


def process(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None) -> torch.Tensor:
    """All active processors in transformers' order: repetition penalty, then (sampling only) temperature,
    top-k, top-p, min-p. (B, V) float -> (B, V) float."""
    if params.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.is_greedy or params.strategy == "beam":
        return logits
    if params.temperature != 1.0:
        logits = apply_temperature(logits, params.temperature)
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    return min_p_filter(logits, params.min_p)


def draw(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling, one token per row from softmax(logits) (B, V), row r at its uniform u[r] (B,)
    float64 in [0, 1): the first token (in vocabulary order) whose cumulative probability exceeds u[r] x the
    row's total. One batched softmax, cumsum and searchsorted for the whole batch, so a row's token depends on
    its logits and its own uniform only, never on the other rows.

    The uniforms should have float32 resolution (at most 1 - 2**-24, as torch.rand in float32 gives): then
    u x total < total in float64, so the search always lands on a token of nonzero probability (a token
    filtered to -inf adds nothing to the cumulative sum, so the first sum past any point is never its)."""
    probs = logits.float().softmax(-1)                                                # (B, V)
    cdf = probs.cumsum(-1, dtype=torch.float64)                                       # (B, V)
    x = u.to(torch.float64)[:, None] * cdf[:, -1:]                                    # (B, 1)
    idx = torch.searchsorted(cdf, x, right=True)                                      # (B, 1)
    return idx[:, 0].clamp_(max=logits.shape[-1] - 1)


def uniforms(generator: torch.Generator, n: int) -> torch.Tensor:
    """A sequence's n uniforms for its n sampled tokens (n,) float64, drawn in float32 (see draw). torch.rand
    draws them one after another, so the first k of n are the first k of any longer draw: the tokens do not
    depend on how many were drawn ahead."""
    return torch.rand(n, generator=generator, device=generator.device).to(torch.float64)


def sample(logits: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row from softmax(logits), row i drawn with generators[i] (one uniform each, see draw): a
    sequence's sample depends on its own seed only, not on which other sequences share the batch.
    (B, V) -> (B,) long."""
    u = torch.cat([uniforms(g, 1) for g in generators]).to(logits.device)
    return draw(logits, u)


def make_generators(seed: int | None, n: int, device: torch.device) -> list[torch.Generator]:
    """Generator i seeded with seed + i; without a seed, from torch's global RNG (so seed_everything works)."""
    gens = []
    for i in range(n):
        g = torch.Generator(device=device)
        g.manual_seed(seed + i if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
        gens.append(g)
    return gens


def stop_length(history: list[int], eos: frozenset[int], stop_sequences: tuple[tuple[int, ...], ...]) -> int:
    """How many trailing ids of `history` (the generated ids, newest last) form a stop marker: 1 for an EOS
    id, len(s) for a stop sequence s, 0 if none ends here."""
    if history and history[-1] in eos:
        return 1
    for s in stop_sequences:
        if len(history) >= len(s) and tuple(history[-len(s):]) == s:
            return len(s)
    return 0
