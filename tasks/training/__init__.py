"""Training: the loop (fit) and its shared types, recorders, checkpoints and resume planning,
the transfer strategies (fit_student) and adversarial training."""
