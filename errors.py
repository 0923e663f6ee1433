"""User-facing failures: one line naming the problem and the fix, exit code 2, no traceback.

Every command-line entry point (`preprocess.py`, `train.py`, `recommend.py`) runs its `main`
through `run_cli`, and every check that a user can fix raises `UserError`.
"""
import sys


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file, placeholder path): shown as one line."""


def run_cli(main, *args, **kwargs):
    """Call `main`; turn a `UserError` into `error: <message>` on stderr and exit code 2."""
    try:
        return main(*args, **kwargs)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
