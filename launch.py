"""Start the training processes: `accelerate launch` as launch_train.sh calls it, failing clearly.

    python launch.py --multi_gpu --num_processes 3 ... train.py --deepspeed ds_config.json ...

A failed process has printed its own error line (or traceback); the launcher adds none of its own
(accelerate's CalledProcessError, torchrun's ChildFailedError and "failed (exitcode" log line, its
notices) and exits with that process's code. What no process could say (killed by a signal,
stopped by one sent to the launcher, processes that never met) gets one line here.
"""
import logging
import os
import signal
import subprocess
import sys

from errors import killed_by, one_line


def launch_processes(argv: list[str]):
    """`accelerate launch` with `argv`, failing as one training process does, and without the
    user's saved `accelerate config` defaults."""
    cpp_log_level = os.environ.get("TORCH_CPP_LOG_LEVEL")
    os.environ["TORCH_CPP_LOG_LEVEL"] = "FATAL"  # read once, at import: no stack trace per retry to reach node 0
    import torch.distributed.run  # noqa: F401  (creates torchrun's loggers, filtered below)
    import accelerate.commands.launch
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError

    if cpp_log_level is None:  # the training processes log as they would have
        del os.environ["TORCH_CPP_LOG_LEVEL"]
    else:
        os.environ["TORCH_CPP_LOG_LEVEL"] = cpp_log_level
    logging.disable(logging.WARNING)  # "defaults used", "Sending process … SIGTERM", ...
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).addFilter(lambda record: not record.getMessage().startswith("failed (exitcode"))
    # The saved `accelerate config` defaults would override the flags launch_train.sh does not pass
    # (GPU ids, FSDP, mixed precision): the launch is the script's alone.
    accelerate.commands.launch.default_config_file = os.devnull
    args = launch_command_parser().parse_args(argv)
    try:
        launch_command(args)
    except (torch.distributed.DistError, RendezvousError) as e:  # the processes never met
        where = f"{args.main_process_ip}:{args.main_process_port}"
        fix = ("start launch_train.sh on every node with node 0's address (reachable from the others) as "
               "MAIN_PROCESS_IP, the same MAIN_PROCESS_PORT and NUM_MACHINES, and its own MACHINE_RANK"
               if args.num_machines > 1 else "set MAIN_PROCESS_PORT to a free port")
        print(f"error: the training processes did not meet at {where} ({one_line(e)}) — {fix}", file=sys.stderr)
        sys.exit(2)
    except subprocess.CalledProcessError as e:  # one process
        sys.exit(exit_code_of_process(0, e.returncode))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        sys.exit(exit_code_of_process(rank, failure.exitcode))
    except SignalException as e:  # sent to the launcher, passed on to every process (accelerate < 1.16)
        sys.exit(stopped_by_signal(int(e.sigval)))
    except SystemExit as e:  # accelerate >= 1.16 passes it on and exits with 128 + its number itself
        if isinstance(e.code, int) and e.code - 128 in signal.valid_signals():
            sys.exit(stopped_by_signal(e.code - 128))
        raise
    except KeyboardInterrupt:
        sys.exit(130)


def stopped_by_signal(signum: int) -> int:
    """The exit code of a launch stopped by a signal sent to the launcher, with a line saying so."""
    if signum != signal.SIGINT:  # Ctrl-C: each process says "error: interrupted" itself
        print(f"error: training stopped by {signal.Signals(signum).name} sent to the launcher (a time limit?) "
              "— resume with --resume_from_checkpoint last", file=sys.stderr)
    return 128 + signum


def exit_code_of_process(rank: int, code: int) -> int:
    """A shell's exit code for a training process's: its own, or 128 + the signal that killed it.
    A line is added where the process's own output may not say why it stopped."""
    if code in (0, 2, 130):  # done, its error line, interrupted
        return code
    if code > 0:
        print(f"error: training process {rank} exited with code {code} — see its output above", file=sys.stderr)
        return code
    memory_fix = "start fewer processes (NUM_PROCESSES) or free some memory"
    print(f"error: training process {rank} was {killed_by(code, memory_fix)}", file=sys.stderr)
    return 128 - code


if __name__ == "__main__":
    launch_processes(sys.argv[1:])
