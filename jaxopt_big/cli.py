"""The ``jaxopt-big`` command.

``jaxopt-big compress SRC --out DST --recipe R`` compresses a Hugging Face checkpoint (see
:mod:`jaxopt_big.hf`); ``jaxopt-big demo`` trains the reference CNN on the embedded digits data,
compresses it every way the library supports and prints one table (see :mod:`jaxopt_big.demo`);
``jaxopt-big report DIR`` prints the per-layer table of a saved checkpoint, read back and rebuilt
from its files; ``jaxopt-big generate DIR --prompt TEXT`` continues a prompt with a compressed
(or Hugging Face-layout) decoder and prints the text and its speed. Bad input (options, directories,
recipes, an unwritable ``--out``, an unreadable checkpoint) exits with status 2 and a one-line message;
an interrupt (Ctrl-C) exits with 130 and one line. A subcommand is one ``_add_*`` function that declares
its options and the function that runs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, no usage dump or traceback
        self.exit(2, f"{self.prog}: error: {message}\n")


def _at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an int >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {value}")
        return value
    return parse


def _fraction(text: str) -> float:
    """An argparse type: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def _bit_widths(text: str) -> tuple[int, ...]:
    """An argparse type: ``b[,b...]``, bit widths."""
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected bit widths b[,b...] (e.g. 2,3,4,8), got {text!r}")
    return tuple(int(p) for p in parts)


def _mesh_axes(text: str) -> dict[str, int]:
    """An argparse type: ``axis=size[,axis=size...]`` over the axes of ``jb.parallel.make_mesh``."""
    axes = {}
    for part in text.split(","):
        name, _, size = part.partition("=")
        name = name.strip()
        if name not in ("data", "fsdp", "tensor") or not size.strip().lstrip("-").isdigit():
            raise argparse.ArgumentTypeError(f"expected axis=size[,axis=size...] over data, fsdp and tensor "
                                             f"(e.g. data=8 or data=2,fsdp=4), got {text!r}")
        axes[name] = int(size)
    return axes


def _demo(args: argparse.Namespace) -> int:
    from jaxopt_big import demo

    try:
        out = demo.writable(args.out)  # before minutes of training
        demo.run(quick=args.quick, seed=args.seed, out=out)
    except OSError as e:  # a late failure (disk full) is one line too
        print(f"jaxopt-big: error: --out: {e}", file=sys.stderr)
        return 2
    return 0


def _parameters(tree: Any) -> Any:
    """The parameters of a saved ``TrainState`` (restored as a dict), else the whole saved tree."""
    return tree["params"] if isinstance(tree, dict) and {"params", "opt_state"} <= tree.keys() else tree


def _report(args: argparse.Namespace) -> int:
    from jaxopt_big import checkpoint, report

    directory = pathlib.Path(args.checkpoint_dir)
    if not directory.is_dir():
        problem = "is not a directory" if directory.exists() else "does not exist"
        print(f"jaxopt-big: error: checkpoint directory {str(directory)!r} {problem}", file=sys.stderr)
        return 2
    manager = checkpoint.Manager(directory, async_save=False)
    step = manager.latest_step() if args.step is None else args.step
    if step is None:
        print(f"jaxopt-big: error: no checkpoint in {str(directory)!r}", file=sys.stderr)
        return 2
    try:  # what is reported is what restores: truncated or corrupt data is an error, not a table
        extra = manager.extra(step)
        table = report.summary(_parameters(manager.restore(step)))
    except (FileNotFoundError, ValueError) as e:
        print(f"jaxopt-big: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    disk = checkpoint.disk_bytes(manager.step_directory(step))
    print(f"{extra.get('method', directory.name)} (step {step}, {disk:,} bytes on disk)")
    print(table)
    return 0


def _compress(args: argparse.Namespace) -> int:
    from jaxopt_big import hf, parallel
    from jaxopt_big.recipe import Recipe, with_smoothquant

    try:
        hf.model_type(args.src)
        hf.check_destination(args.out, overwrite=args.overwrite, src=args.src)  # before minutes of loading
        recipe = hf.read_recipe(args.recipe, bits=args.bits, choices=args.choices)
        if args.smoothquant is not None:
            if not isinstance(recipe, Recipe):
                raise ValueError("--smoothquant does not go with --recipe auto (it measures without SmoothQuant)")
            recipe = with_smoothquant(recipe, alpha=args.smoothquant)
        if args.rotate is not None:
            if not isinstance(recipe, Recipe):
                raise ValueError("--rotate does not go with --recipe auto (it measures the unrotated model)")
            recipe = dataclasses.replace(recipe, rotate=args.rotate)
        mesh = None
        if args.mesh:
            mesh = parallel.make_mesh(**args.mesh)
        hf.compress_checkpoint(args.src, args.out, recipe, calibration=args.calibration, samples=args.samples,
                               length=args.length, export_hf=args.export_hf, export=args.export,
                               overwrite=args.overwrite, mesh=mesh, resume=args.resume, profile=args.profile)
    except (OSError, ValueError, TypeError) as e:
        print(f"jaxopt-big: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    return 0


def _generate(args: argparse.Namespace) -> int:
    from jaxopt_big import checkpoint, hf, zoo

    directory = pathlib.Path(args.dir)
    try:
        if hf.model_type(directory) not in hf.DECODERS:
            raise ValueError(f"{directory}: generate needs a decoder ({', '.join(hf.DECODERS)})")
        if (directory / "checkpoint").is_dir():  # written by `jaxopt-big compress`
            model, params = hf.load_compressed(directory)
            with checkpoint.Manager(directory / "checkpoint") as manager:
                source = pathlib.Path(manager.extra(0).get("source", directory))
        else:
            model, params, source = zoo.load_llama(directory), None, directory
        encode: Callable[[str], Any]
        decode: Callable[[list[int]], str]
        found = [d / "tokenizer.json" for d in (directory, directory / "hf", source) if (d / "tokenizer.json").exists()]
        if found:
            from tokenizers import Tokenizer
            tokenizer = Tokenizer.from_file(str(found[0]))
            encode, decode = (lambda t: tokenizer.encode(t).ids), (lambda ids: tokenizer.decode(ids))
        else:  # as `compress`: text is never read as byte ids behind the user's back
            raise ValueError(f"{directory}: no tokenizer.json here, in hf/ or in the source folder {source}")
        out = zoo.generate(model, params, [encode(args.prompt)], max_new_tokens=args.max_new_tokens)
    except (OSError, ValueError, TypeError) as e:
        print(f"jaxopt-big: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    print(args.prompt + decode([int(t) for t in out.tokens[0]]))
    print(f"{out.tokens.shape[1]} new tokens: {out.tokens_per_second:.1f} tokens/s decoding "
          f"(prefill {out.prefill_seconds:.2f} s, compile {out.compile_seconds:.1f} s)", file=sys.stderr)
    return 0


def _add_demo(sub: Any) -> None:
    demo = sub.add_parser("demo", help="train on the embedded digits data and compress it every way")
    demo.add_argument("--quick", action="store_true", help="a shorter run (CI size)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="demo-out", help="folder for report.md, results.json, the plot and "
                      "checkpoints (default: demo-out)")
    demo.set_defaults(run=_demo)


def _add_report(sub: Any) -> None:
    rep = sub.add_parser("report", help="print the per-layer table of a saved checkpoint (of a TrainState: "
                                        "its parameters)")
    rep.add_argument("checkpoint_dir", help="a directory written by jaxopt_big.checkpoint.Manager")
    rep.add_argument("--step", type=int, default=None, help="which step (default: the latest)")
    rep.set_defaults(run=_report)


def _add_compress(sub: Any) -> None:
    from jaxopt_big import recipe, zoo

    comp = sub.add_parser("compress", help="compress a Hugging Face checkpoint directory with a recipe")
    comp.add_argument("src", help=f"a directory with config.json, tokenizer.json and safetensors "
                      f"({', '.join(zoo.DECODERS + zoo.ENCODERS)}); it is never modified")
    comp.add_argument("--out", required=True, help="output folder (must not exist or be empty; not SRC, "
                      "above it or inside it)")
    comp.add_argument("--recipe", required=True, help=f"a preset ({', '.join(recipe.PRESETS)}), a .toml "
                      "recipe file, or auto (bits per layer chosen on the checkpoint; needs --bits)")
    comp.add_argument("--bits", type=float, default=None, help="with --recipe auto: average bits per weight of the "
                      "compressed layers, scales included (4.25 = int4 in groups of 128)")
    comp.add_argument("--choices", type=_bit_widths, default=None, help="with --recipe auto: the bit widths a layer "
                      "may get (default 2,3,4,5,6,8; GPTQ, groups of 128, MSE grid)")
    comp.add_argument("--calibration", default=None, help="UTF-8 text file to calibrate on (default: the "
                      "embedded Python documentation)")
    comp.add_argument("--samples", type=_at_least(1), default=128,
                      help="calibration (and held-out) sequences (default 128)")
    comp.add_argument("--length", type=_at_least(2), default=128, help="tokens per sequence (default 128)")
    comp.add_argument("--export-hf", action="store_true", help="also write dequantized safetensors to OUT/hf")
    comp.add_argument("--export", choices=("gguf", "compressed-tensors"), default=None,
                      help="also write OUT/model.gguf (llama.cpp; recipe gptq-q4_0 or q8_0) or OUT/compressed-tensors "
                      "(vLLM, transformers)")
    comp.add_argument("--rotate", nargs="?", const=recipe.Rotate.ONLINE, default=None, type=recipe.Rotate,
                      metavar="{online,offline}",
                      help="rotate a decoder before calibrating (random Hadamard, seed recorded); online (the "
                      "default) adds an online Hadamard before down_proj that only our loaders run; offline "
                      "gives a plain Llama every export can write")
    comp.add_argument("--smoothquant", nargs="?", const=0.5, default=None, type=_fraction, metavar="ALPHA",
                      help="W8A8 with SmoothQuant: move activation outliers into the weights (strength ALPHA in "
                      "[0, 1], default 0.5) and quantize each quantized layer's inputs to int8 per token at run "
                      "time (e.g. --recipe int8 --smoothquant; --recipe w8a8 is W8A8 without it)")
    comp.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT once the new one is complete")
    comp.add_argument("--mesh", type=_mesh_axes, default=None, help="device mesh axes, e.g. data=8 or data=2,fsdp=4")
    comp.add_argument("--resume", action="store_true", help="continue a killed run of the same source, recipe and "
                      "calibration from its last finished block (same result as an uninterrupted run)")
    comp.add_argument("--profile", action="store_true", help="print seconds per phase, time per block and peak memory")
    comp.set_defaults(run=_compress)


def _add_generate(sub: Any) -> None:
    gen = sub.add_parser("generate", help="continue a prompt with a compressed or Hugging Face-layout decoder")
    gen.add_argument("dir", help="a folder written by `jaxopt-big compress`, or config.json + safetensors")
    gen.add_argument("--prompt", required=True, help="the text to continue")
    gen.add_argument("--max-new-tokens", type=_at_least(1), default=64, help="tokens to generate (default 64)")
    gen.set_defaults(run=_generate)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``jaxopt-big`` command line (``argv`` defaults to ``sys.argv[1:]``); returns the exit status."""
    parser = _Parser(prog="jaxopt-big", description="Compress JAX models: prune, quantize, factorize, distill.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (_add_demo, _add_report, _add_compress, _add_generate):
        add(sub)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:  # partial output is already removed by the command; no traceback
        print("jaxopt-big: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
