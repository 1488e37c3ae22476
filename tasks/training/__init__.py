"""The training loop (fit), its recorders (MLflow, log, progress bar), checkpoints and adversarial training."""
