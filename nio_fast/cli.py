"""The ``nio-fast`` command line (also ``python -m nio_fast``).

    nio-fast demo [--seeds N] [--steps N] [--out DIR] [--quick]
    nio-fast init MODEL --data DATA --out FILE.pt [initialize options]
    nio-fast gradcosine MODEL --data DATA [--sub-batches D] [--overlap R] [--mode M]

A mistake on the command line (a bad path, constructor, import or value) ends with exit
code 2 and one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

logger = logging.getLogger("nio_fast")

PROG = "nio-fast"
EXIT_USAGE = 2


class UsageError(Exception):
    """A mistake in what the user asked for: reported in one line, exit code 2."""


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a parsing error is one line on stderr (exit code 2), not usage + error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --------------------------------------------------------------------------------------
# Models and data named on the command line
# --------------------------------------------------------------------------------------

def load_model(spec: str, kwargs_json: Optional[str] = None, seed: Optional[int] = None):
    """Build the model named by ``module:callable`` with keyword arguments from JSON.

    With ``seed``, the global RNG is seeded first so that the initial draw is reproducible.
    Raises UsageError with a one-line reason for every way the spec can be wrong.
    """
    import torch
    from torch import nn

    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute:
        raise UsageError(
            f"MODEL must look like 'module:callable' (e.g. nio_fast.models:digits_mlp), got {spec!r}"
        )
    kwargs: dict[str, Any] = {}
    if kwargs_json:
        try:
            kwargs = json.loads(kwargs_json)
        except json.JSONDecodeError as error:
            raise UsageError(f"--model-kwargs is not valid JSON ({error}): {kwargs_json!r}") from None
        if not isinstance(kwargs, dict):
            raise UsageError(f"--model-kwargs must be a JSON object like '{{\"depth\": 8}}', got {kwargs_json!r}")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        hint = " (pip install torchvision)" if module_name.split(".")[0] == "torchvision" else ""
        raise UsageError(f"cannot import module {module_name!r}: {error}{hint}") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise UsageError(f"module {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise UsageError(f"{spec!r} is not callable")
    if seed is not None:
        torch.manual_seed(seed)
    try:
        model = target(**kwargs)
    except (TypeError, ValueError) as error:
        raise UsageError(f"building {spec} with {kwargs} failed: {error}") from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"{spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def choose_digits_layout(model) -> str:
    """The first digits layout (flat, image, rgb32) that ``model`` accepts.

    Tried on two samples in eval mode without gradients, so that no BatchNorm statistic or
    other state changes; the model's training flags are restored afterwards.
    """
    import torch
    from nio_fast.data import DIGITS_LAYOUTS, digits_tensors

    was_training = {module: module.training for module in model.modules()}
    failures = []
    try:
        model.eval()
        with torch.no_grad():
            for layout in DIGITS_LAYOUTS:
                try:
                    model(digits_tensors("train", layout)[0][:2])
                    return layout
                except Exception as error:  # any failure only means "not this layout"
                    failures.append(f"{layout}: {str(error).splitlines()[0] if str(error) else type(error).__name__}")
    finally:
        for module, training in was_training.items():
            module.training = training
    raise UsageError("the model accepts none of the digits layouts (" + "; ".join(failures) + ")")


def load_data(data: str, model, batch_size: int, seed: int, layout: str, image_size: int):
    """A DataLoader for ``--data``: the built-in digits or an ImageFolder directory."""
    from nio_fast.data import digits_loader, image_folder_loader

    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    if data == "digits":
        if layout == "auto":
            layout = choose_digits_layout(model)
            logger.info("digits layout: %s", layout)
        return digits_loader("train", layout, batch_size=batch_size, seed=seed)
    try:
        return image_folder_loader(data, batch_size=batch_size, image_size=image_size, seed=seed)
    except (OSError, ValueError, ImportError) as error:
        raise UsageError(str(error)) from None


# --------------------------------------------------------------------------------------
# Subcommands
# --------------------------------------------------------------------------------------

def _build_inputs(args: argparse.Namespace):
    model = load_model(args.model, args.model_kwargs, args.seed)
    loader = load_data(args.data, model, args.batch_size, args.seed or 0, args.digits_layout, args.image_size)
    return model, loader


def _first_batch(loader):
    for batch in loader:
        return batch
    raise UsageError("--data yields no batches")


def _output_paths(out: str) -> tuple[Path, Path]:
    state_path = Path(out)
    if state_path.suffix == ".json":
        raise UsageError(f"--out must not end in .json: the report is written beside it as .json ({out!r})")
    if state_path.is_dir():
        raise UsageError(f"--out {out!r} is a folder; give a file name such as {out.rstrip('/')}/model.pt")
    try:
        state_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"cannot create the folder for --out {out!r}: {error}") from None
    return state_path, state_path.with_suffix(".json")


def _recompute_classes(model, names: Optional[str]) -> Optional[list[type]]:
    """``--recompute``'s class names as the classes of MODEL's modules that bear them."""
    if names is None:
        return None
    present = {type(module).__name__: type(module) for module in model.modules()}
    chosen = []
    for name in (part.strip() for part in names.split(",")):
        if name not in present:
            raise UsageError(f"--recompute: MODEL has no module of class {name!r} (it has: "
                             f"{', '.join(sorted(present))})")
        chosen.append(present[name])
    return chosen


def command_init(args: argparse.Namespace) -> int:
    """``nio-fast init``: initialize, save the state_dict and the report."""
    import torch
    import nio_fast

    state_path, report_path = _output_paths(args.out)
    model, loader = _build_inputs(args)
    try:
        report = nio_fast.initialize(
            model, loader, method=args.method, iters=args.iters, sub_batches=args.sub_batches,
            overlap=args.overlap, gamma=args.gamma, lr=args.lr, min_scale=args.min_scale,
            grad_clip=args.grad_clip, objective=args.objective, mu=args.mu, mode=args.mode,
            progress=not args.no_progress, seed=args.seed, inner=args.inner, eta=args.eta,
            recompute=_recompute_classes(model, args.recompute),
        )
    except (ValueError, TypeError) as error:
        raise UsageError(str(error)) from None
    torch.save(model.state_dict(), state_path)
    record = report.to_dict()
    record["invocation"] = {"model": args.model, "model_kwargs": args.model_kwargs, "data": args.data,
                            "batch_size": args.batch_size, "state_dict": str(state_path)}
    report_path.write_text(json.dumps(record, indent=2) + "\n")

    print(f"{report.method}: {len(report.history)} iterations in {report.seconds:.2f} s"
          + (" (stopped early: " + str(report.stop_reason) + ")" if report.stopped_early else ""))
    if report.history and "gradcosine" in report.history[0]:
        print(f"GradCosine on its batches: first {report.history[0]['gradcosine']:.4f}, "
              f"last {report.history[-1]['gradcosine']:.4f}")
    print(f"saved the state_dict to {state_path} and the report to {report_path}")
    return 0


def command_gradcosine(args: argparse.Namespace) -> int:
    """``nio-fast gradcosine``: GradCosine, norms and Gram on the first batch."""
    import nio_fast

    model, loader = _build_inputs(args)
    batch = _first_batch(loader)
    try:
        result = nio_fast.gradcosine(model, batch, sub_batches=args.sub_batches, overlap=args.overlap,
                                     mode=args.mode, recompute=_recompute_classes(model, args.recompute))
    except (ValueError, TypeError) as error:
        raise UsageError(str(error)) from None
    numbers = {
        "gradcosine": result.value.item(),
        "norms": result.norms.tolist(),
        "gram": result.gram.tolist(),
        "batch_size": int(batch[1].shape[0]),
        "sub_batches": args.sub_batches,
        "overlap": args.overlap,
        "mode": args.mode,
    }
    if args.json:
        print(json.dumps(numbers))
        return 0
    print(f"GradCosine: {numbers['gradcosine']:.6f}  ({len(result.chunks)} sub-batches of a batch of "
          f"{numbers['batch_size']}, overlap {args.overlap}, mode {result.mode})")
    print("norms: " + " ".join(f"{n:.6g}" for n in numbers["norms"]))
    print("Gram:")
    for row in numbers["gram"]:
        print("  " + " ".join(f"{g:12.6g}" for g in row))
    return 0


def command_demo(args: argparse.Namespace) -> int:
    """``nio-fast demo``: compare initializations on the digits (see nio_fast.demo)."""
    from nio_fast.demo import DemoConfig, run_demo

    config = DemoConfig.quick() if args.quick else DemoConfig()
    overrides = {"seeds": args.seeds, "steps": args.steps, "model": args.model}
    for name, value in overrides.items():
        if value is not None:
            setattr(config, name, value)
    config.early_step = min(config.early_step, config.steps)  # a short --steps moves it
    config.out = Path(args.out)
    config.progress = not args.no_progress
    try:
        config.validate()
    except ValueError as error:
        raise UsageError(str(error)) from None
    run_demo(config)
    return 0


# --------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------

def _float_or_none(text: str) -> Optional[float]:
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def _initialize_defaults() -> dict[str, Any]:
    """initialize's own defaults, so that the command line never disagrees with the API."""
    import nio_fast

    return {name: parameter.default for name, parameter in inspect.signature(nio_fast.initialize).parameters.items()
            if parameter.default is not inspect.Parameter.empty}


def _add_model_and_data(parser: argparse.ArgumentParser, batch_size_help: str) -> None:
    parser.add_argument("model", metavar="MODEL",
                        help="constructor as module:callable, e.g. nio_fast.models:digits_mlp or "
                             "torchvision.models:resnet18")
    parser.add_argument("--model-kwargs", metavar="JSON", default=None,
                        help="keyword arguments for MODEL as a JSON object, e.g. '{\"num_classes\": 10}'")
    parser.add_argument("--data", required=True, metavar="DATA",
                        help="'digits' (built-in, scikit-learn's 8x8 digits) or an ImageFolder directory "
                             "(root/<class>/<image>; needs torchvision)")
    parser.add_argument("--batch-size", type=int, default=64, help=batch_size_help + " (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seeds the model's construction, the data order and the run (default: unseeded)")
    parser.add_argument("--digits-layout", default="auto", choices=("auto", "flat", "image", "rgb32"),
                        help="how digits reach the model: [N,64], [N,1,8,8] or [N,3,32,32]; auto takes the "
                             "first the model accepts (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=224,
                        help="ImageFolder images are resized and centre-cropped to this (default: %(default)s)")


def _sub_batches(text: str) -> Union[int, str]:
    """An integer D, or "samples" (one chunk per sample); the API checks the value."""
    if text == "samples":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 2 or 'samples', got {text!r}") from None


def _add_sampling(parser: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    parser.add_argument("--sub-batches", type=_sub_batches, default=defaults["sub_batches"],
                        help="D >= 2 contiguous sub-batches per batch, or 'samples' for one per sample "
                             "(sample-wise GradCosine) (default: %(default)s)")
    parser.add_argument("--overlap", type=float, default=defaults["overlap"],
                        help="overlap r in [0, 1) between neighbouring sub-batches (default: %(default)s)")
    parser.add_argument("--mode", default=defaults["mode"],
                        help="auto, exact (whole-batch forward), exact_recompute (exact with one chunk's "
                             "graph in memory at a time), per_chunk, or factors (per-sample Gram from layer "
                             "factors) (default: %(default)s)")
    parser.add_argument("--recompute", default=None, metavar="CLASS[,CLASS...]",
                        help="module classes of MODEL (by name, e.g. BasicBlock or TransformerEncoderLayer) "
                             "recomputed instead of kept with --sub-batches samples: memory near a training "
                             "step's for about 1.3-1.5x the time (default: none)")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``nio-fast`` and its three subcommands."""
    defaults = _initialize_defaults()
    parser = _OneLineParser(
        prog=PROG,
        description="Give a network a better starting point before training: NIO (learned "
                    "per-tensor scales that maximise GradCosine under a gradient-norm bound), "
                    "GradInit, and the fractional moment-preserving initializer.",
        epilog="Run 'nio-fast COMMAND --help' for the options of a command.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details to stderr")
    # -v also after the command; SUPPRESS keeps a subcommand from resetting the program's -v.
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="log progress details to stderr")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo", parents=[verbose], help="compare initializations on the built-in digits (what 'make demo' runs)",
        description="Train the same network on scikit-learn's digits from four starting points "
                    "(PyTorch default, fractional moment, GradInit, NIO) with identical seeds and "
                    "data order; print a table, write a PNG and a JSON into --out.")
    from nio_fast.demo import MODELS, DemoConfig

    full, quick = DemoConfig(), DemoConfig.quick()
    demo.add_argument("--seeds", type=int, default=None,
                      help=f"number of seeds (default: {full.seeds}; quick: {quick.seeds})")
    demo.add_argument("--steps", type=int, default=None,
                      help=f"SGD steps per run (default: {full.steps}; quick: {quick.steps})")
    demo.add_argument("--out", default=str(full.out), help="output folder (default: %(default)s)")
    demo.add_argument("--quick", action="store_true", help="a few seconds' run with tiny settings, for tests")
    demo.add_argument("--model", default=None, choices=tuple(MODELS),
                      help=f"the network: a small CNN or a deep ReLU MLP (default: {full.model})")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(handler=command_demo)

    init = commands.add_parser(
        "init", parents=[verbose], help="initialize a model with NIO or GradInit and save its state_dict",
        description="Run nio_fast.initialize on MODEL with DATA; save the state_dict to --out "
                    "and the report as JSON beside it (same name, .json).")
    _add_model_and_data(init, "samples per batch")
    init.add_argument("--out", required=True, metavar="FILE.pt", help="where to save the state_dict")
    init.add_argument("--method", default=defaults["method"], help="nio or gradinit (default: %(default)s)")
    init.add_argument("--iters", type=int, default=defaults["iters"], help="iterations (default: %(default)s)")
    _add_sampling(init, defaults)
    init.add_argument("--gamma", type=_float_or_none, default=defaults["gamma"],
                      help="gradient-norm bound; none measures it on the first batch (default: %(default)s)")
    init.add_argument("--lr", type=float, default=defaults["lr"],
                      help="learning rate of the scale optimizer, Adam (default: %(default)s)")
    init.add_argument("--min-scale", type=float, default=defaults["min_scale"],
                      help="lower bound of every non-bias scale (default: %(default)s)")
    init.add_argument("--grad-clip", type=_float_or_none, default=defaults["grad_clip"],
                      help="clip each scale gradient to [-c, c]; none: no clipping (default: %(default)s)")
    init.add_argument("--objective", default=defaults["objective"],
                      help="NIO objective: gc, gc_gn or gc_gn_sqrt (default: %(default)s)")
    init.add_argument("--mu", type=float, default=defaults["mu"],
                      help="weight of the norm term of gc_gn and gc_gn_sqrt (default: %(default)s)")
    init.add_argument("--inner", default=defaults["inner"],
                      help="GradInit's inner optimizer: sgd or adam (default: %(default)s)")
    init.add_argument("--eta", type=float, default=defaults["eta"],
                      help="GradInit's inner step size (default: %(default)s)")
    init.add_argument("--no-progress", action="store_true", help="no progress bar")
    init.set_defaults(handler=command_init)

    gradcosine = commands.add_parser(
        "gradcosine", parents=[verbose], help="measure GradCosine of a model on one batch",
        description="Print GradCosine (the mean pairwise cosine of sub-batch gradients), the "
                    "sub-batch gradient norms and their Gram matrix, on the first batch of DATA.")
    _add_model_and_data(gradcosine, "samples in the batch")
    _add_sampling(gradcosine, defaults)
    gradcosine.add_argument("--json", action="store_true", help="print the numbers as one JSON object")
    gradcosine.set_defaults(handler=command_gradcosine)
    return parser


def _configure_logging(verbose: bool) -> None:
    if not any(isinstance(handler, logging.StreamHandler) for handler in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbose else logging.WARNING)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``nio-fast`` with ``argv`` (default: sys.argv[1:]); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help (0) or a parsing error (2): return, don't exit
        return stop.code if isinstance(stop.code, int) else EXIT_USAGE
    _configure_logging(args.verbose)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except UsageError as error:
        print(f"{PROG} {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
