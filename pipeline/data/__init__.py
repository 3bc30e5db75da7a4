"""Data sources and loaders."""
