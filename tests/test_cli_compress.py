"""`jaxopt-big compress` on a tiny random Llama checkpoint in the Hugging Face layout (with a byte-level
tokenizer.json): what it writes, and its promises (issue 31): the source is never modified, no
finished-looking output unless complete, bad input exits 2 with one line."""

import errno
import json
import os
import pathlib
import shutil
import subprocess

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


def _byte_tokenizer(first_id=0):
    """A tokenizer.json that maps each UTF-8 byte to one id (GPT-2's byte alphabet, no merges)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={c: first_id + i for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return tokenizer


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    jb.zoo.save_llama(directory, jb.zoo.Llama(CONFIG, rngs=nnx.Rngs(0)))
    _byte_tokenizer().save(str(directory / "tokenizer.json"))
    return directory


def _copy(src, tmp_path, name="model"):
    return pathlib.Path(shutil.copytree(src, tmp_path / name))


def _files(directory):
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def compressed(src, tmp_path_factory):
    dst = tmp_path_factory.mktemp("out") / "int4"   # AWQ then GPTQ: folded norms as well as int4 kernels
    assert cli.main(["compress", str(src), "--out", str(dst), "--recipe", "awq+gptq-int4", "--export-hf",
                     "--export", "compressed-tensors", *ARGS]) == 0
    return dst


def test_writes_a_checkpoint_a_report_of_every_linear_and_the_config(compressed, src):
    assert json.loads((compressed / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    report = (compressed / "report.md").read_text()
    for layer in range(CONFIG.num_layers):
        for linear in LINEARS:
            assert f"layers/{layer}/{linear}/kernel" in report, linear
    assert "perplexity" in report and "awq + gptq int4 g128" in report
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
    # AWQ folded 1/s into the norms (the source's are ones): both exports write the folded ones
    norm = np.asarray(restored["layers"][1]["post_attention_layernorm"]["scale"].get_value())
    assert not np.allclose(norm, 1.0)
    np.testing.assert_array_equal(exported.layers[1].post_attention_layernorm.scale.get_value(), norm)
    from safetensors.numpy import load_file
    tensors = load_file(str(compressed / "compressed-tensors" / "model.safetensors"))
    np.testing.assert_array_equal(tensors["model.layers.1.post_attention_layernorm.weight"], norm)


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


# The destination: checked before any work, never the source, replaced in one step (issue 31, items 1, 12, 17, 23)

@pytest.mark.parametrize("where", ["src", "parent", "inside"])
def test_out_that_is_above_or_inside_the_source_is_refused_and_the_source_kept(src, tmp_path, capsys, where):
    model = _copy(src, tmp_path)
    (tmp_path / "unrelated.txt").write_text("keep me")
    before = _files(tmp_path)
    out = {"src": model, "parent": tmp_path, "inside": model / "int8"}[where]
    assert "source checkpoint" in _fails(capsys, str(model), "--out", str(out), "--recipe", "int8", "--overwrite",
                                         *ARGS)
    assert _files(tmp_path) == before


def test_destination_problems_are_found_before_loading(src, tmp_path, capsys, monkeypatch):
    loads = []
    monkeypatch.setattr(jb.zoo, "load_llama", lambda *a, **k: loads.append(1))
    (tmp_path / "file").write_text("")
    assert "not a writable folder" in _fails(capsys, str(src), "--out", str(tmp_path / "file" / "out"),
                                             "--recipe", "int8", *ARGS)
    assert not loads


def test_out_dot_writes_into_the_empty_working_folder(src, tmp_path, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert cli.main(["compress", str(src), "--out", ".", "--recipe", "int8", *ARGS]) == 0
    assert (here / "report.md").exists() and (here / "checkpoint").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]


def test_source_file_and_recipe_folder_are_named_as_such(src, tmp_path, capsys):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    err = _fails(capsys, str(tmp_path / "model.safetensors"), "--out", str(tmp_path / "o"), "--recipe", "int8")
    assert "is not a directory" in err and "does not exist" not in err
    (tmp_path / "r.toml").mkdir()
    err = _fails(capsys, str(src), "--out", str(tmp_path / "o"), "--recipe", str(tmp_path / "r.toml"))
    assert "is a directory" in err and "does not exist" not in err


def test_interrupt_exits_130_in_one_line_and_leaves_nothing(src, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(jb.oneshot, "compress", interrupted)
    assert cli.main(["compress", str(src), "--out", str(tmp_path / "dst"), "--recipe", "int8", *ARGS]) == 130
    err = capsys.readouterr().err.split("\r")[-1]
    assert err == "jaxopt-big: interrupted\n"
    assert list(tmp_path.iterdir()) == []


def test_overwriting_a_file_leaves_no_hidden_file(src, tmp_path):
    out = tmp_path / "out.txt"
    out.write_text("old")
    assert cli.main(["compress", str(src), "--out", str(out), "--recipe", "int8", "--overwrite", *ARGS]) == 0
    assert (out / "report.md").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_an_interrupt_while_replacing_keeps_a_visible_destination(src, tmp_path, monkeypatch):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    rename = os.rename

    def interrupted_onto_dst(a, b, *args, **kwargs):  # the moment between moving the old aside and the new in
        if pathlib.Path(b) == dst:
            raise KeyboardInterrupt
        return rename(a, b, *args, **kwargs)
    monkeypatch.setattr(os, "rename", interrupted_onto_dst)
    code = cli.main(["compress", str(src), "--out", str(dst), "--recipe", "int8", "--overwrite", *ARGS])
    assert code in (0, 130) and dst.is_dir()
    assert (dst / "report.md").exists() if code == 0 else (dst / "old.txt").exists()


def test_partial_folders_of_dead_runs_are_removed_with_a_line(src, tmp_path, capsys):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".dst.partial-{dead.pid}"
    (stale / "checkpoint").mkdir(parents=True)
    assert cli.main(["compress", str(src), "--out", str(tmp_path / "dst"), "--recipe", "int8", *ARGS]) == 0
    assert f"removed {stale}" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


# Calibration input: text in, the model's tokenizer, any sample count (issue 31, items 3, 4, 16, 19)

def test_binary_calibration_file_is_refused(src, tmp_path, capsys):
    data = tmp_path / "weights.bin"
    data.write_bytes(bytes(range(256)) * 64)
    err = _fails(capsys, str(src), "--out", str(tmp_path / "dst"), "--recipe", "int8", "--calibration", str(data),
                 *ARGS)
    assert "weights.bin" in err and "not UTF-8 text" in err


def test_a_decoder_without_tokenizer_json_is_refused(src, tmp_path, capsys):
    model = _copy(src, tmp_path)
    (model / "tokenizer.json").unlink()
    (model / "tokenizer.model").write_bytes(b"\x0a\x05hello")  # SentencePiece: not read
    err = _fails(capsys, str(model), "--out", str(tmp_path / "dst"), "--recipe", "int8", *ARGS)
    assert "no tokenizer.json (only tokenizer.model, which is not read)" in err


def test_token_ids_outside_the_vocabulary_name_the_tokenizer_and_both_sizes(src, tmp_path, capsys):
    model = _copy(src, tmp_path)
    _byte_tokenizer(first_id=100).save(str(model / "tokenizer.json"))
    err = _fails(capsys, str(model), "--out", str(tmp_path / "dst"), "--recipe", "int8", *ARGS)
    assert "tokenizer.json" in err and "tokenizer has 256 tokens" in err and "vocab_size is 256" in err
    assert "NaN" not in err


def test_a_sample_count_that_8_does_not_divide_calibrates_on_exactly_those_rows(src, tmp_path, monkeypatch):
    seen = []
    real = jb.oneshot.compress

    def spy(model, params, batches, recipe, *, row_mask, **kwargs):
        seen.extend((np.asarray(b[0]), np.asarray(row_mask(b))) for b in batches)
        return real(model, params, batches, recipe, row_mask=row_mask, **kwargs)
    monkeypatch.setattr(jb.oneshot, "compress", spy)
    assert cli.main(["compress", str(src), "--out", str(tmp_path / "dst"), "--recipe", "int8",
                     "--samples", "9", "--length", "32"]) == 0
    assert {ids.shape for ids, _ in seen} == {(8, 32)}
    weights = np.concatenate([w for _, w in seen])
    rows = np.concatenate([ids for ids, _ in seen])[weights[:, 0] > 0]
    assert set(np.unique(weights)) == {0.0, 1.0} and (weights == weights[:, :1]).all()  # whole rows in or out
    assert len(rows) == 9 and len(np.unique(rows, axis=0)) == 9


# Weights: non-finite sources refused, the source's dtype kept, real bytes reported (issue 31, items 5, 10, 13)

def _rewrite_tensors(model, change):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(model / "model.safetensors"))
    save_file(change(tensors), str(model / "model.safetensors"), metadata={"format": "pt"})


def test_a_non_finite_source_weight_outside_the_targets_exits_2_naming_it(src, tmp_path, capsys):
    model = _copy(src, tmp_path)

    def inf_in_head(tensors):
        tensors["lm_head.weight"][3, 5] = np.inf
        return tensors
    _rewrite_tensors(model, inf_in_head)
    assert "lm_head/kernel has 1 NaN or Inf value" in _fails(capsys, str(model), "--out", str(tmp_path / "dst"),
                                                            "--recipe", "int8", *ARGS)
    assert not (tmp_path / "dst").exists()


BF16_CONFIG_EXTRA = {"bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16", "use_cache": True}


@pytest.fixture(scope="module")
def bf16(src, tmp_path_factory):
    """A bfloat16 copy of the source with config fields the model does not use, compressed to int8 + exported."""
    import ml_dtypes

    model = _copy(src, tmp_path_factory.mktemp("bf16"))
    _rewrite_tensors(model, lambda t: {k: v.astype(ml_dtypes.bfloat16) for k, v in t.items()})
    config = {**json.loads((model / "config.json").read_text()), **BF16_CONFIG_EXTRA}
    (model / "config.json").write_text(json.dumps(config))
    dst = model.parent / "int8"
    outcome = jb.hf.compress_checkpoint(model, dst, jb.recipe.preset("int8"), samples=8, length=32, export_hf=True,
                                        progress=False, print_fn=lambda line: None)
    return model, dst, outcome


def test_bytes_are_the_stored_bytes_and_uncompressed_weights_keep_the_source_dtype(bf16):
    from safetensors.numpy import load_file

    model, dst, outcome = bf16
    source = load_file(str(model / "model.safetensors"))
    assert outcome.dense_bytes == sum(v.nbytes for v in source.values())  # 2 bytes per weight, not 4
    _, params = jb.hf.load_compressed(dst)
    assert params["embed_tokens"]["embedding"].get_value().dtype == jnp.bfloat16
    assert params["norm"]["scale"].get_value().dtype == jnp.bfloat16
    assert outcome.compressed_bytes == jb.leaves.nbytes(params) < outcome.dense_bytes
    assert jb.checkpoint.disk_bytes(dst / "checkpoint") < (model / "model.safetensors").stat().st_size
    assert f"{outcome.dense_bytes:,} before" in (dst / "report.md").read_text()


def test_hf_export_keeps_the_source_config_and_dtype(bf16):
    from safetensors.numpy import load_file

    model, dst, _ = bf16
    assert json.loads((dst / "hf" / "config.json").read_text()) == json.loads((model / "config.json").read_text())
    source, exported = load_file(str(model / "model.safetensors")), load_file(str(dst / "hf" / "model.safetensors"))
    assert sorted(exported) == sorted(source) and {str(v.dtype) for v in exported.values()} == {"bfloat16"}
    np.testing.assert_array_equal(exported["model.embed_tokens.weight"], source["model.embed_tokens.weight"])
    _, params = jb.hf.load_compressed(dst)
    kernel = params["layers"][1]["mlp"]["down_proj"]["kernel"].get_value()
    np.testing.assert_array_equal(exported["model.layers.1.mlp.down_proj.weight"],
                                  np.asarray(kernel.dense()).T.astype(exported["model.layers.1.mlp.down_proj.weight"].dtype))


# One list of model families and of presets (issue 27, item 5)

def test_model_families_are_listed_once_and_cli_help_comes_from_the_presets(capsys, monkeypatch):
    assert jb.hf.DECODERS is jb.zoo.DECODERS and jb.hf.ENCODERS is jb.zoo.ENCODERS
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping inside a name
    monkeypatch.setattr(jb.recipe, "PRESETS", {**jb.recipe.PRESETS, "brand-new-preset": None})
    with pytest.raises(SystemExit) as e:
        cli.main(["compress", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0
    assert all(name in help_text for name in jb.recipe.PRESETS) and "brand-new-preset" in help_text


# --recipe auto --bits (issue 30, item 4)

def test_recipe_auto_meets_the_bits_and_reports_the_chosen_bits_per_layer(src, tmp_path):
    dst = tmp_path / "auto"  # round to nearest: the CLI's GPTQ default would compile twice as long
    int4 = jb.quant.QuantSpec(bits=4, granularity=jb.quant.Group(128))
    lines = []
    jb.hf.compress_checkpoint(src, dst, jb.recipe.Auto(bits=5, choices=(4, 8), quantizer=jb.RTN(int4)), samples=8,
                              length=32, progress=False, print_fn=lines.append)
    _, restored = jb.hf.load_compressed(dst)
    kernels = [restored["layers"][i][linear.split("/")[0]][linear.split("/")[1]]["kernel"].get_value()
               for i in range(CONFIG.num_layers) for linear in LINEARS]
    weights, stored = sum(k.size for k in kernels), sum(k.nbytes for k in kernels)
    assert {k.bits for k in kernels} == {4, 8}                  # mixed, within the budget, and it is used:
    assert stored <= 5 * weights / 8 < stored + min(k.size for k in kernels if k.bits == 4) * (8 - 4) / 8
    line = f"auto: {8 * stored / weights:.4g} bits per weight achieved for 5 asked (scales included) over 14 layers"
    counts = f"{sum(k.bits == 4 for k in kernels)} at 4, {sum(k.bits == 8 for k in kernels)} at 8"
    assert any(p.startswith(line) for p in lines) and f"- {line}: {counts} bits" in (dst / "report.md").read_text()
    report = (dst / "report.md").read_text()
    for layer in range(CONFIG.num_layers):  # the per-layer table gives each layer's chosen bits
        for linear, k in zip(LINEARS, kernels[layer * len(LINEARS):]):
            assert f"| layers/{layer}/{linear} | rtn int{k.bits} g128 |" in report
    saved = jb.recipe.load(dst / "recipe.toml")  # the chosen bits, as a recipe file
    assert {r.pattern: r.value.quantizer.spec.bits for r in saved.rules[1:]} == {
        f"layers/{i}/{linear}/kernel": k.bits for i in range(CONFIG.num_layers)
        for linear, k in zip(LINEARS, kernels[i * len(LINEARS):])}


def test_cli_recipe_auto_passes_bits_and_choices(src, tmp_path, monkeypatch):
    got = []
    monkeypatch.setattr(jb.hf, "compress_checkpoint", lambda src, dst, recipe, **kw: got.append(recipe))
    assert cli.main(["compress", str(src), "--out", str(tmp_path / "a"), "--recipe", "auto", "--bits", "4.25"]) == 0
    assert cli.main(["compress", str(src), "--out", str(tmp_path / "b"), "--recipe", "auto", "--bits", "3.5",
                     "--choices", "3,4"]) == 0
    assert got == [jb.recipe.Auto(bits=4.25), jb.recipe.Auto(bits=3.5, choices=(3, 4))]
    assert got[0].choices == (2, 3, 4, 5, 6, 8) and got[0].plan(4) == jb.recipe.PRESETS["gptq-int4"][0]


@pytest.mark.parametrize("argv, message", [
    (("--recipe", "auto"), "--recipe auto needs --bits: average bits per weight, scales included (e.g. 4.25)"),
    (("--recipe", "int8", "--bits", "4.25"), "--bits and --choices go with --recipe auto only, not with --recipe"),
    (("--recipe", "auto", "--bits", "0"), "Auto.bits must be a finite number > 0, got 0.0"),
    (("--recipe", "auto", "--bits", "4", "--choices", "4,9"), "QuantSpec.bits must be an int in [2, 8], got 9")])
def test_recipe_auto_without_bits_or_bits_without_auto_exit_2_in_one_line(src, tmp_path, capsys, argv, message):
    assert message in _fails(capsys, str(src), "--out", str(tmp_path / "dst"), *argv)
    assert not (tmp_path / "dst").exists()


# Resume and profile (issue 29)

def test_a_run_interrupted_after_a_block_resumes_to_the_uninterrupted_result(src, compressed, tmp_path, capsys,
                                                                            monkeypatch):
    dst, original, calls = tmp_path / "dst", jb.oneshot.compress, []

    def stop_after_first_block(*args, on_block, **kwargs):
        def save_then_stop(name, leaves, rows):
            on_block(name, leaves, rows)
            calls.append(name)
            if len(calls) == 1:
                raise KeyboardInterrupt  # as if killed once the first block is on disk
        return original(*args, on_block=save_then_stop, **kwargs)
    monkeypatch.setattr(jb.oneshot, "compress", stop_after_first_block)
    argv = ["compress", str(src), "--out", str(dst), "--recipe", "awq+gptq-int4", *ARGS]  # folds resume too
    assert cli.main(argv) == 130
    assert not dst.exists() and len(list(tmp_path.glob(".dst.partial-*/blocks/*.pkl"))) == 1
    capsys.readouterr()
    assert cli.main([*argv, "--resume", "--profile"]) == 0
    out = capsys.readouterr().out
    assert calls == ["layers/0", "layers/1"]  # the resumed run compressed only the second block
    assert "resuming" in out and "1 finished block" in out
    for phase in ("load", "capture", "calibrate", "solve", "propagate", "assemble", "write"):
        assert f"profile: {phase} " in out, phase
    assert "s per block (2 blocks), peak resident memory" in out.splitlines()[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]
    _, resumed = jb.hf.load_compressed(dst)
    _, whole = jb.hf.load_compressed(compressed)
    resumed, whole = nnx.to_pure_dict(resumed), nnx.to_pure_dict(whole)
    assert jb.tree.paths(resumed) == jb.tree.paths(whole)
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(whole)):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


# Rotation before calibration (issue 30, item 3)

def test_rotate_compresses_a_rotated_model_that_reloads_to_the_same_logits(src, compressed, tmp_path):
    import jax

    dst = tmp_path / "rotated"
    assert cli.main(["compress", str(src), "--out", str(dst), "--recipe", "int8", "--rotate", *ARGS]) == 0
    config = json.loads((dst / "config.json").read_text())
    assert config["jaxopt_big_online_hadamard"] is True
    with jb.checkpoint.Manager(dst / "checkpoint") as manager:
        assert manager.extra(0)["rotation"] == {"mode": "online", "seed": jb.hf.ROTATION_SEED}
    # the float rotation changes nothing: perplexity before is the unrotated source's
    before = lambda d: (d / "report.md").read_text().split("perplexity: ")[1].split(" before")[0]  # noqa: E731
    assert before(dst) == before(compressed)
    model, params = jb.hf.load_compressed(dst)
    nnx.update(model, jb.leaves.densify(params))
    reference = jb.zoo.rotate(jb.zoo.load_llama(src), key=jax.random.key(jb.hf.ROTATION_SEED))
    nnx.update(reference, jb.leaves.densify(params))  # the rotated model, with the compressed weights
    ids = jnp.asarray(jb.data.encode("def f(x): return x * 2  # a test line of thirty-two")[None, :32])
    forward = nnx.jit(lambda m: m(ids))  # one compile for both: eager calls take seconds
    np.testing.assert_allclose(forward(model), forward(reference), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("export", [("--export-hf",), ("--export", "gguf"), ("--export", "compressed-tensors")])
def test_rotate_online_refuses_exports_other_tools_read_in_one_line(src, tmp_path, capsys, export):
    dst = tmp_path / "dst"
    err = _fails(capsys, str(src), "--out", str(dst), "--recipe", "gptq-q4_0", "--rotate", *export, *ARGS)
    assert "online Hadamard" in err and "--rotate offline" in err
    assert not dst.exists() and not list(tmp_path.glob(".dst*"))


def test_rotate_is_refused_for_an_encoder_and_read_from_a_recipe_file(src, tmp_path, capsys):
    encoder = tmp_path / "bert"
    encoder.mkdir()
    (encoder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    err = _fails(capsys, str(encoder), "--out", str(tmp_path / "o"), "--recipe", "int8", "--rotate")
    assert "only decoders" in err and "'bert'" in err
    recipe = tmp_path / "r.toml"
    recipe.write_text('rotate = "offline"\n[[rule]]\npattern = "layers/.*"\nquant = { bits = 8 }\n')
    assert jb.hf.read_recipe(recipe).rotate is jb.recipe.Rotate.OFFLINE
    recipe.write_text('rotate = 1\n[[rule]]\npattern = "layers/.*"\n')
    assert "rotate must be true, false, 'online' or 'offline', got 1" in _fails(
        capsys, str(src), "--out", str(tmp_path / "o"), "--recipe", str(recipe))
