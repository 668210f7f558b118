"""Training: loop sampler, optimizers and schedules, checkpoints, the training loop, distributed set-up."""
