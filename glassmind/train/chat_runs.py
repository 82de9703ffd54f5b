"""What the alignment recipes share about chat runs (runs `glassmind sft` wrote): load one, generate replies
through the inference engine, score replies with the built-in tasks' verifier, write a run's loadable files.

    model, tok, fmt = load_chat_run("runs/sft")            # a decoder with the chat tokens
    replies = generate(model, prompts, fmt.end_id, max_new_tokens=16)
    result = evaluate_tasks(model, fmt, heldout)           # {"accuracy", "per_task", "samples"}
    log.log({"step": s, **accuracy_row(result)})

Every accuracy here is exact match from the verifier, never a reward model's opinion.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from torch import nn

from glassmind.common import GlassmindError
from glassmind.data import tasks as task_lib
from glassmind.model import save_model
from glassmind.tokenizer.chat import ChatFormat


def require_dir(path: str, flag: str) -> Path:
    if not path:
        raise GlassmindError(f"{flag} RUN is required: the run directory this stage starts from")
    p = Path(path)
    if not (p / "config.json").exists():
        raise GlassmindError(f"{flag} {path}: no config.json there; give a run directory written by glassmind")
    return p


def load_chat_run(run: str | os.PathLike, flag: str = "--policy"):
    """(model, tokenizer, ChatFormat) of an instruction-tuned run (one `glassmind sft` wrote)."""
    from glassmind import tokenizer as tok_lib
    from glassmind.model import load_model

    run = require_dir(str(run), flag)
    tok = tok_lib.load(run)
    fmt = ChatFormat(tok)
    model = load_model(run)
    if model.config.arch != "decoder":
        raise GlassmindError(f"{run} holds a {model.config.arch}: alignment stages take a decoder")
    if tok.vocab_size > model.config.vocab_size:
        raise GlassmindError(f"{run}: the tokenizer has {tok.vocab_size} tokens but the model "
                             f"{model.config.vocab_size}: they are not from the same run")
    return model, tok, fmt


def generate(model: nn.Module, prompts: Sequence[Sequence[int]], eos_id: int, *, max_new_tokens: int,
             temperature: float = 0.0, seed: int | None = None, batch_size: int = 256) -> list[list[int]]:
    """Replies from the inference engine: new ids, the <|end|> included when the model wrote it.
    temperature 0 is greedy; otherwise pure sampling (no top-k/top-p: RL needs the policy's own
    distribution); sequence i of the call uses seed + i, so a seeded call repeats exactly."""
    from glassmind.infer import Engine, SamplingParams

    engine = Engine(model)
    context = model.config.context_length
    keep = context - max(1, min(max_new_tokens, context // 4))  # leave room for a reply
    too_long = sum(len(p) > keep for p in prompts)
    if too_long:  # keep the end of the prompt (the question and the assistant tag); the reply is scored as usual
        print(f"warning: {too_long} of {len(prompts)} prompts exceed the context ({context}) and keep only "
              f"their last {keep} tokens", flush=True)
        prompts = [list(p)[-keep:] for p in prompts]
    room = context - max(len(p) for p in prompts)
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [list(p) for p in prompts[start:start + batch_size]]
        params = SamplingParams(strategy="greedy" if temperature == 0 else "sample", temperature=temperature or 1.0,
                                max_new_tokens=min(max_new_tokens, room), eos_token_ids=(eos_id,), top_logprobs=0,
                                seed=None if seed is None else seed + start)
        out += [list(r.ids) for r in engine.generate(chunk, params)]
    return out


def evaluate_tasks(model: nn.Module, fmt: ChatFormat, examples: Sequence[task_lib.Example], *,
                   max_new_tokens: int = 16) -> dict:
    """Held-out exact-match accuracy, per task and overall, from the verifier (greedy replies)."""
    prompts = [fmt.render_prompt(e.messages()[:1]) for e in examples]
    replies = [fmt.parse_reply(r) for r in generate(model, prompts, fmt.end_id, max_new_tokens=max_new_tokens)]
    return score_replies(examples, replies)


def score_replies(examples: Sequence[task_lib.Example], replies: Sequence[str]) -> dict:
    ok = [task_lib.verify(e, r) for e, r in zip(examples, replies)]
    per_task: dict[str, list[bool]] = {}
    for e, good in zip(examples, ok):
        per_task.setdefault(e.task, []).append(good)
    return {"accuracy": sum(ok) / max(len(ok), 1),
            "per_task": {t: sum(v) / len(v) for t, v in per_task.items()},
            "samples": [{"prompt": e.prompt, "reply": r, "answer": e.answer, "ok": g}
                        for e, r, g in zip(examples, replies, ok)]}


def accuracy_row(result: dict) -> dict:
    """A metrics row's accuracy fields: heldout_acc and acc_<task>."""
    return {"heldout_acc": result["accuracy"], **{f"acc_{t}": a for t, a in result["per_task"].items()}}


def save_outputs(out: Path, model: nn.Module, tok) -> None:
    """The run directory's loadable files: config.json, model.safetensors, tokenizer.json."""
    save_model(model, out)
    tok.save(out)
