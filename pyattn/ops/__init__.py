"""The public ops, one module per family: checks, backend choice, custom op."""
