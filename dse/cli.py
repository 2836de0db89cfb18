"""``dse`` command line: thin verbs over the library.

Errors the user can fix (bad YAML, unknown field, unreachable storage, bad plan) are printed as
one line ``dse: error: ...`` with exit status 2; Ctrl-C exits with 130 after the running trial is
marked failed (it is retried when the same command runs again).
"""

from __future__ import annotations

import argparse
import os
import sys

from .config import ConfigError


def _cmd_space(args) -> None:
    from .space import Space, format_counts

    for path in args.files:
        space = Space.load(path)
        print(format_counts(space, space.projections()))


def _cmd_run(args) -> None:
    from .config import load_study_config
    from .study import finished_trials, run_study

    config = load_study_config(args.study)
    storage = args.storage or config.storage_url
    print(f"dse: study {config.name!r} in {storage}", file=sys.stderr)
    study = run_study(config, n_trials=args.n_trials, storage=args.storage, progress=not args.quiet)
    print(f"dse: {finished_trials(study)} trials finished; `dse status {args.study}` for the table", file=sys.stderr)


def _cmd_status(args) -> None:
    from .config import load_study_config
    from .status import format_status
    from .study import open_study

    config = load_study_config(args.study)
    print(format_status(open_study(config, args.storage, create=False)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dse", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("space", help="print the size of search spaces, per pruning rule")
    p.add_argument("files", nargs="+", metavar="SPACE_YAML")
    p.set_defaults(func=_cmd_space)

    p = sub.add_parser("run", help="run (or resume) a study")
    p.add_argument("study", metavar="STUDY_YAML")
    p.add_argument("--n-trials", type=int, help="finished trials to reach in total (default: the study's n_trials)")
    p.add_argument("--storage", help="storage URL (default: the study's, or a SQLite file beside it)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("status", help="trials of a study: counts, baseline and best so far")
    p.add_argument("study", metavar="STUDY_YAML")
    p.add_argument("--storage")
    p.set_defaults(func=_cmd_status)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("\ndse: interrupted; the running trial is marked failed. Run the same command to resume.",
              file=sys.stderr)
        return 130
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as e:
        if os.environ.get("DSE_DEBUG"):
            raise
        print(f"dse: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
