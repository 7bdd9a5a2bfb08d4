"""Benchmarks, each a script run from the repository root as ``python -m bench.NAME``.

As modules of this package, not files on ``sys.path``, their names cannot shadow an installed package
(``bench/kernels.py`` once hid the PyPI package ``kernels`` that transformers imports).
"""
