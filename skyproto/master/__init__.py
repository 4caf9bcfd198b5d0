"""master layer."""
