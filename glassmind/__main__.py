"""`glassmind <verb> [args]`: one table maps each verb to the module whose `main(argv)` runs it.

Modules are imported only when their verb is called, so `glassmind --help` is instant and a verb's
heavy dependencies (transformers) are needed only by the verbs that use them.
"""

from __future__ import annotations

import sys

from glassmind.common import dispatch

# verb -> (module, one-line summary). Keep in the order of a model's life.
VERBS: dict[str, tuple[str, str]] = {
    "demo": ("glassmind.demo", "run every lifecycle stage on built-in data into runs/demo/"),
    "tokenizer": ("glassmind.tokenizer.cli", "train a BPE or WordPiece tokenizer; encode text with one"),
    "convert": ("glassmind.model.convert", "move weights between a run directory and a Hugging Face model directory"),
    "pretrain": ("glassmind.recipes.pretrain", "pre-train a decoder, encoder or encoder-decoder; resumes exactly"),
    "plan": ("glassmind.parallel.plan", "memory and communication per device of each parallel layout"),
    "generate": ("glassmind.infer.generate", "generate text from a run (greedy, beam, sampling; --stream, --stats)"),
    "chat": ("glassmind.infer.chat", "talk to a run's model: keeps the conversation, streams replies"),
    "autopsy": ("glassmind.autopsy.report", "explain one forward pass: lenses, attention, attribution, ablation, "
                                            "narrated; HTML report"),
    "sft": ("glassmind.recipes.sft", "instruction-tune a run (chat format, loss on assistant tokens only)"),
    "rank": ("glassmind.recipes.rank", "rank a run's sampled replies in the terminal -> preference JSONL"),
    "reward": ("glassmind.recipes.reward", "train a reward model on ranked replies (Bradley-Terry)"),
    "ppo": ("glassmind.recipes.ppo", "RLHF with PPO against a reward model, KL penalty to the SFT run"),
    "dpo": ("glassmind.recipes.dpo", "direct preference optimisation of an SFT run"),
    "grpo": ("glassmind.recipes.grpo", "group-relative policy optimisation (reward model or verifier)"),
    "serve": ("glassmind.serve.cli", "serve runs: OpenAI-compatible API, continuous batching, a web page"),
    "eval": ("glassmind.evals.cli", "measure a run's limits: calibration, hallucination, bias, position, reversal, arithmetic"),
    "report": ("glassmind.evals.report", "write a run's report card: RUN/report/index.html (lineage, plots, evals, autopsies)"),
    "study": ("glassmind.studies", "experiments over many runs: scaling, architectures, alignment, induction -> runs/<study>/"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-V"], ["--version"]):
        from glassmind import __version__

        print(f"glassmind {__version__}")
        return 0
    return dispatch(VERBS, argv, prog="glassmind", kind="verb", kinds="verbs")


if __name__ == "__main__":
    sys.exit(main())
