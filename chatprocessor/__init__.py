"""chatprocessor: an AI worker service that answers chat prompts from a message broker."""

__version__ = "0.1.0"
