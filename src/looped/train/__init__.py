"""Training: loop sampler, optimizers and schedules, the optimizer step, resumable training state, the loop."""
