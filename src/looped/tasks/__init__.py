"""Beyond text: algorithmic tasks where more loops should solve larger problems than seen in training."""
