"""Evaluation code the benchmarks share: the method table, the cue zoo's ground truth and statistics."""
