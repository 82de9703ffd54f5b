"""`glassmind chat RUN`: talk to a run's model. The conversation is kept; replies stream; tokens/s shown.

Two formats:
- chat tokens: when the tokenizer has the chat tokens (an instruction-tuned run), the conversation is
  rendered by glassmind.tokenizer.chat.ChatFormat (`<|user|>text<|end|><|assistant|>`), and a reply ends at
  `<|end|>`. Typed text is encoded with no special tokens allowed, so typing "<|end|>" cannot forge a turn.
- a plain transcript otherwise (a base model): "User: ...\\nAssistant: ..." lines, and the reply ends where
  the model starts the next "User:" line (or at <|endoftext|>).

The conversation's KV cache is kept between turns (an engine Session): each turn prefills only what is
new since the cache was filled (the user's message and the assistant header, plus any reply tokens that
re-encode differently). When the transcript outgrows the context, the oldest turns are dropped and the
trimmed transcript is prefilled afresh (the loop says so).

Commands: /reset forgets the conversation, /quit (or end of input) leaves.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional  # see cli.py

from glassmind.common import GlassmindError, add_config_args, config_from_args, run_main
from glassmind.infer.generate import load_run, sampling_params, stop_ids
from glassmind.infer.detok import Detokenizer
from glassmind.infer.batch import Session
from glassmind.infer.engine import Engine
from glassmind.infer.sampling import STRATEGIES
from glassmind.tokenizer.chat import ChatFormat, has_chat_tokens

NEXT_TURN = "\nUser:"  # plain transcript: the model has finished its reply when it writes this


@dataclass
class ChatConfig:
    strategy: str = field(default="sample", metadata={"help": "greedy | sample | beam", "choices": STRATEGIES})
    max_new_tokens: int = field(default=200, metadata={"help": "longest reply in tokens"})
    temperature: float = field(default=0.7, metadata={"help": "sample: divide logits by this; 0 = greedy"})
    top_k: int = field(default=0, metadata={"help": "sample: keep the k most likely tokens (0 = off)"})
    top_p: float = field(default=0.9, metadata={"help": "sample: nucleus mass (1 = off)"})
    min_p: float = field(default=0.0, metadata={"help": "sample: min-p (0 = off)"})
    repetition_penalty: float = field(default=1.1, metadata={"help": "> 1 discourages repeats (1 = off)"})
    seed: Optional[int] = field(default=None, metadata={"help": "seed for reproducible replies"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | mps"})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 where this machine computes it natively, "
                                                         "else fp32) | fp32 | bf16 | fp16"})
    compile: bool = field(default=False, metadata={"help": "compile the decode step (torch.compile): a slow "
                                                           "first reply, faster tokens after"})


class Conversation:
    """The turns so far and their encoding as model input ending where the assistant's reply begins."""

    def __init__(self, tok, context_length: int, reserve: int):
        self.tok = tok
        self.turns: list[dict] = []  # {"role": "user" | "assistant", "content": text}
        self.format = ChatFormat(tok) if has_chat_tokens(tok) else None
        self.budget = context_length - reserve  # prompt tokens that leave room for a full reply
        self.trimmed = False                    # the last prompt_ids() dropped turns or cut a message
        if self.budget < 8:
            raise GlassmindError(f"the context ({context_length}) leaves no room for a conversation with "
                                 f"replies of {reserve} tokens: lower --max-new-tokens")

    @property
    def uses_chat_tokens(self) -> bool:
        return self.format is not None

    def _render(self, turns: list[dict]) -> list[int]:
        if self.format is not None:
            return self.format.render_prompt(turns)
        text = "".join(f"{'User' if t['role'] == 'user' else 'Assistant'}: {t['content']}\n" for t in turns)
        return self.tok.encode(text + "Assistant:")

    def prompt_ids(self) -> list[int]:
        """The transcript's ids, oldest turns dropped until it fits the budget; a single over-long message
        keeps its end."""
        start = 0
        ids = self._render(self.turns)
        while len(ids) > self.budget and start < len(self.turns) - 1:
            start += 1
            ids = self._render(self.turns[start:])
        self.trimmed = start > 0 or len(ids) > self.budget
        return ids[-self.budget:]

    def add(self, role: str, text: str) -> None:
        self.turns.append({"role": role, "content": text})


class _HoldBack:
    """Streams text but holds back any tail that could be the start of `stop`, and reports when `stop`
    appears (the text before it is the reply)."""

    def __init__(self, stop: str | None):
        self.stop, self.text, self.shown = stop, "", 0

    def feed(self, piece: str) -> tuple[str, bool]:
        self.text += piece
        if self.stop is None:
            out, self.shown = self.text[self.shown:], len(self.text)
            return out, False
        at = self.text.find(self.stop)
        if at >= 0:
            self.text = self.text[:at]
            out, self.shown = self.text[self.shown:], len(self.text)
            return out, True
        safe = len(self.text)
        for n in range(min(len(self.stop) - 1, len(self.text)), 0, -1):
            if self.stop.startswith(self.text[-n:]):
                safe = len(self.text) - n
                break
        out, self.shown = self.text[self.shown:safe], max(self.shown, safe)
        return out, False


def reply(engine: Engine, conv: Conversation, params, write: Callable[[str], None],
          session: Session | None = None) -> tuple[str, dict]:
    """Generate and stream the assistant's next reply; returns its text and the metrics. With a session,
    the conversation's KV cache is reused (only the new part of the transcript is prefilled)."""
    detok = Detokenizer(conv.tok)
    hold = _HoldBack(None if conv.uses_chat_tokens else NEXT_TURN)
    n, metrics, stopped = 0, None, False
    prompt = conv.prompt_ids()
    events = engine.stream([prompt], params, session=session)
    for ev in events:
        n += 1
        out, stopped = hold.feed(detok.push(ev.token))
        write(out)
        if ev.result is not None:
            metrics = ev.result.metrics
        if stopped:
            events.close()  # the generator's cleanup runs; no more tokens are computed
            break
    if not stopped:
        out, _ = hold.feed(detok.flush())
        write(out + hold.text[hold.shown:])
    text = hold.text.strip()
    prefilled = session.prefilled if session is not None and params.strategy != "beam" else len(prompt)
    return text, {"tokens": n, "metrics": metrics, "prompt": len(prompt), "prefilled": prefilled}


def chat_loop(engine: Engine, tok, cfg: ChatConfig, *, read: Callable[[str], str] = input,
              write: Callable[[str], None] = lambda s: print(s, end="", flush=True)) -> Conversation:
    import time

    params = sampling_params(cfg, stop_ids(tok))
    params.validate(engine.config.vocab_size)
    conv = Conversation(tok, engine.config.context_length, cfg.max_new_tokens)
    mode = "chat tokens" if conv.uses_chat_tokens else "plain User:/Assistant: transcript (base model)"
    write(f"glassmind chat: {mode}. /reset to forget, /quit to leave.\n")
    session = engine.session()
    while True:
        try:
            msg = read("you> ")
        except EOFError:
            write("\n")
            return conv
        if msg.strip() in ("/quit", "/exit"):
            return conv
        if msg.strip() == "/reset":
            conv.turns.clear()
            session.reset()
            write("(conversation forgotten)\n")
            continue
        if not msg.strip():
            continue
        conv.add("user", msg)
        write("assistant> ")
        t0 = time.perf_counter()
        text, info = reply(engine, conv, params, write, session)
        dt = time.perf_counter() - t0
        conv.add("assistant", text)
        m = info["metrics"]
        ttft = f", first token {1000 * m.ttft_s:.0f} ms" if m is not None else ""
        write(f"\n  [{info['tokens']} tokens, {info['tokens'] / dt:.1f} tokens/s{ttft}, prefilled "
              f"{info['prefilled']} of {info['prompt']} prompt tokens]\n")
        if conv.trimmed:
            write("  (context full: the oldest turns were dropped and the trimmed transcript read afresh)\n")


def chat(argv: list[str] | None) -> int:
    ap = argparse.ArgumentParser(prog="glassmind chat", description=__doc__.split("\n")[0])
    ap.add_argument("run", help="run directory holding config.json, model.safetensors, tokenizer.json")
    add_config_args(ap, ChatConfig)
    args = ap.parse_args(argv)
    cfg = config_from_args(ChatConfig, args)
    sampling_params(cfg, ()).validate()
    model, tok = load_run(args.run, device=cfg.device, dtype=cfg.dtype)
    if model.config.arch != "decoder":
        raise GlassmindError(f"chat needs a decoder run; {args.run} holds a {model.config.arch}")
    chat_loop(Engine(model, compile=cfg.compile), tok, cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(chat, argv)


if __name__ == "__main__":
    sys.exit(main())
