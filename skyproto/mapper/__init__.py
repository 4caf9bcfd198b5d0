"""mapper layer."""
