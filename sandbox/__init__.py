"""Runs one untrusted candidate tree under the budget and computes its metric (see ../shared/DESIGN.md)."""
