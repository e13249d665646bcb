"""The layers of the package, as import contracts (``[tool.importlinter]`` in pyproject.toml):
the methods, pools, checkpoints and data never import the commands, data-free methods never
import the adaptive ones, and no two modules or packages import each other round a circle
(memory.py -> adaptation/wemoe.py -> adaptation/run.py -> runtime.py -> memory.py was one)."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_import_contracts_hold():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe, "import-linter is in the dev extras: pip install -e '.[dev]'"
    out = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout
