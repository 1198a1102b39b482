"""The engine: jobs, results, errors and the worker loop."""
