"""`python -m batchnorm._bench [options]`: the benchmark without the package's CLI."""
import sys

from .cli import main

sys.exit(main())
