"""Validation of a pruned or exported model against its reference: agreement, accuracy, latency, gates."""
