"""Shared fixtures: a tiny random Llama in Hugging Face format and a small demo config.

The tiny model is built in code (no hub): 2 layers, hidden 64, the demo's character
tokenizer, every linear width a multiple of 64 so bitsandbytes' NF4 CPU kernels apply.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# One OpenMP thread in every test process and in the processes tests start (they inherit the
# environment): the suite runs about one test per core (pytest-xdist), and tiny matmuls whose OpenMP
# threads wait for a busy core run ten times slower than on one thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent


def write_tiny_model(out: Path, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedft.demo.base import build_char_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


TINY_TOML = """
seed = 0
[model]
path = "{model}"
quantization = "nf4"
device = "cpu"
[lora]
r = 4
alpha = 8
[data]
train_files = ["train.jsonl"]
eval_file = "eval.jsonl"
partition = "natural"
partition_by = "institution"
max_length = 96
eval_max_examples = 8
[train]
local_steps = 4
batch_size = 8
learning_rate = 1e-2
lr_schedule = "constant"
num_threads = 1
[strategy]
name = "fedavg"
num_rounds = 2
min_train_nodes = 2
eval_every = 1
[simulation]
num_supernodes = 2
num_cpus = 2  # one Ray actor runs both clients in turn: a second actor would import torch & co. again (~10 s)
[report]
evaluate_stages = false  # tests that need the stage evaluation turn it on
"""


def write_tiny_setup(directory: Path, model_dir: Path, train_rows: list[dict] | None = None) -> Path:
    """Two institutions' training rows (24 each unless given), held-out rows and tiny.toml."""
    from fedft.demo.tasks import make_demo_rows, make_eval_rows, write_jsonl

    write_jsonl(train_rows or make_demo_rows(2, 24, 0.9, seed=0), directory / "train.jsonl")
    write_jsonl(make_eval_rows(2, seed=1), directory / "eval.jsonl")
    path = directory / "tiny.toml"
    text = TINY_TOML.format(model=model_dir)
    if (os.cpu_count() or 1) < 2:  # Ray could not place a 2-CPU client on a 1-CPU machine
        text = text.replace("num_cpus = 2", "num_cpus = 1")
    path.write_text(text)
    return path


@pytest.fixture
def tiny_config_path(tiny_model_dir, tmp_path) -> Path:
    return write_tiny_setup(tmp_path, tiny_model_dir)


@pytest.fixture
def task_identity(monkeypatch):
    """What Flower sets in a ServerApp process before it builds messages (tests that call
    the ServerApp or the federation loop in this process)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


# The files that take minutes (measured with --durations), collected first: pytest-xdist's
# --dist loadfile hands files out in collection order, so starting the longest ones first lets the
# workers finish together instead of one waiting on a long file that was handed out last.
LONG_FILES = ("tests/simulations/test_faults.py", "tests/run/test_resume.py", "tests/privacy/test_canaries.py",
              "tests/run/test_disk_full.py", "tests/simulations/test_deployment.py",
              "tests/simulations/test_gpu_check.py", "tests/privacy/test_privacy_run.py",
              "tests/simulations/test_simulation.py")


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker more than there are cores. Most of the long tests wait (on Flower's
    polls and timeouts, on processes starting), so a third worker on 2 cores keeps them busy."""
    return (os.cpu_count() or 1) + 1


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        path = item.nodeid.split("::", 1)[0]
        return LONG_FILES.index(path) if path in LONG_FILES else len(LONG_FILES)

    items.sort(key=rank)  # stable: the order within a file and among the other files is kept


_PROCESSES_AT_START: dict[int, str] = {}


def _is_xdist_worker(session) -> bool:
    """True in a pytest-xdist worker: only the controlling process, which starts before every worker
    and ends after the last, checks for leftover processes."""
    return hasattr(session.config, "workerinput")


def pytest_sessionstart(session):
    from tests.processes import federation_processes

    if _is_xdist_worker(session):
        return
    _PROCESSES_AT_START.update(federation_processes())


def pytest_sessionfinish(session, exitstatus):
    """Fail the session if a Ray or Flower process a test started outlives it (tests/processes.py)."""
    from tests.processes import leftovers

    if _is_xdist_worker(session):
        return
    left = leftovers(_PROCESSES_AT_START)
    if left:
        lines = "\n".join(f"  pid {pid}: {cmd[:200]}" for pid, cmd in sorted(left.items()))
        session.config.get_terminal_writer().line(
            f"\nprocesses a test started are still running 30 s after the last test:\n{lines}", red=True)
        session.exitstatus = 1
