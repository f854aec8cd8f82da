"""The wheel and sdist that `python -m build` makes install and run the README quickstart."""

import os
import pathlib
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(*args, cwd, env=None):
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{args} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def test_wheel_and_sdist_install_and_pass_the_quickstart(tmp_path):
    dist = tmp_path / "dist"
    # The wheel is built from the sdist, so a file missing from the sdist breaks the wheel too.
    out = _run(sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(ROOT), cwd=tmp_path)
    assert "Warning" not in out.stderr and "deprecated" not in out.stderr.lower(), out.stderr[-3000:]
    (wheel,), (sdist,) = dist.glob("*.whl"), dist.glob("*.tar.gz")
    names = zipfile.ZipFile(wheel).namelist()
    assert "jaxopt_big/py.typed" in names and "jaxopt_big/tree.py" in names
    assert not any(n.startswith("tests/") for n in names)

    for artifact in (wheel, sdist):
        target = tmp_path / artifact.name.replace(".", "_")
        _run(sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
             str(target), str(artifact), cwd=tmp_path)
        env = {**os.environ, "PYTHONPATH": str(target), "JAX_PLATFORMS": "cpu"}
        where = _run(sys.executable, "-c", "import jaxopt_big; print(jaxopt_big.__file__)", cwd=tmp_path, env=env)
        assert where.stdout.strip().startswith(str(target))

    readme = tmp_path / "README.md"
    readme.write_text((ROOT / "README.md").read_text())
    env = {**os.environ, "PYTHONPATH": str(tmp_path / wheel.name.replace(".", "_")), "JAX_PLATFORMS": "cpu"}
    _run(sys.executable, "-m", "doctest", "-o", "NORMALIZE_WHITESPACE", "-o", "ELLIPSIS", str(readme),
         cwd=tmp_path, env=env)
