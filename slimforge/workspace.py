"""Where a pipeline run keeps its files: one directory holding dvc.yaml and params.yaml.

Paths are relative to the workspace root so that dvc.yaml, dvc.lock and meta.json
agree whichever way the pipeline was started.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PARAMS_FILE = "params.yaml"


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def current(cls) -> Workspace:
        return cls(Path(os.environ.get("SLIMFORGE_WORKSPACE", ".")).resolve())

    def artifact(self, stage: str, *parts: str) -> Path:
        """artifacts/<stage>[/parts...]: a stage's DVC-tracked output directory."""
        return self.root / "artifacts" / stage / Path(*parts) if parts else self.root / "artifacts" / stage

    def metrics(self, stage: str) -> Path:
        return self.root / "metrics" / f"{stage}.json"

    @property
    def params(self) -> Path:
        return self.root / PARAMS_FILE

    def rel(self, path: Path) -> str:
        """Path relative to the root, as recorded in meta.json and dvc.lock."""
        return Path(path).resolve().relative_to(self.root).as_posix()
