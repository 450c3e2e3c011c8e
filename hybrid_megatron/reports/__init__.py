"""Reports built from run outputs (loss curves, ...)."""
