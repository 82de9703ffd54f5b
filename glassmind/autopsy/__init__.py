"""The autopsy: look inside any glassmind model's forward pass from outside it (hooks), measure which parts
cause a prediction (lenses, attribution, ablation, patching), and narrate it in words.

    hooks.py        ActivationCache, run_with_cache, edits (the names table lives there)
"""

from glassmind.autopsy.hooks import ActivationCache, all_names, hooked, run_with_cache, run_with_edits

__all__ = ["ActivationCache", "all_names", "hooked", "run_with_cache", "run_with_edits"]
