"""Packaged data files (read with `importlib.resources`): instruments, targets, held-out sets, committee data."""
