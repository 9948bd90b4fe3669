"""Speed and recipe measurements; run from the repository root as `python -m benchmarks.NAME`.

Never part of the tests: each writes its figures with provenance under the results folder.
"""
