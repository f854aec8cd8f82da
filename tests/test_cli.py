import subprocess
import sys

import pytest

from jaxopt_big import cli


def _run(*args):
    return subprocess.run([sys.executable, "-m", "jaxopt_big.cli", *args], capture_output=True, text=True, timeout=600)


def test_unknown_option_exits_2_with_one_line():
    proc = _run("demo", "--no-such-option")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "unrecognized arguments" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_command_exits_2():
    with pytest.raises(SystemExit) as e:
        cli.main([])
    assert e.value.code == 2


def test_a_plain_install_reads_tokenizer_json():
    # every real checkpoint's tokenizer is a tokenizer.json: `jaxopt-big compress` needs `tokenizers` at run time
    import pathlib
    import tomllib

    project = tomllib.loads((pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert any(d.split(">")[0].split("=")[0].strip() == "tokenizers" for d in project["dependencies"])
