"""Training the tiny models diffcam ships: both families' architectures and their training loops."""
