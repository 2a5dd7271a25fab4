"""Without jax: `import batchnorm` never imports jax, and `import batchnorm.jax` says how to get
it. jax is hidden from a fresh interpreter (an import hook), so this runs with or without it."""
from __future__ import annotations

import subprocess
import sys
import textwrap


def test_batchnorm_jax_without_jax_says_how_to_install():
    script = textwrap.dedent("""
        import sys

        class HideJax:
            def find_spec(self, name, path=None, target=None):
                if name == "jax" or name.startswith(("jax.", "jaxlib")):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)

        sys.meta_path.insert(0, HideJax())
        import batchnorm
        assert not any(m == "jax" or m.startswith("jax.") for m in sys.modules), "batchnorm imported jax"
        try:
            import batchnorm.jax
        except ImportError as e:
            print("ImportError:", e)
        else:
            raise SystemExit("batchnorm.jax imported without jax")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "pip install 'batchnorm[jax]'" in proc.stdout


def test_import_batchnorm_does_not_import_jax():
    script = "import sys, batchnorm; assert 'jax' not in sys.modules and 'flax' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
