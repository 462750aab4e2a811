"""What the package promises on install: extras that exist, a torch requirement a GPU host can meet with its own
CUDA build, and the CPU pin kept in the install scripts (a constraints file), not in the library's metadata."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXTRAS = PYPROJECT["project"]["optional-dependencies"]


def _requirement(extra: str, name: str) -> str:
    reqs = [r for r in EXTRAS[extra] if re.match(rf"{name}\b(?![-_])", r)]
    assert len(reqs) == 1, (extra, name, EXTRAS[extra])
    return reqs[0]


def test_models_extra_leaves_the_torch_build_to_the_host():
    torch = _requirement("models", "torch").replace(" ", "")
    assert torch.startswith("torch>=") and "==" not in torch and "+" not in torch, torch


def test_no_extra_for_a_backend_that_does_not_ship():
    assert "neuron" not in EXTRAS  # no Neuron engine ships (docs/backends.md says what one needs)
    assert not any("neuron" in r for reqs in EXTRAS.values() for r in reqs)


def test_install_script_pins_the_cpu_torch_first_through_the_constraints_file():
    constraints = (ROOT / "scripts" / "constraints-cpu.txt").read_text().splitlines()
    assert "torch==2.13.0" in [line.strip() for line in constraints]
    installs = [line.strip() for line in (ROOT / "scripts" / "_env.sh").read_text().splitlines()
                if "pip install" in line and "--upgrade pip" not in line]
    assert len(installs) == 2, installs
    torch_first, project = installs
    assert '-c "$CONSTRAINTS" torch' in torch_first
    assert '-c "$CONSTRAINTS" -e "$ROOT[$EXTRAS]"' in project
    assert 'CONSTRAINTS="$ROOT/scripts/constraints-cpu.txt"' in (ROOT / "scripts" / "_env.sh").read_text()
