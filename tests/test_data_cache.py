"""The Arrow data path: splits tokenized once into a keyed cache, memory-mapped, reused; errors keep file:line."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from loraship.labels import LabelMap
from loraship.rows import Fields
from tests.conftest import make_texts, tiny_args, write_jsonl
from trainer import data_cache
from trainer.data import DataError
from trainer.data_cache import load_or_build, make_encoder


@pytest.fixture(scope="module")
def tokenizer(tiny_bert: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_bert)


def build(path: Path, tok, root: Path, max_length: int = 32):
    return load_or_build(str(path), Fields("text", "label"), max_length, tok, root, progress=False)


def test_encoder_equals_the_tokenizer_call(tokenizer) -> None:
    texts = ["Short one.", "word " * 300, "Ünïcödé  tabs\tand\nnewlines", "x"]
    before = tokenizer.backend_tokenizer.to_str()
    ids, types = make_encoder(tokenizer, 16)(texts)
    assert tokenizer.backend_tokenizer.to_str() == before, "our encoder does not change the shared tokenizer"
    assert ids == tokenizer(texts, truncation=True, max_length=16)["input_ids"]
    assert types is None, "single-text BERT type ids are all zero: not stored"


def test_second_load_is_a_cache_hit_with_the_same_rows(tmp_path: Path, tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    f = write_jsonl(tmp_path / "train.jsonl", make_texts(50, seed=3))
    first, status = build(f, tokenizer, tmp_path / "cache")
    assert status == "built" and len(first) == 50

    def no_build(*a, **k):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(data_cache, "build_split", no_build)
    second, status = build(f, tokenizer, tmp_path / "cache")
    assert status == "hit"
    assert second.lengths().tolist() == first.lengths().tolist()
    assert second.texts() == [t for t, _ in make_texts(50, seed=3)]
    ids = second.table.column("input_ids").to_pylist()
    assert ids == tokenizer(second.texts(), truncation=True, max_length=32)["input_ids"]
    assert not list((tmp_path / "cache").glob(".*partial")), "no partial build left behind"


def test_cache_is_invalidated_by_file_tokenizer_and_max_length(tmp_path: Path, tokenizer, tiny_bert: Path) -> None:
    from transformers import AutoTokenizer

    root = tmp_path / "cache"
    f = write_jsonl(tmp_path / "train.jsonl", make_texts(20, seed=3))
    assert build(f, tokenizer, root)[1] == "built"
    assert build(f, tokenizer, root)[1] == "hit"
    assert build(f, tokenizer, root, max_length=16)[1] == "built"
    other = AutoTokenizer.from_pretrained(tiny_bert)
    other.add_tokens(["zzyzx"])
    assert build(f, other, root)[1] == "built"
    write_jsonl(f, make_texts(20, seed=4))  # same path, new content
    assert build(f, tokenizer, root)[1] == "built"
    assert len([p for p in root.iterdir() if not p.name.startswith(".")]) == 4


def test_errors_keep_file_and_line_and_leave_no_cache(tmp_path: Path, tokenizer) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a b", "label": "x"}\n{"text": "oops", \n')
    with pytest.raises(DataError, match=r"d.jsonl:2: malformed JSON"):
        build(f, tokenizer, tmp_path / "cache")
    f.write_text('{"text": "a b", "label": "x"}\n\n{"label": "y"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:3: missing field 'text'"):
        build(f, tokenizer, tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").iterdir()], "a failed build leaves nothing in the cache"
    # Unknown labels are found when ids are mapped, still with file and line.
    v = tmp_path / "val.jsonl"
    v.write_text('{"text": "a", "label": "World"}\n{"text": "b", "label": 1}\n{"text": "c", "label": "Weather"}\n')
    split, _ = build(v, tokenizer, tmp_path / "cache")
    with pytest.raises(DataError, match=r"val.jsonl:3: label 'Weather' is not one the model knows"):
        split.assign_labels(LabelMap(["World", "Sports"]))
    # One rule for integer-looking values: the string "1" is the JSON integer 1 (as a CSV cell "1" is).
    v.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": "1"}\n{"text": "c", "label": 2}\n')
    split, _ = build(v, tokenizer, tmp_path / "cache")
    with pytest.raises(DataError, match=r"val.jsonl:3: label '2' is not one the model knows.*indexes these names \(0..1\)"):
        split.assign_labels(LabelMap(["World", "Sports"]))
    v.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": "Sports"}\n')
    split, _ = build(v, tokenizer, tmp_path / "cache")
    split.assign_labels(LabelMap(["World", "Sports"]))
    assert split.labels().tolist() == [0, 1]


def test_csv_integer_labels_index_names(tmp_path: Path, tokenizer) -> None:
    (tmp_path / "d.csv").write_text("text,label\nhello there,1\nworld news,0\nmore,Sports\n")
    split, _ = build(tmp_path / "d.csv", tokenizer, tmp_path / "cache")
    split.assign_labels(LabelMap(["World", "Sports"]))
    assert split.labels().tolist() == [1, 0, 1]
    assert split.table.column("line").to_pylist() == [2, 3, 4]


def test_memory_stays_flat_in_the_row_count(tmp_path: Path, tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Python allocations while building and loading do not grow with the rows (Arrow holds them, on disk)."""
    monkeypatch.setattr(data_cache, "BATCH_ROWS", 500)
    encoder = make_encoder(tokenizer, 32)
    peaks = {}
    for n in (2_000, 20_000):
        f = write_jsonl(tmp_path / f"d{n}.jsonl", make_texts(n, seed=5))
        tracemalloc.start()
        data_cache.build_split(str(f), Fields("text", "label"), encoder, tmp_path / str(n), progress=False)
        split = data_cache.load_split(tmp_path / str(n), str(f))
        split.assign_labels(LabelMap(["World", "Sports", "Business", "Sci/Tech"]))
        lengths = split.lengths()
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert len(lengths) == n
    assert peaks[20_000] < 1.5 * peaks[2_000], peaks


def test_training_reuses_the_cache_and_cache_false_cleans_up(tiny_bert: Path, toy_data: Path, tmp_path: Path) -> None:
    from trainer.train import main

    cache = tmp_path / "cache"
    args = ("train.max_steps=4", "train.save_every=0", "data.test=test.jsonl", f"data.cache_dir={cache}")
    assert main(tiny_args(tiny_bert, toy_data, tmp_path / "a", *args)) == 0
    first = json.loads((tmp_path / "a" / "summary.json").read_text())["data"]
    assert first["cache"] == {"train": "built", "test": "built"}
    assert main(tiny_args(tiny_bert, toy_data, tmp_path / "b", *args)) == 0
    second = json.loads((tmp_path / "b" / "summary.json").read_text())["data"]
    assert second["cache"] == {"train": "hit", "test": "hit"}
    # Same rows, same validation carve, same predictions file.
    assert (tmp_path / "a" / "validation.jsonl").read_text() == (tmp_path / "b" / "validation.jsonl").read_text()
    a = [json.loads(x)["text"] for x in (tmp_path / "a" / "test_predictions.jsonl").read_text().splitlines()]
    assert a == [json.loads(x)["text"] for x in (toy_data / "test.jsonl").read_text().splitlines()]
    shared = (tmp_path / "a" / "adapter" / "loraship.json").read_text()
    assert json.loads(shared)["config"]["data"]["cache_dir"] == "" and str(cache) not in shared, "no local paths in the adapter"
    # cache=false: tokenized under the run dir, removed at the end; the shared cache is not touched.
    entries = sorted(p.name for p in cache.iterdir())
    assert main(tiny_args(tiny_bert, toy_data, tmp_path / "c", *args, "data.cache=false", "data.max_length=24")) == 0
    assert json.loads((tmp_path / "c" / "summary.json").read_text())["data"]["cache"]["train"] == "built"
    assert not (tmp_path / "c" / ".data").exists()
    assert sorted(p.name for p in cache.iterdir()) == entries


def test_lengths_column_drives_the_sampler(tmp_path: Path, tokenizer) -> None:
    from trainer.data import LengthGroupedSampler

    f = write_jsonl(tmp_path / "d.jsonl", make_texts(300, seed=9, max_words=60))
    split, _ = build(f, tokenizer, tmp_path / "cache", max_length=128)
    lengths = split.lengths()
    assert isinstance(lengths, np.ndarray) and lengths.tolist() == [len(x) for x in split.table.column("input_ids").to_pylist()]
    order = list(LengthGroupedSampler(lengths, 8, seed=0))
    assert sorted(order) == list(range(300))


def test_batches_are_fetched_across_record_batches(tmp_path: Path, tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows come from many Arrow record batches (chunks); a batch gathers them chunk by chunk, in order."""
    monkeypatch.setattr(data_cache, "BATCH_ROWS", 7)
    rows = make_texts(50, seed=11)
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    split, _ = build(f, tokenizer, tmp_path / "cache")
    assert split.table.column("input_ids").num_chunks == 8
    split.assign_labels(LabelMap(["World", "Sports", "Business", "Sci/Tech"]))
    part = split.select(np.array([49, 0, 13, 7, 6, 48, 21]))
    items = part.__getitems__(list(range(7)))
    want = tokenizer([rows[i][0] for i in (49, 0, 13, 7, 6, 48, 21)], truncation=True, max_length=32)["input_ids"]
    assert [it["input_ids"] for it in items] == want
    assert [it["index"] for it in items] == list(range(7))
    assert part.texts() == [rows[i][0] for i in (49, 0, 13, 7, 6, 48, 21)]
    assert part.labels().tolist() == [["World", "Sports", "Business", "Sci/Tech"].index(rows[i][1]) for i in (49, 0, 13, 7, 6, 48, 21)]


def test_a_shared_cache_keeps_other_hosts_partial_builds(tmp_path: Path) -> None:
    """On a cache shared by several machines, a pid means something only on its own host: a machine cleaning
    up after its own dead builds must not remove another machine's build in progress."""
    from trainer.data_cache import HOST, _remove_stale_partials

    dead = 2**22 + 12345  # above pid_max's default: no such process here
    mine, theirs = tmp_path / f".k.{HOST}.{dead}.partial", tmp_path / f".k.otherhost.{dead}.partial"
    for p in (mine, theirs):
        p.mkdir()
    _remove_stale_partials(tmp_path, "k")
    assert not mine.exists() and theirs.exists()
