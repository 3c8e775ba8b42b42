"""Studies: cross-validated search over run configs (Optuna), refit of the winner, ensembles."""
