"""Wire contracts: one module per door, its pydantic models and its codec to Job/Result."""
