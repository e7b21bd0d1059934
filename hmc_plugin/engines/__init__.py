"""The two engines: low-rank replacement (tensorly) and structured pruning (torch-pruning), no planning."""
