"""The API reference builds, and every public name has a docstring."""

import importlib
import inspect
import pkgutil
import typing
import warnings

import pdoc

import jaxopt_big


def _public_modules():
    yield jaxopt_big
    for info in pkgutil.walk_packages(jaxopt_big.__path__, "jaxopt_big."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            yield importlib.import_module(info.name)


def test_every_public_name_has_a_docstring():
    missing = []
    for module in _public_modules():
        assert inspect.getdoc(module), f"module {module.__name__} has no docstring"
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            if inspect.ismodule(obj) or typing.get_origin(obj) is not None:
                continue  # submodules are checked themselves; type aliases cannot carry a docstring in 3.11
            own = obj.__doc__ if (inspect.isclass(obj) or callable(obj)) else type(obj).__doc__
            if not (own or "").strip():
                missing.append(f"{module.__name__}.{name}")
    assert not missing, f"public names without a docstring: {missing}"


def test_api_reference_builds(tmp_path):
    pdoc.render.configure(docformat="google")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pdoc.pdoc("jaxopt_big", "jaxopt_big.cli", "jaxopt_big.demo", output_directory=tmp_path)  # as `make docs`
    assert not [str(w.message) for w in caught], "the build warns (an annotation it cannot resolve, ...)"
    pages = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.html")}
    for module in _public_modules():
        assert module.__name__.replace(".", "/") + ".html" in pages
    tree_page = (tmp_path / "jaxopt_big" / "tree.html").read_text()
    assert "Rule" in tree_page and "first match" in tree_page
