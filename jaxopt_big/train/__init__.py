"""Jitted optax training, evaluation and data splits."""

from jaxopt_big.data import holdout_split
from jaxopt_big.train.evaluation import evaluate
from jaxopt_big.train.loop import fit
from jaxopt_big.train.state import TrainState
from jaxopt_big.train.step import classifier_loss, make_step

__all__ = ["TrainState", "make_step", "classifier_loss", "evaluate", "fit", "holdout_split"]
