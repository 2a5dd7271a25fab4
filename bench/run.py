#!/usr/bin/env python3
"""Runs the CPU benchmark from a checkout: `python bench/run.py [--quick] ...` writes its
results under bench/results/. The code lives in batchnorm._bench (the installed package's copy,
or this checkout's when the installed batchnorm predates it)."""
import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKOUT_BENCH = os.path.join(HERE, os.pardir, "python", "batchnorm", "_bench")

try:
    import batchnorm  # noqa: F401
except ImportError as e:
    sys.exit(f"batchnorm is not importable ({e}); build and install it first: pip install .")

try:
    from batchnorm._bench import main
except ModuleNotFoundError as e:
    if e.name != "batchnorm._bench":
        raise
    spec = importlib.util.spec_from_file_location("batchnorm._bench", os.path.join(CHECKOUT_BENCH, "__init__.py"),
                                                  submodule_search_locations=[CHECKOUT_BENCH])
    module = importlib.util.module_from_spec(spec)
    sys.modules["batchnorm._bench"] = module
    spec.loader.exec_module(module)
    main = module.main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], default_out=os.path.join(HERE, "results")))
