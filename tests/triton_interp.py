"""Run Triton kernels without a GPU: a snippet in a subprocess under triton's CPU interpreter (TRITON_INTERPRET=1).

Used by the CUDA engine's tests where triton is installed but there is no GPU; CI installs no triton and skips them.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
has_triton = importlib.util.find_spec("triton") is not None
interpreter_only = pytest.mark.skipif(not has_triton or torch.cuda.is_available(),
                                      reason="needs triton (CPU interpreter)")

# numpy >= 2.4 refuses int() of a 1-element array, which triton 3.6's interpreter does for loop bounds
SHIM = ("import numpy as np\nfrom triton.runtime import interpreter as i\no = i._patch_lang_tensor\n"
        "def p(t, s):\n    o(t, s)\n    s.set_attr(t, '__index__', lambda self: int(np.asarray(self.handle.data)"
        ".reshape(-1)[0]))\ni._patch_lang_tensor = p\n")


def run_interpreted(code: str, timeout: float = 600) -> str:
    """Run ``code`` (with ``tests/`` on the path) under the interpreter; its stdout. Fails the test on an error."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
    out = subprocess.run([sys.executable, "-c", SHIM + "import sys\nsys.path.insert(0, 'tests')\n" + code], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout
