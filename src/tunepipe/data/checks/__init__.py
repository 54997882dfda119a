"""What validate checks and writes: JSON Schemas, row rules, `data/validated/`."""
