"""Identity, signed records, the sans-IO protocol core, ZeroMQ transport and discovery (see DESIGN.md)."""
