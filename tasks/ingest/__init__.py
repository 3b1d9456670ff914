"""ingest: bring a dataset in, validate it, split it deterministically (see stage.py)."""

from tasks.ingest.config import IngestConfig
from tasks.ingest.stage import run

__all__ = ["IngestConfig", "run"]
