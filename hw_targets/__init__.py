"""hw_targets."""
