"""first order recipes."""
