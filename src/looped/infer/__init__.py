"""Inference: sampling from a model at a chosen loop count."""
