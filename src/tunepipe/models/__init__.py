"""Models: Hub repos, base models (`models/base/`) and the trained weights later stages load."""
