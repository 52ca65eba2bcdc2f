"""The bias audit's steps inside a run: reading the run back, the scan, counterfactuals, flags, report section."""
