from __future__ import annotations

from pathlib import Path

import pytest

from trainer.config import Config, ConfigError, field_docs, load_config

REPO = Path(__file__).resolve().parent.parent
TRAIN_CONFIGS = sorted(p for p in (REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_and_documents_its_launch(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    head = path.read_text().splitlines()[:8]
    assert head[0].startswith("# "), "a config starts with what it is for"
    assert any("trainer/train.py --config configs/" in line for line in head), "and the exact launch command"


def test_agnews_config_points_at_shared_data() -> None:
    cfg = load_config(REPO / "configs" / "agnews_minilm.yaml")
    assert Path(cfg.data.data_dir) == (REPO.parent / "shared" / "data" / "agnews").resolve()
    assert cfg.data.labels == ["World", "Sports", "Business", "Sci/Tech"]


def test_env_var_overrides_yaml_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LORASHIP_DATA_DIR", str(tmp_path))
    cfg = load_config(REPO / "configs" / "agnews_minilm.yaml")
    assert cfg.data.data_dir == str(tmp_path)


def test_dotted_overrides_are_typed() -> None:
    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        ["train.lr=3e-4", "lora.r=8", "lora.target_modules=[query, value]", "train.group_by_length=false", "train.epochs=1"],
    )
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.lora.r == 8
    assert cfg.lora.target_modules == ["query", "value"]
    assert cfg.train.group_by_length is False
    assert cfg.train.epochs == 1.0 and isinstance(cfg.train.epochs, float)


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora:\n  r: eight\n  rank: 4\ntrain:\n  lr: -1\n  scheduler: fancy\nfoo: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad, ["train.batch_size=big", "nokey"])
    problems = err.value.problems
    text = str(err.value)
    assert "lora.r: got 'eight' (str); expected int" in text
    assert "lora.rank: unknown key; known keys here: r, alpha" in text
    assert "train.lr: got -1.0; expected > 0" in text
    assert "train.scheduler: got 'fancy'; expected one of 'linear', 'cosine', 'constant'" in text
    assert "foo: unknown key" in text
    assert "train.batch_size: got 'big' (str); expected int" in text
    assert "override 'nokey': expected dotted key=value" in text
    assert "data.train: required" in text
    assert len(problems) == 8


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_every_field_has_a_doc() -> None:
    rows = field_docs()
    assert len(rows) > 30
    assert all(doc for _, _, _, doc in rows)


@pytest.mark.parametrize("word", ["no", "off", "false", "No", "'no'"])
def test_mixed_precision_no_off_false_on_the_command_line(word: str) -> None:
    # YAML reads a bare `no` as False; the fp16 error message tells users to write exactly that.
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"train.mixed_precision={word}"])
    assert cfg.train.mixed_precision == "no"


def test_literal_fields_take_yaml_booleans_in_files(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("data: {train: x.jsonl}\ntrain: {mixed_precision: no}\nmodel: {base_dropout: off}\n")
    cfg = load_config(path)
    assert cfg.train.mixed_precision == "no" and cfg.model.base_dropout == "off"
    with pytest.raises(ConfigError, match=r"train\.mixed_precision: got True"):
        load_config(path, ["train.mixed_precision=yes"])
