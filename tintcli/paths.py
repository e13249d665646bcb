"""Where tint keeps its configs and its cache."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
# Inside the package, so an installed tint (a cluster node, a container) composes the same
# configs as a source checkout: Hydra reads them as pkg://tintcli.conf. The checkout's
# top-level conf/ and experiments/ are links to here.
CONF_DIR = PACKAGE_DIR / "conf"
CONF_MODULE = "tintcli.conf"

# A run directory's records (light names: a Ctrl-C during the first imports reads them too)
RESULTS = "results.json"
ERROR = "error.json"  # a failed job's error, in its own run directory
PARTIAL = "results.partial.json"  # every finished row, flushed as each method ends


def cache_dir() -> Path:
    """``$TINT_CACHE``, else ``$XDG_CACHE_HOME/tint``, else ``~/.cache/tint``."""
    if os.environ.get("TINT_CACHE"):
        return Path(os.environ["TINT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tint"
