"""Two processes on loopback (jax.distributed, gloo CPU collectives) run the single-process step."""

import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import chex
import jax
import numpy as np
import optax

import jaxopt_big as jb

WORKER = textwrap.dedent("""
    import os, sys
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    jax.config.update("jax_num_cpu_devices", 2)
    import numpy as np
    import jaxopt_big as jb
    from tests.test_parallel_distributed import LOSS, TX, batch, params

    pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jb.parallel.initialize(f"127.0.0.1:{port}", 2, pid, timeout_s=60)
    assert jax.process_count() == 2 and jax.device_count() == 4
    mesh = jb.parallel.make_mesh(data=4)
    state = jb.parallel.shard_params(jb.train.TrainState.create(params(), TX), mesh)
    step = jb.train.make_step(LOSS, TX, mesh=mesh)
    x, y = batch()
    for i in range(2):
        local = slice(pid * 8, (pid + 1) * 8)  # each process feeds its half of the global batch
        state, metrics = step(state, (x[i, local], y[i, local]))
    flat = {jax.tree_util.keystr(p): np.asarray(v.addressable_data(0))
            for p, v in jax.tree_util.tree_leaves_with_path(state.params)}
    np.savez(f"{out}/process{pid}.npz", loss=np.asarray(metrics["loss"].addressable_data(0)), **flat)
    jax.distributed.shutdown()
""")

MODEL = jb.models.MLP(features=(16,), num_classes=4)
TX = optax.adam(1e-2)
LOSS = jb.train.classifier_loss(lambda p, x: MODEL.apply({"params": p}, x))


def batch():
    return (np.asarray(jax.random.normal(jax.random.key(1), (2, 16, 6)), np.float32),
            np.asarray(jax.random.randint(jax.random.key(2), (2, 16), 0, 4), np.int32))


def params():
    return MODEL.init(jax.random.key(0), np.zeros((1, 6), np.float32))["params"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_data_parallel_step_equals_single_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    root = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("XLA_FLAGS", None)
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(script), str(pid), str(port), str(tmp_path)], cwd=root, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for pid in range(2)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=150)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)

    step = jb.train.make_step(LOSS, TX, donate=False)
    state = jb.train.TrainState.create(params(), TX)
    x, y = batch()
    for i in range(2):
        state, metrics = step(state, (x[i], y[i]))
    expected = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(state.params)}
    for pid in range(2):
        got = dict(np.load(tmp_path / f"process{pid}.npz"))
        np.testing.assert_allclose(got.pop("loss"), metrics["loss"], atol=1e-6)
        chex.assert_trees_all_close(got, expected, atol=1e-5, rtol=1e-5)
