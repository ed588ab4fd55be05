"""Multi-seed quality experiments of nio_fast (see README.md in this folder)."""
