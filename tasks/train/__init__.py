"""train: train a model from a chosen initialisation on the selected training set."""

from tasks.train.config import TrainConfig
from tasks.train.init import INITS, initialize

__all__ = ["INITS", "TrainConfig", "initialize"]
