"""The CPU benchmark of batchnorm, shipped inside the package so that an installed copy can
run it: `batchnorm._bench.main(argv)` (`python -m batchnorm bench`, or bench/run.py from a
checkout). See bench/README.md for what it measures and how to read it."""
from .cli import main

__all__ = ["main"]
