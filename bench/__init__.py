"""Benchmarks of chatprocessor, each measured side by side with a reference in the same run.

Run ``python -m bench <scenario>`` (overhead, saturation, scale, embedded, memory, all); see
``bench/__main__.py`` and, for the shared machinery, ``bench/common.py``.
"""
