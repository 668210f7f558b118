"""keep_freed_memory: freed activations are reused instead of faulted in again (glibc's malloc)."""

from __future__ import annotations

import resource
import sys

import pytest
import torch

from looped.train.step import keep_freed_memory


def _faults_of_a_step_like_allocation() -> int:
    """Page faults while six 16 MiB tensors (a step's MLP activations) live at once and are freed."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensors = [torch.ones(4 << 20) for _ in range(6)]  # touched, so each page is faulted in unless reused
    del tensors
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_freed_activations_are_reused_without_page_faults():
    # Without the setting, glibc trims the 96 MiB freed at the top of its heap back to the kernel (its
    # trim threshold is at most 64 MiB) and every repeat faults all 24,576 pages in again.
    assert keep_freed_memory()
    for _ in range(2):
        _faults_of_a_step_like_allocation()
    pages = 6 * (16 << 20) // resource.getpagesize()
    assert _faults_of_a_step_like_allocation() < pages // 10
