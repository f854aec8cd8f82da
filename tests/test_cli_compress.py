"""`jaxopt-big compress` on a tiny random Llama checkpoint in the Hugging Face layout."""

import errno
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxopt_big as jb
from jaxopt_big import cli

CONFIG = jb.zoo.LlamaConfig(vocab_size=256, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                            intermediate_size=256, max_positions=64)
LINEARS = ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj", "mlp/gate_proj",
           "mlp/up_proj", "mlp/down_proj")
ARGS = ("--samples", "8", "--length", "32")


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    jb.zoo.save_llama(directory, jb.zoo.Llama(CONFIG, rngs=nnx.Rngs(0)))
    return directory


@pytest.fixture(scope="module")
def compressed(src, tmp_path_factory):
    dst = tmp_path_factory.mktemp("out") / "int4"
    assert cli.main(["compress", str(src), "--out", str(dst), "--recipe", "gptq-int4", "--export-hf", *ARGS]) == 0
    return dst


def test_writes_a_checkpoint_a_report_of_every_linear_and_the_config(compressed, src):
    assert json.loads((compressed / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    report = (compressed / "report.md").read_text()
    for layer in range(CONFIG.num_layers):
        for linear in LINEARS:
            assert f"layers/{layer}/{linear}/kernel" in report, linear
    assert "perplexity" in report and "gptq int4 g128" in report
    assert not [p.name for p in compressed.parent.iterdir() if p.name.startswith(".")]  # no partial folder left


def test_checkpoint_restores_and_hf_export_gives_the_dequantized_logits(compressed):
    skeleton, restored = jb.hf.load_compressed(compressed)
    kernel = restored["layers"][0]["mlp"]["up_proj"]["kernel"].get_value()
    assert jb.leaves.is_compressed(kernel) and kernel.bits == 4
    head = restored["lm_head"]["kernel"].get_value()
    assert not jb.leaves.is_compressed(head)                    # the preset leaves the head dense
    reference = jb.zoo.Llama(CONFIG, rngs=nnx.Rngs(1))
    nnx.update(reference, jb.leaves.densify(restored))
    exported = jb.zoo.load_llama(compressed / "hf")
    ids = jnp.asarray(jb.data.encode("def f(x): return x * 2  # a test line of thirty-two")[None, :32])
    assert float(jnp.abs(exported(ids) - reference(ids)).max()) <= 1e-5
    assert np.array_equal(exported.layers[0].mlp.up_proj.kernel.get_value(), kernel.dense())


def _fails(capsys, *argv):
    code = cli.main(["compress", *argv])
    err = capsys.readouterr().err.split("\r")[-1]  # after the progress bar, if compression had started
    assert code == 2 and err.count("\n") == 1 and err.startswith("jaxopt-big: error: "), err
    return err


def test_missing_source_unsupported_model_and_bad_recipes_exit_2(src, tmp_path, capsys):
    dst = tmp_path / "dst"
    assert "does not exist" in _fails(capsys, str(tmp_path / "nope"), "--out", str(dst), "--recipe", "int8")
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert "unsupported model_type 'gpt2'" in _fails(capsys, str(other), "--out", str(dst), "--recipe", "int8")
    assert "unknown recipe 'int9'" in _fails(capsys, str(src), "--out", str(dst), "--recipe", "int9")
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[rule]]\npattern = "nothing/.*"\nsparsity = 0.5\n')
    assert "'nothing/.*'" in _fails(capsys, str(src), "--out", str(dst), "--recipe", str(recipe), *ARGS)
    assert not dst.exists()


@pytest.mark.parametrize("option, value, message", [
    ("--samples", "-3", "argument --samples: expected an int >= 1, got -3"),
    ("--samples", "0", "argument --samples: expected an int >= 1, got 0"),
    ("--length", "1", "argument --length: expected an int >= 2, got 1"),
    ("--length", "ten", "argument --length: expected an int >= 2, got 'ten'"),
    ("--mesh", "foo", "argument --mesh: expected axis=size[,axis=size...] over data, fsdp and tensor"),
    ("--mesh", "model=8", "got 'model=8'"),
    ("--mesh", "data=x", "got 'data=x'")])
def test_bad_counts_and_meshes_exit_2_in_one_line_naming_the_option(tmp_path, capsys, option, value, message):
    dst = tmp_path / "dst"  # these reached the batching, perplexity or dict code with misleading messages
    with pytest.raises(SystemExit) as e:
        cli.main(["compress", str(tmp_path / "src"), "--out", str(dst), "--recipe", "int8", option, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and message in err, err
    assert not dst.exists()


def test_existing_destination_is_refused_and_left_untouched(src, tmp_path, capsys):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "mine.txt").write_text("keep me")
    assert "--overwrite" in _fails(capsys, str(src), "--out", str(dst), "--recipe", "int8", *ARGS)
    assert [p.name for p in dst.iterdir()] == ["mine.txt"] and (dst / "mine.txt").read_text() == "keep me"


def test_disk_full_leaves_no_destination_and_no_partial(src, tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(jb.hf, "_markdown", full)
    dst = tmp_path / "dst"
    assert "disk full" in _fails(capsys, str(src), "--out", str(dst), "--recipe", "int8", *ARGS)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_only_once_complete(src, tmp_path, capsys):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    assert cli.main(["compress", str(src), "--out", str(dst), "--recipe", "int8", "--overwrite", *ARGS]) == 0
    assert not (dst / "old.txt").exists() and (dst / "report.md").exists()
    assert "perplexity" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]
