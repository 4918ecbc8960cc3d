"""Issue 25's defects off the default path: each test failed on the code before its fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from loraship.labels import LabelError, LabelMap, from_data
from tests.conftest import copy_tree, make_texts, tiny_args, write_jsonl
from trainer.train import main


def _rows(path: Path, labels: list, n: int = 40, seed: int = 3) -> Path:
    texts = [t for t, _ in make_texts(n, seed=seed)]
    path.write_text("".join(json.dumps({"text": t, "label": labels[i % len(labels)]}) + "\n" for i, t in enumerate(texts)))
    return path


# --- one label rule ------------------------------------------------------------------------------------


def test_the_label_rule() -> None:
    stars = from_data([5, 1, 2, 4], [], "train.jsonl")
    assert stars.names == ["1", "2", "4", "5"]
    assert stars.id(3) is None and stars.id("3") is None, "3 is a name the model lacks, not position 3"
    assert stars.id(5) == 3 and stars.id("5") == 3 and stars.id(" 2 ") == 1
    assert LabelMap(["1", "2", "3", "4", "5"]).id(0) is None, "0 is no star, not the first class"
    named = LabelMap(["World", "Sports"])
    assert named.id(1) == 1 and named.id("1") == 1 and named.id("Sports") == 1 and named.id(2) is None
    assert named.id("--5") is None
    with pytest.raises(LabelError, match=r"mix integers.*data.labels"):
        from_data([1, 2, "--5"], [], "train.csv")
    with pytest.raises(LabelError, match="repeat"):
        LabelMap(["a", "a"])


def test_integer_training_labels_reject_an_unseen_integer(tiny_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _rows(tmp_path / "train.jsonl", [1, 2, 4, 5])
    _rows(tmp_path / "test.jsonl", [1, 2, 3], n=6, seed=4)
    code = main(tiny_args(tiny_bert, tmp_path, tmp_path / "run", "data.test=test.jsonl", "train.max_steps=2"))
    err = capsys.readouterr().err
    assert code == 1 and "test.jsonl:3: label '3' is not one the model knows (1, 2, 4, 5)" in err
    assert "never as positions" in err


def test_integer_names_given_with_0_based_data_is_an_error(tiny_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _rows(tmp_path / "train.jsonl", [0, 1, 2, 3, 4])
    code = main(tiny_args(tiny_bert, tmp_path, tmp_path / "run", 'data.labels=["1","2","3","4","5"]', "train.max_steps=2"))
    assert code == 1 and "label '0' is not one the model knows (1, 2, 3, 4, 5)" in capsys.readouterr().err


def test_a_csv_label_that_is_no_integer_is_a_message_not_a_traceback(tiny_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "train.csv").write_text("text,label\n" + "".join(f"text number {i},{[1, 2][i % 2]}\n" for i in range(20)) + "odd one,--5\n")
    code = main(tiny_args(tiny_bert, tmp_path, tmp_path / "run", "data.train=train.csv", "train.max_steps=2"))
    err = capsys.readouterr().err
    assert code == 1 and "mix integers (1, 2) and names (--5)" in err and "data.labels=" in err and "Traceback" not in err


# --- messages instead of tracebacks ----------------------------------------------------------------------


def test_seed_and_max_length_out_of_range_say_the_fix(tiny_bert: Path, toy_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(tiny_args(tiny_bert, toy_data, tmp_path / "a", "train.seed=-1")) == 2
    assert "train.seed: got -1; expected an integer from 0 to 4294967295" in capsys.readouterr().err
    assert main(tiny_args(tiny_bert, toy_data, tmp_path / "b", "data.max_length=1024", "train.max_steps=2")) == 1
    err = capsys.readouterr().err
    assert "data.max_length=1024" in err and "512" in err and "Traceback" not in err


# --- output.overwrite replaces only after every check --------------------------------------------------------


def test_overwrite_keeps_the_old_run_when_the_new_one_fails_its_checks(trained_run: Path, tiny_bert: Path, toy_data: Path,
                                                                       tmp_path: Path) -> None:
    run = copy_tree(trained_run, tmp_path / "run")
    before = sorted(p.name for p in run.iterdir())
    for bad in ("data.train=typo.jsonl", "data.max_length=4096", "model.name_or_path=" + str(tmp_path / "no-model")):
        args = tiny_args(tiny_bert, toy_data, run, "output.overwrite=true", bad)
        assert main(args) == 1, bad
        assert sorted(p.name for p in run.iterdir()) == before, f"{bad}: the old run was touched"
        assert (run / "adapter" / "adapter_model.safetensors").is_file() and (run / "summary.json").is_file()
    # A good replacement does replace it.
    assert main(tiny_args(tiny_bert, toy_data, run, "output.overwrite=true", "train.max_steps=2")) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 2


# --- resume refuses another run's checkpoint ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def cut_run(tiny_bert: Path, toy_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("cut") / "run"
    assert main(tiny_args(tiny_bert, toy_data, run, "train.max_steps=4", "train.save_every=2", "train.epochs=1")) == 0
    return run


@pytest.mark.parametrize(("change", "named"), [
    ("train.batch_size=4", "train.batch_size: 8 in the checkpoint, 4 now"),
    ('data.labels=["World","Sports","Business","Sci/Tech"]', "labels:"),
    ("train.lr=0.5", "train.lr"),
    ("data", "data:"),
])
def test_resume_with_other_settings_or_data_is_refused_and_config_kept(cut_run: Path, tiny_bert: Path, toy_data: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str], change: str, named: str) -> None:
    run = copy_tree(cut_run, tmp_path / "run")
    data = toy_data
    if change == "data":  # the same file name, other contents
        data = tmp_path / "data"
        shutil.copytree(toy_data, data)
        write_jsonl(data / "train.jsonl", make_texts(160, seed=99))
    config = (run / "config.yaml").read_bytes()
    extra = [change] if change != "data" else []
    assert main(tiny_args(tiny_bert, data, run, "train.max_steps=6", "train.epochs=1", "train.resume=latest", *extra)) == 1
    err = capsys.readouterr().err
    assert "differs from the one that wrote the checkpoint" in err and named in err and "train.resume_changed=true" in err
    assert (run / "config.yaml").read_bytes() == config, "a refused resume rewrote config.yaml"
    # Asked explicitly, it continues.
    assert main(tiny_args(tiny_bert, data, run, "train.max_steps=6", "train.epochs=1", "train.resume=latest",
                          "train.resume_changed=true", *extra)) == 0


def test_resume_may_train_longer(cut_run: Path, tiny_bert: Path, toy_data: Path, tmp_path: Path) -> None:
    run = copy_tree(cut_run, tmp_path / "run")
    assert main(tiny_args(tiny_bert, toy_data, run, "train.max_steps=6", "train.epochs=1", "train.resume=latest")) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 6


# --- patience: auto means epochs, whatever the evaluation cadence ---------------------------------------------


def test_auto_patience_is_three_epochs_of_evaluations(capsys: pytest.CaptureFixture[str]) -> None:
    from trainer.config import Config
    from trainer.train import plan_steps

    def planned(eval_every: int) -> int:
        cfg = Config()
        cfg.train.eval_every = eval_every
        labels = np.array([0, 1] * 500)
        run = SimpleNamespace(cfg=cfg, labels=["a", "b"], task="single_label", recipe={}, class_weights=None,
                              splits={"train": SimpleNamespace(labels=lambda: labels, __len__=lambda: 1000)},
                              accelerator=SimpleNamespace(num_processes=1, print=print, device="cpu"))
        run.splits["train"] = _Sized(labels)
        plan_steps(run)
        return run.patience

    assert planned(0) == 3  # 32 steps per epoch, evaluated at epoch ends
    assert planned(8) == 12  # 4 evaluations per epoch


class _Sized:
    def __init__(self, labels: np.ndarray) -> None:
        self._labels = labels

    def __len__(self) -> int:
        return len(self._labels)

    def labels(self) -> np.ndarray:
        return self._labels
