"""python -m growkern.studies warmstart|growth-factor --preset smoke|cpu|paper --out DIR [--data PATH]"""
import argparse
import shlex
import sys

from . import add_study_commands, run_study_cli


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m growkern.studies",
                                     description="Run a study end to end (docs/studies.md).")
    add_study_commands(parser.add_subparsers(dest="study", required=True))
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    try:
        return run_study_cli(args, command="python -m growkern.studies " + shlex.join(argv))
    except (ValueError, FileNotFoundError) as e:
        print(f"python -m growkern.studies {args.study}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
