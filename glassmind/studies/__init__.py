"""`glassmind study NAME [flags]`: experiments that sweep recipes and write `runs/<study>/` (a CSV of every
point, PNGs, card.md with the numbers and what they do or do not show, and the command that made it).

One table maps each study to its module's `main(argv)`; modules are imported only when their study runs.
"""

from __future__ import annotations

from glassmind.common import dispatch

# study -> (module, one-line summary)
STUDIES: dict[str, tuple[str, str]] = {
    "scaling": ("glassmind.studies.scaling", "FLOP-matched grid; Chinchilla approaches 1-3 and Kaplan fits; "
                                             "a pre-registered prediction (--fit points.csv: fit your own)"),
    "emergence": ("glassmind.studies.emergence", "a ladder of sizes on k-digit addition: exact match vs per-digit, "
                                                 "edit distance, log-likelihood, Brier (is the jump a mirage?)"),
    "architectures": ("glassmind.studies.architectures", "RNN/LSTM/GRU/seq2seq vs Transformers: throughput, per-position "
                                                         "loss, gradient reach, long-range recall"),
    "alignment": ("glassmind.studies.alignment", "SFT -> reward model -> PPO/DPO; with --study: PPO seeds, KL 0, the "
                                                 "verifier as the reward (does RLHF beat SFT by more than the spread?)"),
    "induction": ("glassmind.studies.induction", "a model trained on in-context copying grows induction heads: found, "
                                                 "ablated, watched forming across log-spaced checkpoints"),
}


def main(argv: list[str] | None = None) -> int:
    return dispatch(STUDIES, argv, prog="glassmind study", kind="study", kinds="studies")
