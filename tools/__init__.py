"""Tooling around the project that is neither the package nor a benchmark (see each folder's README)."""
