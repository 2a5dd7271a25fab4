"""The command line (`python -m batchnorm info`) and batchnorm.info(): the keys and types of
API.md, and the thread count that get_num_threads reports."""
from __future__ import annotations

import json
import subprocess
import sys

import batchnorm as bn

SIMD_LEVELS = ("baseline", "avx2", "avx512")


def check_info(info: dict) -> None:
    assert set(info) == {"version", "simd", "threads", "cuda"}
    assert isinstance(info["version"], str) and info["version"]
    assert info["simd"] in SIMD_LEVELS
    assert type(info["threads"]) is int and info["threads"] >= 1
    cuda = info["cuda"]
    assert set(cuda) == {"compiled", "available", "devices", "reason"}
    assert type(cuda["compiled"]) is bool and type(cuda["available"]) is bool
    assert isinstance(cuda["devices"], list) and all(isinstance(d, str) for d in cuda["devices"])
    assert isinstance(cuda["reason"], str)
    assert not cuda["available"] or cuda["compiled"], "CUDA cannot be available in a build without it"
    if cuda["available"]:
        assert cuda["devices"], "an available CUDA backend lists its devices"
    else:
        assert cuda["reason"], "an unavailable CUDA backend must say why"


def test_info_keys_and_types():
    info = bn.info()
    check_info(info)
    assert info["version"] == bn.__version__


def test_info_threads_follows_set_num_threads(restore_threads):
    assert bn.info()["threads"] == bn.get_num_threads()
    for n in (1, 3, restore_threads):
        bn.set_num_threads(n)
        assert bn.get_num_threads() == n == bn.info()["threads"]


def test_cli_info_prints_json():
    done = subprocess.run([sys.executable, "-m", "batchnorm", "info"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    check_info(info)
    assert info["version"] == bn.__version__ and info["simd"] == bn.info()["simd"]


def test_cli_info_into_a_closed_pipe_has_no_traceback():
    # `python -m batchnorm info | head -0`: the reader is gone before the JSON is written.
    proc = subprocess.Popen([sys.executable, "-m", "batchnorm", "info"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()
    _, err = proc.communicate(timeout=60)
    assert "Traceback" not in err.decode(), err.decode()
    assert proc.returncode == 1


def test_cli_selfcheck_passes():
    done = subprocess.run([sys.executable, "-m", "batchnorm", "selfcheck"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("self-check:") and done.stdout.rstrip().endswith("ok")


def test_cli_rejects_an_unknown_command():
    done = subprocess.run([sys.executable, "-m", "batchnorm", "no-such-command"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "invalid choice" in done.stderr
