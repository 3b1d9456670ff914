"""slimforge: a declarative, reproducible pipeline that makes models smaller and faster."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# The source trees whose code produces artifacts; hashed into every meta.json.
PACKAGE_ROOTS = tuple(REPO_ROOT / name for name in ("slimforge", "tasks", "kernels"))

__version__ = "0.1.0"
