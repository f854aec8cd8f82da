"""Bytes of a 90%-sparse float32 tree stored as ``PackedSparse`` vs dense float32.

Run: ``python benchmarks/sparsity_packed.py [--quick]``.
"""

from __future__ import annotations

import argparse

import jax

import jaxopt_big as jb
from jaxopt_big import sparsity as sp

from common import write


def main(quick: bool) -> None:
    model = jb.models.MLP(features=(512, 512) if quick else (2048, 2048))
    params = model.init(jax.random.key(0), jax.numpy.zeros((1, 784)))["params"]
    masks = sp.make_masks(sp.magnitude(params), 0.9)
    pruned = sp.apply_masks(params, masks)
    packed = sp.pack_params(pruned, masks)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool((a == b).all()), jb.leaves.densify(packed), pruned)))
    dense_b, packed_b = jb.leaves.nbytes(pruned), jb.leaves.nbytes(packed)
    write("sparsity_packed", ours=packed_b, baseline=dense_b, unit="bytes", goal="dense / packed >= 6",
          holds=dense_b / packed_b >= 6,
          details={"params": jb.models.count_params(params), "kernel_sparsity": 0.9,
                   "reduction": dense_b / packed_b, "round_trip_exact": True})


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    main(parser.parse_args().quick)
