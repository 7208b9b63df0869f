"""`shotcache` command line: serve, eval, build-offline-model (api.cli adds the client commands and `bench`)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from cache_models import METHODS

from .settings import Settings


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _template_set_name(text: str) -> str:
    from .encoder.prompts import template_set

    try:
        template_set(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _methods(text: str) -> list[str]:
    if text == "all":
        return [*METHODS, "auto"]
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in (*METHODS, "auto")]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown}; valid: all, auto, {', '.join(METHODS)}")
    return names


def setting_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The settings given on the command line (they win over SHOTCACHE_ variables)."""
    given = {
        "model": getattr(args, "model", None),
        "backend": getattr(args, "backend", None),
        "data_dir": getattr(args, "data_dir", None),
        "host": getattr(args, "host", None),
        "port": getattr(args, "port", None),
    }
    return {key: value for key, value in given.items() if value is not None}


def settings_from_args(args: argparse.Namespace) -> Settings:
    return Settings(**setting_overrides(args))  # type: ignore[arg-type]


def cmd_eval(args: argparse.Namespace) -> int:
    from .encoder import create_encoder
    from .encoder.prompts import template_set
    from .evaluation.datasets import load_folder_dataset
    from .evaluation.run import encode_dataset, evaluate, summary_table

    settings = settings_from_args(args)
    try:
        dataset = load_folder_dataset(Path(args.data))
        if args.train_only:
            dataset = dataset.train_only()
        fewest = min(dataset.train_labels().count(label) for label in range(len(dataset.classes)))
        if max(args.shots) > fewest:
            raise ValueError(
                f"--shots {max(args.shots)} needs that many train images per class; {dataset.name} has {fewest}"
            )
    except ValueError as exc:  # checked before anything is encoded
        print(f"shotcache eval: error: {exc}", file=sys.stderr)
        return 2
    encoder, fallback = create_encoder(settings)
    if fallback:
        print(f"note: evaluating the offline stand-in model ({fallback})", file=sys.stderr)
    templates = None if args.templates is None else template_set(args.templates)
    encoded = encode_dataset(encoder, dataset, views=args.views, progress=not args.quiet, templates=templates)
    from .encoder.factory import ModelDefaults

    default_method = ModelDefaults.for_key(encoder.loaded.config_key).default_method
    rows = evaluate(
        encoded,
        shots=args.shots,
        seeds=args.seeds,
        methods=args.methods,
        scale=encoder.logit_scale,
        default_method=default_method,
        oracle=args.oracle,
        paper=args.paper,
        prompt_weighting=args.prompt_weighting,
    )
    print(
        f"model {encoder.identity.model_id} ({encoder.backend}), data {dataset.name}, views {args.views}, "
        f"templates {args.templates or 'default'}, prompt weighting {args.prompt_weighting:g}"
    )
    print(summary_table(rows))
    if args.json:
        payload = {
            "model": encoder.identity.model_id,
            "backend": encoder.backend,
            "dataset": dataset.name,
            "views": args.views,
            "train_only": args.train_only,
            "templates": args.templates,
            "prompt_weighting": args.prompt_weighting,
            "results": [r.to_dict() for r in rows],
        }
        Path(args.json).write_text(json.dumps(payload, indent=2))
    return 0


def cmd_build_offline_model(args: argparse.Namespace) -> int:
    from .encoder.standin import build_standin, standin_dir

    settings = settings_from_args(args)
    out = Path(args.out) if args.out else standin_dir(settings.data_dir)
    build_standin(out)
    if args.fit_scale_images:
        from .encoder.scale import refit_standin_scale

        scale = refit_standin_scale(out, Path(args.fit_scale_images), threads=settings.threads)
        print(f"fitted logit scale {scale:.3f}")
    print(out)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    if args.engine == "ray":
        # The Ray engine is HTTP-layer code (api/ray_serve.py, above this layer): the `shotcache` command
        # (api.cli) runs it; this module's own entry point serves the single-process engine only.
        print("--engine ray is run by the `shotcache` command (python -m api.cli serve --engine ray)", file=sys.stderr)
        return 2
    from .server import serve

    serve(settings_from_args(args), setting_overrides(args))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shotcache", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", help="override SHOTCACHE_MODEL (e.g. offline, ViT-B-32, local-dir:PATH)")
        p.add_argument("--backend", help="override SHOTCACHE_BACKEND")
        p.add_argument("--data-dir", type=Path, help="override SHOTCACHE_DATA_DIR")

    serve = sub.add_parser("serve", help="run the HTTP service")
    model_options(serve)
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument(
        "--engine",
        choices=("uvicorn", "ray"),
        default="uvicorn",
        help="uvicorn: one process (default); ray: --replicas replicas under Ray Serve (extra `ray`, "
        "needs SHOTCACHE_STORE=postgresql://...)",
    )
    serve.add_argument("--replicas", type=int, default=2, help="replicas for --engine ray (default 2)")
    serve.set_defaults(func=cmd_serve)

    ev = sub.add_parser("eval", help="few-shot accuracy of every method on a labelled image folder")
    model_options(ev)
    ev.add_argument("--data", required=True, help="folder with train/<class>/* and test/<class>/*")
    ev.add_argument("--shots", type=_int_list, default=[1, 2, 4, 8, 16])
    ev.add_argument("--seeds", type=_int_list, default=[1, 2, 3])
    ev.add_argument("--methods", type=_methods, default=[*METHODS, "auto"], help="comma-separated, or all")
    ev.add_argument("--oracle", action="store_true", help="also report each method tuned on TEST (an upper bound)")
    ev.add_argument("--paper", action="store_true", help="also report each method at its papers' default values")
    ev.add_argument("--views", type=int, default=1)
    ev.add_argument(
        "--train-only",
        action="store_true",
        help="never read the test split: per class, shots come from the first half of the train images (by "
        "file name) and the second half is scored (to choose rules on train data only)",
    )
    ev.add_argument(
        "--templates",
        type=_template_set_name,
        help="prompt template set by name (app/encoder/configs/templates.json); default: the model's",
    )
    ev.add_argument(
        "--prompt-weighting",
        type=_non_negative,
        default=0.0,
        metavar="GAMMA",
        help="weigh each class's prompts by softmax(GAMMA * cos(prompt, its shots' mean)) instead of averaging "
        "them (TIMO; needs several prompts per class, e.g. --templates clip-simple-7); default 0: the plain mean",
    )
    ev.add_argument("--json", help="write the results here")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(func=cmd_eval)

    build = sub.add_parser("build-offline-model", help="build the offline stand-in vision-language model")
    model_options(build)
    build.add_argument("--out", help="output folder (default: <data dir>/models/offline-standin)")
    build.add_argument("--fit-scale-images", help="refit the logit scale on the (unlabelled) images in this folder")
    build.set_defaults(func=cmd_build_offline_model)
    return parser


def configure_logging(*, debug: bool = False) -> None:
    """Our loggers at INFO; third-party ones (open_clip logs every loading step at INFO) at WARNING."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("app", "api", "cache_models"):
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(debug=args.verbose)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
