"""`glassmind rank RUN`: a person ranks K sampled replies per prompt in the terminal; the rankings go to the
preference JSONL that `glassmind reward --data` (and `glassmind dpo --data`) read. Human feedback, for real.

For each prompt the run's model samples replies (seeded by the prompt's index, so a session started again
shows the same ones); distinct replies are numbered and the person types their order, best first:

    2 1 4 3       reply 2 is best, then 1, then 4, then 3
    2 1=4 3       1 and 4 are equally good (a tie)
    s             skip this prompt          q   stop (everything ranked so far is saved)

Each ranking is appended to the file and flushed to disk at once; started again with the same --out, the
tool skips the prompts already ranked there, so a killed session loses nothing. Input is read line by line
from standard input, so a session can be scripted: `glassmind rank RUN --out p.jsonl < answers.txt`.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from glassmind.common import GlassmindError, add_config_args, config_field, config_from_args, read_jsonl, run_main
from glassmind.data import tasks as task_lib
from glassmind.train.chat_runs import generate, load_chat_run
from glassmind.train.rollouts import read_prompts
from glassmind.train.run import setup_torch


@dataclass
class RankConfig:
    out: str = config_field("preferences.jsonl", "the preference JSONL to append to (resumed if it exists)")
    prompts: Optional[str] = config_field(None, "JSONL of {\"prompt\": text or messages} (default: built-in "
                                                "task prompts)")
    n: int = config_field(10, "prompts to rank (built-in prompts)")
    k: int = config_field(4, "distinct replies to show per prompt")
    tasks: list[str] = config_field(list(task_lib.TASKS), "built-in tasks whose prompts are shown")
    world_seed: int = config_field(0, "seed of the built-in fictional world")
    temperature: float = config_field(1.0, "sampling temperature of the replies")
    max_new_tokens: int = config_field(32, "longest reply")
    seed: int = config_field(0, "seed for the prompts and the replies")
    threads: Optional[int] = config_field(None, "CPU threads for torch")


def parse_ranking(text: str, k: int) -> list[int]:
    """"2 1=4 3" (an order of reply numbers 1..k, best first, '=' for ties, '>' or spaces between) -> ranks
    per reply, 1 = best: [2, 1, 3, 2]. Every reply must appear exactly once."""
    groups = [g for g in text.replace(">", " ").replace(",", " ").split() if g]
    ranks: dict[int, int] = {}
    for position, group in enumerate(groups, 1):
        for item in group.split("="):
            if not item.isdigit() or not 1 <= int(item) <= k:
                raise ValueError(f"{item!r} is not a reply number 1..{k}")
            if int(item) in ranks:
                raise ValueError(f"reply {item} appears twice")
            ranks[int(item)] = position
    missing = sorted(set(range(1, k + 1)) - set(ranks))
    if missing:
        raise ValueError(f"replies {missing} are not ranked: put every reply in the order")
    return [ranks[i] for i in range(1, k + 1)]


def distinct_replies(model, fmt, messages, k: int, cfg: RankConfig, index: int) -> list[str]:
    """Up to k distinct non-empty replies from 3k samples (seeded by the prompt's index)."""
    prompt = fmt.render_prompt(messages)
    ids = generate(model, [prompt] * (3 * k), fmt.end_id, max_new_tokens=cfg.max_new_tokens,
                   temperature=cfg.temperature, seed=(cfg.seed * 1_000_003 + index) * 1009)
    out: list[str] = []
    for r in ids:
        text = fmt.parse_reply(r).strip()
        if text and text not in out:
            out.append(text)
        if len(out) == k:
            break
    return out


def append_record(path: Path, record: dict) -> None:
    """One JSON line, flushed and fsynced: a kill right after loses nothing typed before it."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def rank_session(run: str, cfg: RankConfig, *, read: Callable[[], Optional[str]],
                 write: Callable[[str], None]) -> dict:
    """The interactive loop; `read` returns the next input line or None at end of input."""
    if cfg.k < 2:
        raise GlassmindError("--k must be >= 2: a ranking compares replies")
    setup_torch(cfg.threads)
    model, tok, fmt = load_chat_run(run, "RUN")
    if cfg.prompts:
        prompts = read_prompts(cfg.prompts)
    else:
        prompts = [e.messages()[:1] for e in task_lib.train_examples(cfg.n, cfg.seed, cfg.tasks, cfg.world_seed, "rl")]
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {json.dumps(r["prompt"], sort_keys=True) for r in read_jsonl(out)} if out.exists() else set()
    ranked = skipped = 0
    write(f"Ranking replies of {run} to {len(prompts)} prompts ({len(done)} already ranked in {out}).\n"
          "Type the reply numbers best first ('2 1=3 4': 1 and 3 tie), 's' to skip, 'q' to stop.\n")
    for index, messages in enumerate(prompts):
        key = json.dumps(messages, sort_keys=True)
        if key in done:
            continue
        replies = distinct_replies(model, fmt, messages, cfg.k, cfg, index)
        if len(replies) < 2:
            write(f"\n[{index + 1}/{len(prompts)}] fewer than 2 distinct replies; skipped\n")
            continue
        write(f"\n[{index + 1}/{len(prompts)}] {messages[-1]['content']}\n")
        for j, reply in enumerate(replies, 1):
            write(f"  {j}. {reply}\n")
        while True:
            write("ranking> ")
            line = read()
            if line is None or line.strip().lower() == "q":
                write("\n")
                return {"ranked": ranked, "skipped": skipped, "out": str(out), "stopped": True}
            if line.strip().lower() == "s":
                skipped += 1
                break
            try:
                ranks = parse_ranking(line, len(replies))
            except ValueError as e:
                write(f"  {e}; try again\n")
                continue
            append_record(out, {"prompt": messages, "responses": replies, "ranking": ranks})
            done.add(key)
            ranked += 1
            break
    write(f"\nDone: {ranked} ranked, {skipped} skipped this session; {len(done)} in {out}.\n"
          f"Train a reward model on them: glassmind reward --from {run} --data {out}\n")
    return {"ranked": ranked, "skipped": skipped, "out": str(out), "stopped": False}


def main(argv: list[str] | None = None) -> int:
    def body(argv):
        import argparse

        parser = argparse.ArgumentParser(prog="glassmind rank", description=__doc__.split("\n")[0],
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("run", help="an instruction-tuned run (glassmind sft) whose replies are ranked")
        add_config_args(parser, RankConfig)
        ns = parser.parse_args(argv)
        cfg = config_from_args(RankConfig, ns)

        def read() -> Optional[str]:
            line = sys.stdin.readline()
            return line if line else None

        rank_session(ns.run, cfg, read=read, write=lambda s: print(s, end="", flush=True))
        return 0

    return run_main(body, argv)


if __name__ == "__main__":
    sys.exit(main())
