"""tunepipe: LLM fine-tuning as a pipeline of cacheable DVC stages."""

__version__ = "0.1.0"
