"""harbor layer."""
