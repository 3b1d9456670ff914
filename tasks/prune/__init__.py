"""prune: make the trained model sparse (global/layer magnitude pruning + recovery)."""

from tasks.prune.magnitude import MagnitudeConfig, apply_masks, magnitude_masks, prunable

__all__ = ["MagnitudeConfig", "apply_masks", "magnitude_masks", "prunable"]
