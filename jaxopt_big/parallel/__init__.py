"""Device meshes (data / FSDP / tensor), sharding rules, pipeline stages, legacy pmap, multi-host."""

from jaxopt_big._batch_sharding import batch_sharding, shard_batch
from jaxopt_big.parallel._distributed import initialize
from jaxopt_big.parallel._legacy_pmap import pmap_step, replicate, split_batch, unreplicate
from jaxopt_big.parallel._mesh import AXES, make_mesh
from jaxopt_big.parallel._pipeline import pipeline
from jaxopt_big.parallel._sharding import param_shardings, shard_params

__all__ = ["AXES", "make_mesh", "param_shardings", "shard_params", "shard_batch", "batch_sharding", "pmap_step",
           "replicate", "unreplicate", "split_batch", "pipeline", "initialize"]
