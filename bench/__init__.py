"""Benchmarks that print each figure beside a baseline measured in the same run.

Run them with ``python -m bench`` from the repository root; ``--help`` lists the options.
"""
