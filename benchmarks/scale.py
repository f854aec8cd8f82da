"""``jaxopt-big compress`` on a 1B-shaped Llama checkpoint: memory, time against the floor, resume, mesh.

The script writes a Llama with random weights (hidden 2048, intermediate 8192, 16 layers, vocab 32000,
GQA 32/8: 1.1B parameters) as a sharded bfloat16 Hugging Face checkpoint (an index and several
shards, with a byte-level ``tokenizer.json``), then, each in a subprocess:

1. ``jaxopt-big compress --recipe gptq-int4 --profile`` (8 sequences of 128 tokens): its peak resident
   memory (the CLI's last line) against 1.3 x the bf16 checkpoint plus one block's calibration
   activations (its inputs and outputs, float32), and its wall time against the floor measured in
   the same run;
2. the floor: three jitted forward passes over the calibration set (one block at a time) plus a plain
   numpy GPTQ (the reference's lazy-batch loop, float32) over every layer's Hessian;
3. resume: the same command killed (SIGKILL) once block ``k`` (2, or 1 of 2) is on disk, with no finished-looking
   output folder at that moment, then run again with ``--resume``: its checkpoint must equal the
   uninterrupted one byte for byte;
4. mesh: the same command on 8 forced CPU devices with ``--mesh data=8`` and ``--mesh data=2,fsdp=4``:
   the integer codes must equal the single-device run's on >= 99.9% of the weights.

``--quick`` does all of it on a smaller shape (hidden 512, 4 layers, vocab 4096). There the JAX
runtime's own resident memory dwarfs the checkpoint, so the memory check subtracts it (the peak of
the same command on a 2-layer, 64-wide model) instead of comparing the raw peak.
``--layers N`` keeps the 1B width with ``N`` layers (a shorter run, written as ``scale-layersN``):
streaming holds one float block, so the peak grows with depth only by the compressed result; the
memory check then compares the peak plus the compressed bytes of the missing layers with the
16-layer bound (its checkpoint: this one plus the missing layers' bytes).
Run: ``python benchmarks/scale.py [--quick | --layers N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

FULL = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "vocab_size": 32000,
        "num_attention_heads": 32, "num_key_value_heads": 8}
QUICK = {"hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 4, "vocab_size": 4096,
         "num_attention_heads": 8, "num_key_value_heads": 2}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 512,
        "num_attention_heads": 4, "num_key_value_heads": 2}
SAMPLES, LENGTH, KILL_AFTER = 8, 128, 2


# ---------------------------------------------------------------- the checkpoint

def write_checkpoint(directory: pathlib.Path, shape: dict, shards: int) -> int:
    """Random bf16 weights in HF names and layouts, ``shards`` files and an index; returns their bytes."""
    import numpy as np
    from jax.numpy import bfloat16
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    config = {"model_type": "llama", "max_position_embeddings": LENGTH, "rms_norm_eps": 1e-5, "hidden_act": "silu",
              "rope_theta": 10000.0, "tie_word_embeddings": False, **shape}
    h, f, n = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    d = h // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * d
    rng = np.random.default_rng(0)

    def normal(*dims: int, scale: float = 0.02) -> np.ndarray:
        return (rng.standard_normal(dims, np.float32) * scale).astype(bfloat16)

    def layer(i: int) -> dict:
        p = f"model.layers.{i}."
        out = {p + name: normal(*dims) for name, dims in (
            ("self_attn.q_proj.weight", (h, h)), ("self_attn.k_proj.weight", (kv, h)),
            ("self_attn.v_proj.weight", (kv, h)), ("self_attn.o_proj.weight", (h, h)),
            ("mlp.gate_proj.weight", (f, h)), ("mlp.up_proj.weight", (f, h)), ("mlp.down_proj.weight", (h, f)))}
        out[p + "input_layernorm.weight"] = np.ones(h, bfloat16)
        out[p + "post_attention_layernorm.weight"] = np.ones(h, bfloat16)
        return out

    directory.mkdir(parents=True)
    groups = [list(range(n))[s::shards] for s in range(shards)]
    weight_map, total = {}, 0
    for s, members in enumerate(groups):
        tensors = {k: v for i in sorted(members) for k, v in layer(i).items()}
        if s == 0:
            tensors["model.embed_tokens.weight"] = normal(shape["vocab_size"], h)
        if s == shards - 1:
            tensors["lm_head.weight"] = normal(shape["vocab_size"], h)
            tensors["model.norm.weight"] = np.ones(h, bfloat16)
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        total += sum(v.nbytes for v in tensors.values())
        del tensors
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                        "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(config))
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.save(str(directory / "tokenizer.json"))
    return total


# ---------------------------------------------------------------- runs of the CLI

def _command(src: pathlib.Path, out: pathlib.Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "jaxopt_big.cli", "compress", str(src), "--out", str(out), "--recipe", "gptq-int4",
            "--samples", str(SAMPLES), "--length", str(LENGTH), *extra]


def _env(devices: int = 1) -> dict:
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    if devices > 1:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    return env


def compress(src: pathlib.Path, out: pathlib.Path, *extra: str, devices: int = 1) -> dict:
    """One CLI run with --profile: its wall time, phases, time per block and peak memory."""
    start = time.perf_counter()
    proc = subprocess.run(_command(src, out, "--profile", *extra), env=_env(devices), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"compress failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    lines = proc.stdout.splitlines()
    phases = {m[1]: float(m[2]) for line in lines if (m := re.match(r"profile: (\w+)\s+([\d.]+) s$", line))}
    last = re.search(r"([\d.]+) s in all, ([\d.]+) s per block \((\d+) blocks\), peak resident memory ([\d,]+) MiB",
                     lines[-1])
    assert last, lines[-1]
    sizes = next(m for line in lines if (m := re.match(r"bytes: ([\d,]+) -> ([\d,]+)", line)))
    return {"compressed_bytes": int(sizes[2].replace(",", "")),
            "wall_s": seconds, "cli_s": float(last[1]), "per_block_s": float(last[2]), "blocks": int(last[3]),
            "peak_mb": float(last[4].replace(",", "")), "phases": phases}


def killed_then_resumed(src: pathlib.Path, out: pathlib.Path, k: int) -> dict:
    """SIGKILL once ``k`` blocks are on disk (checking that ``out`` does not exist then), then --resume."""
    proc = subprocess.Popen(_command(src, out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pattern = f".{out.name}.partial-{proc.pid}/blocks/*.pkl"
    while proc.poll() is None and len(list(out.parent.glob(pattern))) < k:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = len(list(out.parent.glob(pattern)))
    out_existed = out.exists()
    resumed = compress(src, out, "--resume")
    return {"blocks_on_disk_when_killed": saved, "output_existed_when_killed": out_existed, **resumed}


# ---------------------------------------------------------------- comparisons of outputs

def _leaves(directory: pathlib.Path) -> dict:
    import jax
    from flax import nnx

    import jaxopt_big as jb
    _, params = jb.hf.load_compressed(directory)
    pure = nnx.to_pure_dict(params)
    leaves = jax.tree.leaves(pure, is_leaf=jb.leaves.is_compressed)
    return dict(zip(jb.tree.paths(pure), leaves))


def same_bytes(a: pathlib.Path, b: pathlib.Path) -> bool:
    import jax
    import numpy as np
    x, y = _leaves(a), _leaves(b)
    return x.keys() == y.keys() and all(
        [np.asarray(u).tobytes() for u in jax.tree.leaves(x[k])] == [np.asarray(v).tobytes() for v in
                                                                      jax.tree.leaves(y[k])] for k in x)


def same_codes(a: pathlib.Path, b: pathlib.Path) -> float:
    """The fraction of quantized weights whose integer code is the same in both outputs."""
    import numpy as np

    import jaxopt_big as jb
    x, y = _leaves(a), _leaves(b)
    same = total = 0
    for k, leaf in x.items():
        if jb.leaves.is_compressed(leaf):
            u, v = np.asarray(leaf.int_values()), np.asarray(y[k].int_values())
            same, total = same + int((u == v).sum()), total + u.size
    return same / max(total, 1)


# ---------------------------------------------------------------- the floor

def floor(src: pathlib.Path) -> dict:
    """Three jitted forward passes over the calibration set, one block at a time, plus a numpy GPTQ of
    every layer on its Hessian (the solver the engine runs, without the engine)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import jaxopt_big as jb

    model = jb.zoo.load_llama(src, lazy=True)
    ids = np.random.default_rng(0).integers(0, 256, (SAMPLES, LENGTH), dtype=np.int32)
    batches = [ids[i:i + 8] for i in range(0, SAMPLES, 8)]
    graphdef, _, rest = nnx.split(model.layers[0], nnx.Param, ...)
    block = jax.jit(lambda p, x: nnx.merge(graphdef, p, rest)(x))
    embed = jax.jit(lambda table, i: jnp.take(table, i, axis=0))
    table = jb.oneshot.read_lazy(model.embed_tokens.embedding.get_value())
    forward = solve = 0.0
    rng = np.random.default_rng(1)
    for i in range(model.config.num_layers):
        params = jb.oneshot.read_lazy(nnx.state(model.layers[i], nnx.Param))
        start = time.perf_counter()
        for _ in range(3):  # statistics, outputs, and the capture of the inputs that the engine makes
            xs = [jax.block_until_ready(block(params, embed(table, b))) for b in batches]
        forward += time.perf_counter() - start
        pure = nnx.to_pure_dict(params)
        kernels = [np.asarray(pure[m][n]["kernel"]) for m, names in (
            ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj")))
            for n in names]
        hessians = {}
        for w in kernels:
            if w.shape[0] not in hessians:
                x = rng.standard_normal((SAMPLES * LENGTH, w.shape[0]), np.float32)
                hessians[w.shape[0]] = x.T @ x
        start = time.perf_counter()
        for w in kernels:
            numpy_gptq(w, hessians[w.shape[0]])
        solve += time.perf_counter() - start
        del xs
    return {"forward_s": forward, "solve_s": solve, "floor_s": forward + solve}


def numpy_gptq(w, h, bits: int = 4, group: int = 128, damp: float = 0.01, block: int = 128):
    """The reference GPTQ loop (lazy batch updates), float32, symmetric absmax grid per group; ``w`` is
    ``(d_in, d_out)``."""
    import numpy as np
    w = w.astype(np.float32).copy()
    d = w.shape[0]
    h = (h + damp * np.mean(np.diag(h)) * np.eye(d)).astype(np.float32)
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T
    q, top = np.zeros_like(w), 2 ** (bits - 1) - 1
    scale = np.ones(w.shape[1], np.float32)
    for b in range(0, d, block):
        e = min(b + block, d)
        err = np.zeros((e - b, w.shape[1]), np.float32)
        for i in range(b, e):
            if i % group == 0:
                scale = np.maximum(np.abs(w[i:i + group]).max(0), 1e-9) / top
            q[i] = np.clip(np.round(w[i] / scale), -top - 1, top) * scale
            err[i - b] = (w[i] - q[i]) / hinv[i, i]
            w[i + 1:e] -= np.outer(hinv[i, i + 1:e], err[i - b])
        w[e:] -= hinv[b:e, e:].T @ err
    return q


# ---------------------------------------------------------------- the benchmark

def main(quick: bool, skip: frozenset[str] = frozenset(), layers: int | None = None) -> dict:
    from common import write

    shape = QUICK if quick else FULL if layers is None else {**FULL, "num_hidden_layers": layers}
    missing = 0 if quick or layers is None else FULL["num_hidden_layers"] - layers
    with tempfile.TemporaryDirectory(prefix="jb-scale-") as tmp:
        root = pathlib.Path(tmp)
        src = root / "llama"
        ckpt_bytes = write_checkpoint(src, shape, shards=2 if quick else 4)
        print(f"checkpoint: {ckpt_bytes / 2**20:.0f} MiB bf16", flush=True)
        run = compress(src, root / "out")
        print("compress", run, flush=True)
        base = floor_run(src)
        print("floor", base, flush=True)
        acts_mb = 2 * SAMPLES * LENGTH * shape["hidden_size"] * 4 / 2**20
        runtime_mb = 0.0
        if quick:  # the JAX runtime's own resident memory, measured on a tiny model
            tiny = root / "tiny"
            write_checkpoint(tiny, TINY, shards=1)
            runtime_mb = compress(tiny, root / "tiny-out")["peak_mb"]
        outer = write_checkpoint(root / "no-layers", {**shape, "num_hidden_layers": 0}, 1)  # embeddings, head, norm
        n = shape["num_hidden_layers"]
        full_ckpt_mb = (ckpt_bytes + missing * (ckpt_bytes - outer) / n) / 2**20
        bound_mb = 1.3 * full_ckpt_mb + acts_mb  # the goal: 1.3 x the bf16 checkpoint + one block's activations
        missing_mb = missing * (run["compressed_bytes"] - outer) / n / 2**20  # their compressed result
        resumed: dict = {}
        kill_after = min(KILL_AFTER, n - 1)  # at least one block is compressed again after the kill
        if "resume" not in skip:
            resumed = killed_then_resumed(src, root / "resumed", kill_after)
            resumed["identical"] = same_bytes(root / "out", root / "resumed")
            print("resume", resumed, flush=True)
        mesh = {}
        for axes in () if "mesh" in skip else ("data=8", "data=2,fsdp=4"):
            out = root / f"mesh-{axes.replace('=', '').replace(',', '-')}"
            mesh[axes] = {**compress(src, out, "--mesh", axes, devices=8), "same_codes": same_codes(root / "out", out)}
            print("mesh", axes, mesh[axes], flush=True)
    ratio = run["cli_s"] / base["floor_s"]
    engine_s = sum(run["phases"].get(p, 0.0) for p in ("load", "capture", "calibrate", "solve", "propagate",
                                                          "assemble"))
    checks = {"peak_memory<=1.3x_ckpt+acts": run["peak_mb"] - runtime_mb + missing_mb <= bound_mb,
              "time<=1.5x_floor": ratio <= 1.5,
              "resume_identical": None if "resume" in skip else bool(resumed["identical"])
              and not resumed["output_existed_when_killed"] and resumed["blocks_on_disk_when_killed"] >= kill_after,
              "mesh_codes>=99.9%": None if "mesh" in skip else all(m["same_codes"] >= 0.999 for m in mesh.values())}
    name = "scale_quick" if quick else "scale" if layers is None else f"scale-layers{layers}"
    return write(name, ours=run["cli_s"], baseline=base["floor_s"], unit="s",
                 goal="jaxopt-big compress gptq-int4 of a sharded bf16 1B-shaped Llama: time <= 1.5x the floor "
                      "(3 forward passes + numpy GPTQ), peak RSS <= 1.3x the bf16 checkpoint + one block's "
                      "activations, resume after SIGKILL identical, mesh codes >= 99.9% equal",
                 holds=all(checks.values()),  # a skipped check (None) does not hold
                 details={"checks": checks, "quick": quick, "shape": shape, "checkpoint_mb": ckpt_bytes / 2**20,
                          "full_checkpoint_mb": full_ckpt_mb,
                          "peak_mb": run["peak_mb"], "runtime_mb_subtracted": runtime_mb, "bound_mb": bound_mb,
                          "missing_layers": missing, "missing_layers_compressed_mb_added": missing_mb,
                          "per_block_s": run["per_block_s"], "phases": run["phases"], "floor": base,
                          "engine_s": engine_s, "engine_over_floor": engine_s / base["floor_s"],
                          # the solvers alone (compiles included) against the numpy GPTQ of the floor
                          "solve_over_numpy_gptq": run["phases"].get("solve", 0.0) / base["solve_s"],
                          "resume": resumed, "mesh": mesh, "skipped": sorted(skip),
                          "calibration": f"{SAMPLES} sequences x {LENGTH} tokens"})


def floor_run(src: pathlib.Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--floor", str(src)], env=_env(), check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="hidden 512, 4 layers, vocab 4096")
    parser.add_argument("--layers", type=int, default=None, help="the 1B width with this many layers (default 16)")
    parser.add_argument("--skip", default="", help="comma-separated parts not to run: resume, mesh")
    parser.add_argument("--floor", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor:
        print(json.dumps(floor(pathlib.Path(args.floor))))
    else:
        main(args.quick, frozenset(p for p in args.skip.split(",") if p), args.layers)
