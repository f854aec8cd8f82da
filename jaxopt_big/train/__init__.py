"""Jitted optax training, evaluation, data splits and cross-validation."""

from jaxopt_big.data import holdout_split
from jaxopt_big.train._evaluation import CrossValidation, cross_validate, evaluate, kfold
from jaxopt_big.train._loop import Callback, EarlyStopping, EpochEnd, ReduceOnPlateau, fit
from jaxopt_big.train._state import TrainState
from jaxopt_big.train._step import apply_gradients, classifier_loss, grads_and_metrics, make_step

__all__ = ["TrainState", "make_step", "classifier_loss", "grads_and_metrics", "apply_gradients", "evaluate", "fit",
           "EarlyStopping", "ReduceOnPlateau", "Callback", "EpochEnd", "holdout_split", "kfold", "cross_validate",
           "CrossValidation"]
