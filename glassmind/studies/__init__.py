"""`glassmind study NAME [flags]`: experiments that sweep recipes and write `runs/<study>/` (a CSV of every
point, PNGs, card.md with the numbers and what they do or do not show, and the command that made it).

One table maps each study to its module's `main(argv)`; modules are imported only when their study runs.
"""

from __future__ import annotations

import importlib
import sys

# study -> (module, one-line summary)
STUDIES: dict[str, tuple[str, str]] = {
    "scaling": ("glassmind.studies.scaling", "FLOP-matched grid; Chinchilla approaches 1-3 and Kaplan fits; "
                                             "a pre-registered prediction (--fit points.csv: fit your own)"),
    "architectures": ("glassmind.studies.architectures", "RNN/LSTM/GRU vs Transformers: throughput, per-position "
                                                         "loss, gradient reach (vanishing gradients)"),
    "alignment": ("glassmind.studies.alignment", "SFT -> reward model -> PPO/DPO; with --study: PPO seeds, KL 0, the "
                                                 "verifier as the reward (does RLHF beat SFT by more than the spread?)"),
    "induction": ("glassmind.studies.induction", "a model trained on in-context copying grows induction heads: found, "
                                                 "ablated, watched forming across log-spaced checkpoints"),
}


def usage() -> str:
    width = max(len(s) for s in STUDIES)
    lines = ["usage: glassmind study <name> [options]   (glassmind study <name> --help)", "", "studies:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in STUDIES.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in STUDIES:
        print(f"glassmind study: unknown study {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return int(importlib.import_module(STUDIES[name][0]).main(rest) or 0)
