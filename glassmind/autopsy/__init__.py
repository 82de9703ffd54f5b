"""The autopsy: look inside any glassmind model's forward pass from outside it (hooks), measure which parts
cause a prediction (lenses, attribution, ablation, patching), and narrate it in words.

    hooks.py     ActivationCache, run_with_cache, edits; the table of hook names
    lens.py      logit lens, tuned lens (trained per run, saved in the run directory)
    causal.py    direct logit attribution, zero/mean ablation, activation patching, head detectors
    narrate.py   the narrated account (templates filled with measured numbers)
    api.py       autopsy_json: one prediction explained, as JSON (the web server's seam)
    report.py    `glassmind autopsy RUN "prompt"`: HTML report, PNGs, JSON
"""

from glassmind.autopsy.hooks import ActivationCache, all_names, hooked, run_with_cache, run_with_edits
from glassmind.autopsy.api import autopsy_json

__all__ = ["ActivationCache", "all_names", "hooked", "run_with_cache", "run_with_edits", "autopsy_json"]
