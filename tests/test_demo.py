"""`jaxopt-big demo --quick` end to end: every technique on digits, checked against the issues' thresholds."""

import json
import subprocess
import sys

import pytest

from jaxopt_big import cli


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    proc = subprocess.run([sys.executable, "-m", "jaxopt_big.cli", "demo", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())}
    return out, proc.stdout, rows


def _row(rows, prefix):
    (row,) = [r for m, r in rows.items() if m.startswith(prefix)]
    return row


def test_prints_one_table_with_every_method(demo):
    _, stdout, rows = demo
    assert len(rows) == 15
    assert stdout.splitlines()[-3:] == [f"wrote {demo[0] / p}"                # it ends with where it wrote
                                        for p in ("report.md", "results.json", "accuracy_vs_compression.png")]
    table = stdout[stdout.index("method"):]
    for method in rows:
        assert method in table
    for column in ("accuracy", "delta", "bytes", "ratio", "train s"):
        assert column in table.splitlines()[0]


def test_dense_teacher_accuracy(demo):
    assert _row(demo[2], "dense CNN (teacher)")["accuracy"] >= 0.975


@pytest.mark.parametrize("prefix, max_drop_pt", [
    ("global magnitude 90%", 1.0), ("2:4 sparsity", 0.5), ("RigL 90%", 1.5), ("int8 PTQ", 0.5),
    ("2-bit QAT", 1.5), ("8-cluster", 1.0), ("low-rank 50%", 1.5), ("stacked", 1.5)])
def test_compressed_models_stay_close_to_dense(demo, prefix, max_drop_pt):
    row = _row(demo[2], prefix)
    assert row["delta_pt"] >= -max_drop_pt, row
    assert row["ratio"] > 1.0 or prefix == "2:4 sparsity" and row["ratio"] > 1.5


def test_two_bit_ptq_mse_beats_absmax(demo):
    row = _row(demo[2], "2-bit PTQ")
    assert row["accuracy"] >= 0.95 and row["absmax_accuracy"] < row["accuracy"], row
    assert row["ratio"] > 12


def test_mixed_precision_beats_uniform_two_bit(demo):
    rows = demo[2]
    assert _row(rows, "mixed precision")["accuracy"] > _row(rows, "2-bit PTQ")["accuracy"]


def test_lora_reaches_90_percent_of_full_finetuning(demo):
    row = _row(demo[2], "LoRA")
    assert row["accuracy"] >= 0.9 * row["full_finetune_accuracy"], row
    assert row["trained_fraction"] < 0.05


def test_kd_student_beats_plain_student(demo):
    rows = demo[2]
    assert _row(rows, "KD MLP student")["accuracy"] - _row(rows, "plain MLP student")["accuracy"] >= 0.02


def test_cross_validation_reports_mean_and_spread(demo):
    row = _row(demo[2], "dense CNN, 5-fold")
    assert len(row["folds"]) == 5 and abs(sum(row["folds"]) / 5 - row["accuracy"]) < 1e-9 and row["std"] < 0.05


def test_files_written(demo):
    out = demo[0]
    assert (out / "report.md").read_text().startswith("# jaxopt-big demo")
    png = (out / "accuracy_vs_compression.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    saved = sorted(p.name for p in (out / "models").iterdir())
    assert len(saved) == 14  # every row with a model (CV has none)


def test_report_command_reads_a_saved_model(demo, capsys):
    target = demo[0] / "models" / "int8_ptq"  # in this process: the fixture ran the `python -m` entry point
    assert cli.main(["report", str(target)]) == 0
    stdout = capsys.readouterr().out
    assert "Dense_0/kernel" in stdout and "int8" in stdout


def test_results_name_every_row_and_set_other_tasks_apart(demo):
    rows = demo[2]
    names = [r["name"] for r in rows.values()]
    assert len(set(names)) == len(names) and all(n.isidentifier() for n in names)
    others = {r["name"] for r in rows.values() if r["family"] == "other task"}
    assert others == {"lora", "kd_student", "plain_student", "kfold"}


def test_pareto_front_is_the_undominated_points():
    from jaxopt_big._plot import pareto_front
    points = [(1.0, 0.99), (4.0, 0.98), (3.0, 0.97), (8.0, 0.90), (8.0, 0.95), (2.0, 0.99)]
    front = pareto_front(points)
    dominated = lambda i: any(p[0] >= points[i][0] and p[1] >= points[i][1] and p != points[i] for p in points)
    assert front == sorted((i for i in range(len(points)) if not dominated(i)), key=lambda i: points[i][0])
    assert front == [5, 1, 4]


def test_demo_on_an_unwritable_folder_exits_2_before_training(tmp_path, capsys, monkeypatch):
    from jaxopt_big import demo
    monkeypatch.setattr(demo, "train_teacher", lambda *a, **k: pytest.fail("trained"))
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert cli.main(["demo", "--quick", "--out", str(blocked / "out")]) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "not writable" in err and "Traceback" not in err and out == ""


def test_report_command_missing_directory_exits_2(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err and "Traceback" not in err


def test_a_second_run_into_the_same_folder_replaces_the_first(tmp_path):
    import jax.numpy as jnp
    import numpy as np

    from jaxopt_big import checkpoint, demo
    teacher = demo.Teacher(model=None, params=None, accuracy=0.9, nbytes=64, seconds=1.0)
    stage = demo.Stage("toy", "toy model", demo.Family.PRUNING, run=lambda ctx: None)
    for value in (1.0, 2.0):  # as `make demo` run twice into demo-out/
        measured = demo.Measured(accuracy=0.8, nbytes=32, seconds=1.0, params={"w": jnp.full((4, 4), value)})
        demo._save([demo.Result(stage, measured)], teacher, tmp_path, table="")
    with checkpoint.Manager(tmp_path / "models" / "toy") as manager:
        np.testing.assert_array_equal(manager.restore()["w"], np.full((4, 4), 2.0))
    assert json.loads((tmp_path / "results.json").read_text())[0]["name"] == "toy"
