"""Pipeline steps: history, context window, retrieval..."""
