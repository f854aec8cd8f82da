"""Knowledge distillation: KD, feature and attention losses, and a loss combinator for any optax step."""

from jaxopt_big.distill._combinator import Batch, Feature, NnxApply, TeacherTargets, combine, precompute
from jaxopt_big.distill._losses import FeatureLoss, attention_transfer, feature_loss, init_projection, kd_loss

__all__ = ["kd_loss", "feature_loss", "attention_transfer", "init_projection", "FeatureLoss", "Feature",
           "NnxApply", "TeacherTargets", "Batch", "precompute", "combine"]
