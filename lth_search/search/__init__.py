"""The search adapter: Ray Tune runs lineages, Optuna proposes choices (the only ray/optuna imports)."""
