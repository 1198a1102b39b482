"""Fault-injection tests: kill -9, broker cuts, provider outages, poison messages (-m faults)."""
