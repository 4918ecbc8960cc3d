"""Two "machines" on one: two `accelerate launch` processes with the README's multi-machine flags on loopback
(gloo), each in its own directory with its own HOME and data cache (local disks) or in one (a shared
filesystem); compared with one machine running two processes."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, make_texts, tiny_args, write_jsonl
from tests.test_distributed import launch

ARGS = ("train.batch_size=4", "train.eval_batch_size=4", "train.epochs=2", "train.save_every=5", "train.keep_checkpoints=3",
        "data.validation=val.jsonl", "data.test=test.jsonl", "train.collective_timeout_seconds=30")


def readme_node_flags(rank: int) -> list[str]:
    """`accelerate launch` flags of machine `rank` exactly as the README writes them."""
    text = (REPO / "README.md").read_text()
    lines = [x for b in re.findall(r"```bash\n(.*?)```", text, re.S) for x in b.splitlines()
             if x.startswith("accelerate launch --multi_gpu --num_machines 2") and f"--machine_rank {rank}" in x]
    assert len(lines) == 1, lines
    argv = shlex.split(lines[0])
    return argv[2 : argv.index("trainer/train.py")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_node(rank: int, port: int, cwd: Path, cache: Path, args: list[str]) -> subprocess.Popen[str]:
    """One machine: the README's flags with loopback and a free port; its own HOME and cache."""
    flags = readme_node_flags(rank)
    flags[flags.index("--main_process_ip") + 1] = "127.0.0.1"
    flags[flags.index("--main_process_port") + 1] = str(port)
    cwd.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "HOME": str(cwd / "home"),
           "HF_DATASETS_CACHE": str(cache)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *flags, str(REPO / "trainer" / "train.py"), *args]
    # Its own session: the test kills a whole "machine" (launcher and worker) at once.
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def run_two_nodes(root: Path, shared: bool, args: list[str]) -> list[tuple[int, str]]:
    port = free_port()
    procs = []
    for rank in (0, 1):
        cwd = root if shared else root / f"node{rank}"
        procs.append(start_node(rank, port, cwd, root / "cache" if shared else cwd / "cache", args))
    return [(p.wait(timeout=300), p.stdout.read() if p.stdout else "") for p in procs]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("mn-data")
    write_jsonl(d / "train.jsonl", make_texts(120, seed=1))
    write_jsonl(d / "val.jsonl", make_texts(41, seed=7))
    write_jsonl(d / "test.jsonl", make_texts(43, seed=8))
    return d


@pytest.fixture(scope="module")
def one_node_two_procs(tiny_bert: Path, data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("mn-ref") / "run"
    res = launch("cpu_2proc.yaml", tiny_args(tiny_bert, data, run, *ARGS))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return run


def assert_same_adapter(a: Path, b: Path, atol: float = 1e-6) -> None:
    fa, fb = load_file(str(a / "adapter" / "adapter_model.safetensors")), load_file(str(b / "adapter" / "adapter_model.safetensors"))
    assert fa.keys() == fb.keys()
    for k in fa:
        torch.testing.assert_close(fa[k], fb[k], rtol=0, atol=atol)


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".partial") or p.name == ".lock" or p.name.startswith(".node-probe")]


def test_two_machines_with_local_disks_match_one_machine_with_two_processes(tiny_bert: Path, data: Path, one_node_two_procs: Path,
                                                                            tmp_path: Path) -> None:
    results = run_two_nodes(tmp_path, shared=False, args=tiny_args(tiny_bert, data, Path("runs/r"), *ARGS))
    for rc, out in results:
        assert rc == 0, out[-4000:]
    main, other = tmp_path / "node0" / "runs" / "r", tmp_path / "node1" / "runs" / "r"
    assert_same_adapter(main, one_node_two_procs)
    # the same steps, evaluations and test metrics as one machine with two processes
    ref = json.loads((one_node_two_procs / "summary.json").read_text())
    got = json.loads((main / "summary.json").read_text())
    assert got["num_processes"] == 2 and got["steps"] == ref["steps"] and got["best_step"] == ref["best_step"]
    assert got["test_accuracy"] == pytest.approx(ref["test_accuracy"], abs=1e-9)
    # machine 1 holds its checkpoint files only (and its ownership marker); machine 0 the run's outputs
    assert sorted(p.name for p in other.iterdir()) == [".loraship", "checkpoints"]
    assert sorted(p.name for p in (other / "checkpoints").iterdir()) == ["step_20", "step_25", "step_30"]
    assert {p.name for p in (other / "checkpoints" / "step_30").iterdir()} >= {"model.safetensors", "optimizer.bin", "random_states_1.pkl", "train_state.json"}
    assert (main / "adapter").is_dir() and (main / "checkpoints" / "step_30" / "random_states_0.pkl").is_file()
    # each machine tokenized its own data once, into its own cache
    lines = sorted(x for _, out in results for x in out.splitlines() if x.startswith("process "))
    assert [x.split(" fingerprint")[0] for x in lines] == ["process 0: data train=built validation=built test=built",
                                                          "process 1: data train=built validation=built test=built"]
    assert not leftovers(tmp_path), leftovers(tmp_path)


@pytest.mark.slow
def test_two_machines_on_a_shared_filesystem_tokenize_once_and_match(tiny_bert: Path, data: Path, one_node_two_procs: Path,
                                                                   tmp_path: Path) -> None:
    results = run_two_nodes(tmp_path, shared=True, args=tiny_args(tiny_bert, data, Path("runs/r"), *ARGS))
    for rc, out in results:
        assert rc == 0, out[-4000:]
    assert_same_adapter(tmp_path / "runs" / "r", one_node_two_procs)
    lines = sorted(x.split(" fingerprint")[0] for _, out in results for x in out.splitlines() if x.startswith("process "))
    assert lines == ["process 0: data train=built validation=built test=built", "process 1: data train=hit validation=hit test=hit"]
    assert len([p for p in (tmp_path / "cache" / "loraship").iterdir()]) == 3  # one build per split, for both machines
    assert not leftovers(tmp_path), leftovers(tmp_path)


@pytest.mark.slow
def test_a_lost_machine_stops_the_other_and_both_resume_to_the_uninterrupted_result(tiny_bert: Path, data: Path, tmp_path: Path) -> None:
    args = [a for a in ARGS if not a.startswith("train.epochs")] + ["train.epochs=12"]
    full = tmp_path / "full"
    for rc, out in run_two_nodes(full, shared=False, args=tiny_args(tiny_bert, data, Path("runs/r"), *args)):
        assert rc == 0, out[-4000:]
    cut = tmp_path / "cut"
    port = free_port()
    nodes = [start_node(r, port, cut / f"node{r}", cut / f"node{r}" / "cache", tiny_args(tiny_bert, data, Path("runs/r"), *args)) for r in (0, 1)]
    ckpts = cut / "node1" / "runs" / "r" / "checkpoints"
    deadline = time.monotonic() + 240
    while not (ckpts.is_dir() and len([p for p in ckpts.iterdir() if p.name.startswith("step_")]) >= 2):
        assert time.monotonic() < deadline and nodes[0].poll() is None, "the run did not reach two checkpoints"
        time.sleep(0.05)
    os.killpg(nodes[1].pid, signal.SIGKILL)  # machine 1 is gone: launcher and worker
    killed = time.monotonic()
    out0 = nodes[0].communicate(timeout=90)[0]
    assert time.monotonic() - killed < 60, "machine 0 did not stop within 60 s"
    assert nodes[0].returncode != 0
    assert "lost contact with another training process" in out0 and "train.resume=latest" in out0, out0[-3000:]
    nodes[1].wait(timeout=30)
    resumed = [*args, "train.resume=latest"]
    results = run_two_nodes(cut, shared=False, args=tiny_args(tiny_bert, data, Path("runs/r"), *resumed))
    for rc, out in results:
        assert rc == 0, out[-4000:]
    assert "resumed from" in results[0][1]
    assert_same_adapter(cut / "node0" / "runs" / "r", full / "node0" / "runs" / "r")
    assert not leftovers(cut), leftovers(cut)
