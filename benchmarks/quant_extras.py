"""Weight clustering speed (our jitted 1-D k-means vs scikit-learn KMeans, same k, same iterations)
and the true bytes of binary / ternary / float8 / 8-cluster storage of a Dense kernel."""

from __future__ import annotations

import argparse

import jax
import numpy as np
from sklearn.cluster import KMeans

from common import interleaved, write
from jaxopt_big.quant._cluster import cluster, kmeans
from jaxopt_big.quant._formats import Binary, Float8, Ternary


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n = 65_536 if args.quick else 1_048_576
    iters, k = 20, 16
    w = np.asarray(jax.random.normal(jax.random.key(0), (n // 256, 256)))
    flat = w.reshape(-1, 1).astype(np.float32)
    key = jax.random.key(1)
    ours = lambda: kmeans(w, k, key=key, iters=iters).centroids
    theirs = lambda: KMeans(k, init="k-means++", n_init=1, max_iter=iters, tol=0.0, random_state=0).fit(flat).cluster_centers_
    t = interleaved({"ours": ours, "sklearn": theirs}, repeats=3 if args.quick else 5, warmup=1)
    obj_ours = float(kmeans(w, k, key=key, iters=iters).objective[-1])
    obj_sk = float(KMeans(k, init="k-means++", n_init=1, max_iter=iters, tol=0.0, random_state=0).fit(flat).inertia_)
    dense = w.nbytes
    details = {"weights": n, "k": k, "iters": iters, "objective ours": obj_ours, "objective sklearn": obj_sk,
               "float32 bytes": dense,
               "binary bytes": Binary().quantize(w).nbytes, "ternary bytes": Ternary().quantize(w).nbytes,
               "float8 e4m3 bytes": Float8("e4m3").quantize(w).nbytes,
               "8-cluster bytes": cluster({"kernel": w}, 8, key=key, where="kernel")["kernel"].nbytes}
    write("quant_extras_kmeans", ours=t["ours"], baseline=t["sklearn"],
          goal="ours/sklearn <= 1 (jitted 1-D Lloyd vs sklearn KMeans, same k and iterations), objective within 1%",
          holds=t["ours"] <= t["sklearn"] and obj_ours <= 1.01 * obj_sk, details=details)


if __name__ == "__main__":
    main()
