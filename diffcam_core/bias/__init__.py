"""The bias audit's pure parts: detectors, verdicts, the discovery scan and their settings (docs/BIAS.md)."""
