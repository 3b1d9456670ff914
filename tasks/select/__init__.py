"""select: prune the training set (random subset, EL2N scores)."""

from typing import Annotated

from pydantic import Field

from tasks.select.el2n import El2nConfig
from tasks.select.random import RandomConfig

SelectConfig = Annotated[RandomConfig | El2nConfig, Field(discriminator="method")]
METHODS = {"random": RandomConfig, "el2n": El2nConfig}
