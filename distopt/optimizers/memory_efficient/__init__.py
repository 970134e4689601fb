"""memory efficient recipes."""
