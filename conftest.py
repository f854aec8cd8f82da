"""Doctests in jaxopt_big/ and README.md run with the same 8 CPU devices as tests/."""

import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Most of the suite's time is XLA compilation of small programs, many of them compiled again by the
# other xdist worker, the CLI/demo subprocesses and the notebook kernels (which inherit this
# environment): one persistent compilation cache for the run compiles each of them once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(pathlib.Path(__file__).parent / ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.05")
# The suite compiles thousands of small programs and runs each a few times. XLA's CPU element-wise
# emitters (instead of its fusion emitters) compile them faster with bit-identical results, and LLVM
# -O1 faster again, changing only the last bits of some float results (as another CPU would); both
# take a third off the suite's compile time. Subprocesses (CLI, demo, notebook kernels) inherit it.
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), "--xla_cpu_use_fusion_emitters=false",
                                    "--xla_backend_optimization_level=1"]).strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))

import hypothesis  # noqa: E402

# CI runs the same examples every time (a red CI must be reproducible); local runs keep exploring.
hypothesis.settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    hypothesis.settings.load_profile("ci")
