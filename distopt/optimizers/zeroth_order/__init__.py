"""zeroth order recipes."""
