"""The options of `shotcache bench` (kept free of heavy imports: the CLI builds its parser from them)."""

from __future__ import annotations

import argparse
from pathlib import Path

SECTIONS = ("encoder", "decode", "cache", "served", "accuracy", "methods", "memory", "cluster")
# Run by default: all but `cluster`, which needs the `postgres` extra and
# Debian's PostgreSQL (it starts its own server and two replicas): `--only cluster`.
DEFAULT_SECTIONS = tuple(s for s in SECTIONS if s != "cluster")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny sizes and short timings (a smoke run)")
    parser.add_argument(
        "--only",
        action="append",
        choices=SECTIONS,
        help="run only this section (repeatable); default: all but cluster",
    )
    parser.add_argument(
        "--models",
        default="offline,ViT-B-32",
        help="comma-separated models for the encoder section: offline (the stand-in) and open_clip names "
        "(random init); default: offline,ViT-B-32",
    )
    parser.add_argument("--write", type=Path, help="replace the `shotcache bench` section of this markdown file")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--note", help="a line printed in bold under the header (e.g. 'preliminary')")
    parser.add_argument("--threads", type=int, help="threads for every pool (default: SHOTCACHE_THREADS)")
