"""`glassmind generate RUN "prompt"`: text from a run's model, with any decoding strategy.

    glassmind generate runs/demo/base "def fibonacci(n):" --strategy sample --top-p 0.9 --seed 0 --stream
    glassmind generate runs/demo/base "import os" --strategy beam --beams 4 --stats

`--stats` adds the latency metrics (time to first token, inter-token latency, tokens/s, FLOPs) and each
token's probability with its top alternatives. `demo_stage` is the end of `glassmind demo`: generations
from the demo decoder under each strategy, with their metrics.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional  # Optional: common._flag_type does not parse `int | None`


from glassmind.common import GlassmindError, add_config_args, config_from_args, pick_device, resolve_dtype, run_main
from glassmind.infer.detok import Detokenizer
from glassmind.infer.engine import Engine, GenerationResult
from glassmind.infer.sampling import STRATEGIES, SamplingParams

STOP_TOKENS = ("<|endoftext|>", "<|end|>")  # a run's specials that end a generation


@dataclass
class GenerateConfig:
    strategy: str = field(default="greedy", metadata={"help": "greedy | sample | beam", "choices": STRATEGIES})
    max_new_tokens: int = field(default=64, metadata={"help": "generate at most this many tokens"})
    temperature: float = field(default=1.0, metadata={"help": "sample: divide logits by this; 0 = greedy"})
    top_k: int = field(default=0, metadata={"help": "sample: keep the k most likely tokens (0 = off)"})
    top_p: float = field(default=1.0, metadata={"help": "sample: nucleus mass (1 = off)"})
    min_p: float = field(default=0.0, metadata={"help": "sample: drop tokens below min_p x the top "
                                                        "probability (0 = off)"})
    repetition_penalty: float = field(default=1.0, metadata={"help": "> 1 discourages repeats (1 = off)"})
    beams: int = field(default=4, metadata={"help": "beam: width"})
    length_penalty: float = field(default=1.0, metadata={"help": "beam: score = logprob sum / len ** this"})
    num_return_sequences: int = field(default=1, metadata={"help": "beam: print this many best beams"})
    seed: Optional[int] = field(default=None, metadata={"help": "sample: seed for a reproducible sample"})
    stream: bool = field(default=False, metadata={"help": "print tokens as they are generated"})
    stats: bool = field(default=False, metadata={"help": "print latency metrics and per-token probabilities"})
    top_logprobs: int = field(default=3, metadata={"help": "with --stats: alternatives shown per token"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | mps"})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 where this machine computes it natively, "
                                                         "else fp32) | fp32 | bf16 | fp16"})
    compile: bool = field(default=False, metadata={"help": "compile the decode step (torch.compile): the first "
                                                           "generation takes longer, each token less"})


def sampling_params(cfg: Any, eos: tuple[int, ...]) -> SamplingParams:
    return SamplingParams(strategy=cfg.strategy, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                          top_k=cfg.top_k, top_p=cfg.top_p, min_p=cfg.min_p,
                          repetition_penalty=cfg.repetition_penalty, num_beams=getattr(cfg, "beams", 4),
                          length_penalty=getattr(cfg, "length_penalty", 1.0),
                          num_return_sequences=getattr(cfg, "num_return_sequences", 1), seed=cfg.seed,
                          eos_token_ids=eos, top_logprobs=getattr(cfg, "top_logprobs", 0))


def load_run(run: str | Path, *, device: str = "auto", dtype: str = "fp32"):
    """(model, tokenizer) of a run directory, the model on `device` in `dtype` (auto: see
    common.resolve_dtype), in eval mode."""
    from glassmind import tokenizer as tokenizers
    from glassmind.model import load_model

    run = Path(run)
    if not run.is_dir():
        raise GlassmindError(f"run directory {run} does not exist")
    tok = tokenizers.load(run)
    dev = pick_device(device)
    model = load_model(run, device=dev).to(resolve_dtype(dtype, dev)[0]).eval()
    if tok.vocab_size > model.config.vocab_size:
        raise GlassmindError(f"{run}: the tokenizer has {tok.vocab_size} tokens but the model only "
                             f"{model.config.vocab_size}; they are not from the same run")
    return model, tok


def stop_ids(tok) -> tuple[int, ...]:
    specials = getattr(tok, "special_tokens", {}) or {}
    return tuple(specials[s] for s in STOP_TOKENS if s in specials)


def encode_prompt(tok, text: str) -> list[int]:
    """Prompt text -> ids; special tokens written in the prompt are honoured. An empty prompt starts from
    `<|endoftext|>` (the document separator a base model has seen before every document)."""
    ids = tok.encode(text, allowed_special="all") if text else []
    if not ids:
        bos = (getattr(tok, "special_tokens", {}) or {}).get("<|endoftext|>")
        if bos is None:
            raise GlassmindError("the prompt is empty and the tokenizer has no <|endoftext|> to start from: "
                                 "give a prompt")
        ids = [bos]
    return ids


def piece(tok, i: int) -> str:
    """One token, printable: escapes for control characters, and raw bytes (\\xc3) for part of a character."""
    text = tok.decode([i])
    if "\ufffd" in text and callable(getattr(tok, "decode_bytes", None)):
        return repr(tok.decode_bytes([i]))[2:-1]
    return repr(text)[1:-1]


def format_stats(tok, r: GenerationResult) -> str:
    m = r.metrics
    ms = lambda s: "-" if s is None else f"{1000 * s:.2f} ms"  # noqa: E731
    lines = [f"finish: {r.finish_reason}   prompt {m.prompt_tokens} tokens, generated {m.new_tokens}",
             f"time to first token {ms(m.ttft_s)}   inter-token latency mean {ms(m.itl_mean_s)} "
             f"p50 {ms(m.itl_p50_s)} p95 {ms(m.itl_p95_s)}   {m.tokens_per_s:.1f} tokens/s",
             f"FLOPs: prefill {m.prefill_flops:.3g}, decode {m.decode_flops:.3g}"]
    if r.score is not None:
        lines.append(f"beam score {r.score:.4f} (sum logprob / generated_len ** length_penalty)")
    lines.append("")
    lines.append(f"{'#':>4}  {'token':<16} {'p':>7}   alternatives")
    for j, (t, lp) in enumerate(zip(r.ids, r.logprobs)):
        alts = r.top_logprobs[j] if j < len(r.top_logprobs) else []
        alt = "  ".join(f"{piece(tok, a)!s:.12} {math.exp(b):.3f}" for a, b in alts)
        lines.append(f"{j:>4}  {piece(tok, t)[:16]:<16} {math.exp(lp):7.4f}   {alt}")
    return "\n".join(lines)


def generate(argv: list[str] | None) -> int:
    ap = argparse.ArgumentParser(prog="glassmind generate", description=__doc__.split("\n")[0])
    ap.add_argument("run", help="run directory holding config.json, model.safetensors, tokenizer.json")
    ap.add_argument("prompt", help="prompt text ('-' reads standard input)")
    add_config_args(ap, GenerateConfig)
    args = ap.parse_args(argv)
    cfg = config_from_args(GenerateConfig, args)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    params = sampling_params(cfg, ())
    params.validate()  # bad flags fail before the model is loaded
    model, tok = load_run(args.run, device=cfg.device, dtype=cfg.dtype)
    params.eos_token_ids = stop_ids(tok)
    params.top_logprobs = cfg.top_logprobs if cfg.stats else 0
    engine = Engine(model, compile=cfg.compile)
    ids = encode_prompt(tok, prompt)
    if cfg.stream and cfg.strategy != "beam":
        detok = Detokenizer(tok)
        print(prompt, end="", flush=True)
        result = None
        for ev in engine.stream([ids], params):
            print(detok.push(ev.token), end="", flush=True)
            result = ev.result or result
        print(detok.flush())
        results = [result]
    else:
        results = engine.generate([ids], params)
        r = results[0]
        if r.beams and len(r.beams) > 1:
            for n, h in enumerate(r.beams):
                print(f"--- beam {n} (score {h.score:.4f})")
                print(prompt + tok.decode(h.ids[: len(h.ids) - h.stop_len]))
        else:
            print(prompt + tok.decode(r.content_ids))
    if cfg.stats:
        print()
        print(format_stats(tok, results[0]))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(generate, argv)


# ----------------------------------------------------------------------------------------------------
# the demo's last stage


if __name__ == "__main__":
    sys.exit(main())
