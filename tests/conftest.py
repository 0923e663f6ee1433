"""Shared pytest setup: never reach the Hugging Face hub or the Amazon data host (whatever the
shell says), keep CPU threads modest."""
import os
import socket
import sys


def closed_port_url() -> str:
    """A loopback URL nothing listens on: connections to it are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/"


os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
os.environ["R2EC_AMAZON_BASE_URL"] = closed_port_url()  # preprocess.py's download host, subprocesses' too
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def pytest_configure(config):
    """pytest resets warning filters for each test: repeat trainer.py's, so the output shows the
    warnings that matter rather than hundreds of transformers' checkpointing renames."""
    from trainer import CHECKPOINTING_RENAME_WARNING
    config.addinivalue_line("filterwarnings", f"ignore:{CHECKPOINTING_RENAME_WARNING}:FutureWarning")
