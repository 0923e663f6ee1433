"""Failing clearly: one line naming the problem and the fix, exit code 2, no traceback, and
never a half-written output file.

Every command-line entry point (`preprocess.py`, `train.py`, `recommend.py`, ...) runs its
`main` through `run_cli`, and every check that a user can fix raises `UserError`. Outputs are
checked before the work that produces them; files are written with `write_atomically` (or
`write_json` / `write_jsonl`, which use it), folders under a temporary name renamed into place
(the dataset: `preprocess.save_atomically`; the converted quick-start model: `paths.build_once`).
Importing this module also makes a mistake in an edit of `paths.py`, and Ctrl-C or `kill` while
the libraries import, one line (`report_uncaught`): so every command imports it first.
"""
import errno
import json
import os
import signal
import sys
import tempfile
import threading
import traceback


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file, placeholder path): shown as one line."""


def check_not_blank(flag: str, value: str | None, fix: str) -> None:
    """A path flag that is given holds more than spaces: an empty one is mostly an unset variable,
    and a folder or file named " " a slip."""
    if value is not None and not value.strip():
        raise UserError(f"{flag} is {'empty' if value == '' else f'blank ({value!r})'} (an unset variable?) — {fix}")


def check_int64(flag: str, value) -> None:
    """An integer flag's value fits int64, which torch and numpy take at most."""
    if isinstance(value, int) and abs(value) >= 2**63:
        raise UserError(f"{flag} {value}: too large (the most is 2**63 - 1)")


def killed_by(code: int, memory_fix: str) -> str:
    """How a process that a signal killed (return code -N) ended: the signal, and for SIGKILL, the
    out-of-memory killer's usual work, with `memory_fix`."""
    name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
    if -code == signal.SIGKILL:
        return f"killed by {name} — most often the machine's memory (RAM) ran out: see `dmesg`, then {memory_fix}"
    return f"killed by {name} — see its output above"


def one_line(error: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (library errors run over several), cut at `limit`
    characters, or its type when it has none."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    if not text:
        return type(error).__name__
    return text if len(text) <= limit else text[:limit - 1] + "…"


def shown_briefly(value, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters and marked "…" where longer: a value quoted in an error line."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}…"


def missing_path(path: str) -> str:
    """`path` quoted, and where a relative one was looked for (launch_train.sh and quickstart.sh
    run from the repository folder, not the shell's)."""
    return repr(path) if os.path.isabs(path) else f"{path!r} (relative to {os.getcwd()})"


def read_json(path: str, fix: str) -> dict:
    """The JSON object in `path` (every JSON file the project reads holds one); unreadable,
    truncated, not JSON or another JSON value: one line naming it and `fix`."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: not JSON, not UTF-8
        raise UserError(f"{path!r} is not readable JSON ({one_line(e)}) — {fix}") from e
    if not isinstance(value, dict):
        raise UserError(f"{path!r} holds a JSON {type(value).__name__}, not an object — {fix}")
    return value


def missing_folders(path: str) -> list[str]:
    """The folders of `path` that do not exist yet, deepest first."""
    missing, folder = [], os.path.abspath(path)
    while not os.path.exists(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    return missing


def folder_problem(folder: str) -> str | None:
    """Why files cannot be written into `folder`, created if missing (None: they can).

    Read from the nearest part of the path that exists: a file in the way, or a folder that is
    not writable — by its permissions, or, what access() cannot tell, by its file system (read-only,
    virtual like /proc, full): a folder is made in it and removed again.
    """
    path = os.path.abspath(folder)
    missing = missing_folders(path)
    for part in missing:
        if os.path.lexists(part):  # exists() follows links
            link = "is" if part == path else f"cannot be created: {part} is"
            return f"{link} a link to a missing place (or a loop of links)"
    existing = os.path.dirname(missing[-1]) if missing else path
    if not os.path.isdir(existing):
        return "is a file" if existing == path else f"is inside {existing}, a file"
    if not os.access(existing, os.W_OK | os.X_OK):
        return "is not writable" if existing == path else f"cannot be created: {existing} is not writable"
    name_max = os.pathconf(existing, "PC_NAME_MAX")
    too_long = [name for name in map(os.path.basename, reversed(missing)) if len(os.fsencode(name)) > name_max]
    if too_long:
        return (f"cannot be created: a part of it, {shown_briefly(too_long[0])}, is longer than the {name_max} bytes "
                "a name may have")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".r2ec-probe-", dir=existing))
    except OSError as e:
        reason = e.strerror or str(e)
        return f"is not writable ({reason})" if existing == path else \
            f"cannot be created: no folder can be made in {existing} ({reason})"
    return None


def check_output_file(path: str, flag: str) -> None:
    """`path` (given as `flag`) can be written as a file: not a folder, in a writable folder that
    exists, and a regular file if it exists (the write renames a new file into place, which would
    replace a link, a pipe or a device rather than write through it)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UserError(f"{flag} {path!r} is a folder — pass a file name")
    if os.path.lexists(path) and (os.path.islink(path) or not os.path.isfile(path)):
        raise UserError(f"{flag} {path!r} is a link or a special file, which the write would replace — pass the "
                        "path of a regular file")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"{flag} {path!r}: folder {folder!r} is a file — move it or pick another path")
    if not os.path.isdir(folder):
        problem = folder_problem(folder)  # a link to nowhere, say
        state, fix = (problem, "fix it") if problem else ("does not exist", "create it")
        raise UserError(f"{flag} {path!r}: folder {folder!r} {state} — {fix} or pick another path")
    if not os.access(folder, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UserError(f"{flag} {path!r} is not writable — pick a path in a folder you can write to")
    probe = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.probe")  # what access() cannot tell:
    try:  # a read-only or virtual file system (/proc), a full quota
        with open(probe, "w"):
            pass
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{flag} {path!r} cannot be written ({e.strerror or e}) — pick a path in a folder you can "
                        "write to") from e


def umask() -> int:
    """The process's file-mode creation mask (reading it means setting it: set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomically(path: str, write) -> None:
    """`write(temporary)` into a file beside `path`, then rename it into place: a failure leaves
    neither a half-written `path` nor the temporary file, and an earlier `path` stays whole."""
    folder, name = os.path.split(os.path.abspath(path))
    temporary = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    except OSError as e:  # disk full, the folder gone or made read-only meanwhile
        fix = "free some space or pick another path" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "pick another path"
        raise UserError(f"cannot write {path!r} ({e.strerror or e}) — {fix}") from e
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def write_jsonl(path: str, records: list[dict]) -> None:
    """One JSON line per record, written atomically."""
    def write(temporary):
        with open(temporary, "w") as f:
            f.writelines(json.dumps(record) + "\n" for record in records)

    write_atomically(path, write)


def write_json(path: str, value) -> None:
    """`value` as indented JSON, written atomically."""
    def write(temporary):
        with open(temporary, "w") as f:
            json.dump(value, f, indent=2)

    write_atomically(path, write)


def run_cli(main, *args, interrupt_on_sigterm: bool = True, **kwargs):
    """Call `main`; turn a `UserError` into `error: <message>` on stderr and exit code 2.

    With `interrupt_on_sigterm`, SIGTERM (`kill`, a scheduler's time limit) interrupts as Ctrl-C
    does, so that the temporary files and folders of an atomic write are removed on the way out
    instead of left behind. Training processes a launcher started keep SIGTERM's default
    (`launched`): it sends it to stop them at once, also while they wait in a collective.
    """
    on_sigterm = signal.getsignal(signal.SIGTERM)
    if interrupt_on_sigterm:
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return main(*args, **kwargs)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        signal.signal(signal.SIGTERM, on_sigterm)


LAUNCHER_VARIABLES = ("ACCELERATE_MIXED_PRECISION", "LOCAL_RANK", "RANK",  # accelerate launch, torchrun
                      "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")  # mpirun, srun --mpi


def launched() -> bool:
    """Whether a launcher started this process: it stops its processes with SIGTERM, which must stop
    them at once, also while they wait in a collective (where no Python handler runs)."""
    return any(name in os.environ for name in LAUNCHER_VARIABLES)


def one_line_parser_errors(parser, help_command: str):
    """`parser` (argparse) raises UserError on a bad flag, shown as one line by `run_cli`,
    instead of printing its whole usage; returns it."""
    def error(message):
        raise UserError(f"{message} — {help_command} lists the flags")

    parser.error = error
    return parser


def paths_edit_error(error: BaseException) -> str | None:
    """The one-line message for an exception raised by the code of this project's `paths.py`
    itself, the file users edit (a missing quote or comma, an unquoted path); None for any other
    exception, also one raised inside a function of paths.py that a command called."""
    if not isinstance(error, Exception):  # Ctrl-C while it was being imported, say
        return None
    if isinstance(error, SyntaxError):
        filename, line = error.filename, error.lineno
    else:  # its deepest frame in paths.py: the top level, or a comprehension of it (Python 3.11)
        frames = [f for f in traceback.extract_tb(error.__traceback__) if is_paths_py(f.filename)]
        at_top_level = frames and (frames[-1].name == "<module>" or frames[-1].name.endswith("comp>"))
        filename, line = (frames[-1].filename, frames[-1].lineno) if at_top_level else (None, None)
    if not is_paths_py(filename):
        return None
    message = error.msg if isinstance(error, SyntaxError) else f"{type(error).__name__}: {one_line(error)}"
    return f"{filename} line {line}: {message} — fix that line of paths.py (paths are quoted strings)"


def is_paths_py(filename: str | None) -> bool:
    """Whether `filename` is this project's paths.py (not a library module of that name)."""
    ours = os.path.join(os.path.dirname(os.path.abspath(__file__)), "paths.py")
    return bool(filename) and os.path.realpath(filename) == os.path.realpath(ours)


def report_uncaught(kind, error, trace):
    """`sys.excepthook`, for what happens before a command's `run_cli` takes over: Ctrl-C while
    the libraries import (exit code 130, as `run_cli` gives it) and a mistake in paths.py (exit
    code 2) each end the command with one line; every other uncaught exception is shown as it
    was before (by Python, or an earlier hook)."""
    if issubclass(kind, KeyboardInterrupt):
        message, code = "interrupted", 130
    else:
        message, code = paths_edit_error(error), 2
    if message is None:
        shown_as_before(kind, error, trace)
        return
    sys.stdout.flush()
    print(f"error: {message}", file=sys.stderr)
    sys.stderr.flush()
    os._exit(code)  # an excepthook cannot set the exit code otherwise


shown_as_before = sys.excepthook  # Python's, or a hook a library installed before
sys.excepthook = report_uncaught  # every command imports this module first
if not launched() and threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` while the libraries import: as Ctrl-C
