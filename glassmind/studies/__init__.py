"""Studies: sweeps and experiments over the lifecycle verbs -> CSV, plots, cards."""
