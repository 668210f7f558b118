"""Science: evaluation sweeps over loop counts (comparisons, sweeps and fits build on these)."""
