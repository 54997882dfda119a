"""Chat templates: turns, LLaMA-Factory's named templates, tool formats."""
