"""Wall time of training the tuned lens for the demo decoder, as `glassmind autopsy RUN --tuned-lens` does it.

The issue's target: "the tuned lens for the demo decoder trains in under 2 minutes on 2 cores". The model is
the real demo decoder (`glassmind demo` writes it to runs/demo/pretrain-decoder; or `glassmind pretrain` with
the flags of glassmind/demo.py DEMO_BUDGETS["small"]), the data the built-in corpus, the settings the
defaults of glassmind.autopsy.lens.train_tuned_lens (what the verb uses). Timed: everything
tuned_lens_for_run does when no lens is saved yet (tokenising the corpus, capturing the residuals,
training, the held-out KL table), not saving. Prints wall and process CPU time, the steps run, the held-out
KL to the final layer of the logit lens and the tuned lens per layer, the load average before and after
(the machine may be shared), the CPU and torch's capability.

    python benchmarks/bench_tuned_lens.py runs/demo/pretrain-decoder --threads 2
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from glassmind import tokenizer as tok_lib
from glassmind.autopsy.lens import layer_labels, train_tuned_lens
from glassmind.common import cpu_facts
from glassmind.model import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="the demo decoder's run directory (runs/demo/pretrain-decoder)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (the target names 2 cores)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model = load_model(a.run).eval()
    tok = tok_lib.load(a.run)
    load_before = os.getloadavg()
    t0, c0 = time.perf_counter(), time.process_time()
    _, stats = train_tuned_lens(model, tok, progress=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    load_after = os.getloadavg()
    print(f"CPU: {cpu_facts().model}; torch {torch.__version__}, capability "
          f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads")
    c = model.config
    print(f"model {a.run}: d_model {c.d_model}, {c.n_layers} layers, vocab {c.vocab_size}")
    print(f"tuned lens: {wall:.1f} s wall, {cpu:.1f} s CPU; {stats['steps']} steps "
          f"(of at most {stats.get('max_steps', stats['steps'])}), {stats['tokens']} tokens")
    print("held-out KL to the final layer (nats):")
    for label, kl, kt in zip(layer_labels(model), stats["kl_logit_lens"], stats["kl_tuned_lens"]):
        print(f"  {label:6s} logit lens {kl:.3f}   tuned lens {kt:.3f}")
    print(f"load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f}")


if __name__ == "__main__":
    main()
