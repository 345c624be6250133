"""The node: research loop, proposers, git tree and journal, store, verification queue, CLI (see DESIGN.md)."""
