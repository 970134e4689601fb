"""second order recipes."""
