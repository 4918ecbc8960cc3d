"""`serve_cli predict --engine ray`: the same export over Ray Data, from a laptop to a cluster.

    serve_cli predict --engine ray --model runs/agnews_minilm/onnx --input 'data/*.parquet' --output preds/
    ray start --head; serve_cli predict --engine ray --address auto ...      # an existing cluster

Plan: the driver lists the input files (a file, a directory or a glob, on any filesystem pyarrow reads) and
cuts them into read units (a Parquet row group, a whole JSONL or CSV file); Ray tasks read the units into
rows (file, row, id, text) or error rows (file, row, error); a fixed pool of actors (`--actors`), each holding
one `OnnxClassifier`, predicts every batch in length order; the result is written to a temp dir beside
--output and renamed: OUTPUT/predictions/ (parquet or jsonl parts), OUTPUT/errors/ (jsonl parts),
OUTPUT/summary.json. Rows in = predicted + errors, checked before the rename.

The model dir travels through the object store (one tar, checked by sha256 on every worker, and each ONNX
file against the export report's hash), and serve_cli itself through the runtime env, so workers need no
shared filesystem, only the same Python packages. A worker that dies is restarted and its batches retried
(actor restarts, task retries): a batch's output only counts once its task has finished, so every row is
written exactly once.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import io
import json
import logging
import os
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loraship import rows as reader
from loraship.files import REPORT
from loraship.fsutil import atomic_dir
from loraship.task import Task
from serve_cli.runtime import (
    VARIANT_FILES,
    ModelDirError,
    OnnxClassifier,
    default_variant,
    input_fields,
    predict_proba_sorted,
    read_model_dir,
)

ROWS_SCHEMA = [("file", "string"), ("row", "int64"), ("id", "string"), ("text", "string"), ("text_pair", "string"), ("error", "string")]
# Single-label rows fill label, score, top_k; regression rows score; multi-label rows labels and scores (JSON text, as serve_cli
# predict writes them), so every output format has one type per column.
OUT_SCHEMA = [("file", "string"), ("row", "int64"), ("id", "string"), ("label", "string"), ("score", "float64"),
              ("top_k", "string"), ("labels", "string"), ("scores", "string"), ("error", "string")]
PREDICTION_COLUMNS = ("label", "score", "top_k", "labels", "scores")
SUFFIXES = {k: v for k, v in reader.SUFFIXES.items() if v != "txt"}  # "json": JSON Lines or an array, by content
READ_ROWS = 4096  # rows per table a reader task yields
WINDOW_BATCHES = 32  # model batches per actor call, sorted by length together (the local engine's window)
# Fault drills (tests): seconds each actor sleeps per batch, so a test can kill one mid-job.
DELAY_ENV = "LORASHIP_RAY_BATCH_DELAY_S"
CRASH_ENV = "LORASHIP_RAY_CRASH_ON_TEXT"  # fault drill: an actor given a batch holding this text dies
# A batch whose actor dies (out of memory, killed) is retried on a restarted actor this many times; then
# its rows are reported as errors and the job goes on. Actors themselves are always restarted.
MAX_BATCH_RETRIES = 2


class RayJobError(RuntimeError):
    """A problem with the job's inputs, outputs or cluster, said in one line."""


# --- inputs ------------------------------------------------------------------------------------------


def _filesystem(spec: str) -> tuple[Any, str]:
    import pyarrow.fs as pafs

    if "://" in spec:
        return pafs.FileSystem.from_uri(spec)
    return pafs.LocalFileSystem(), str(Path(spec).expanduser().resolve())


def list_inputs(spec: str) -> list[tuple[str, str]]:
    """(uri, kind) of every input file: `spec` is a file, a directory (searched recursively) or a glob."""
    import pyarrow.fs as pafs

    fs, path = _filesystem(spec)
    wild = next((i for i, part in enumerate(path.split("/")) if any(c in part for c in "*?[")), None)
    if wild is None:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            candidates = [path]
        elif info.type == pafs.FileType.Directory:
            candidates = [i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if i.type == pafs.FileType.File]
        else:
            raise RayJobError(f"{spec}: no such file or directory")
    else:
        base = "/".join(path.split("/")[:wild]) or "/"
        found = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        candidates = [i.path for i in found if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, path)]
    prefix = spec.split("://")[0] + "://" if "://" in spec else ""
    files = sorted((prefix + p if prefix else p, SUFFIXES[Path(p).suffix.lower()]) for p in candidates
                   if Path(p).suffix.lower() in SUFFIXES and not Path(p).name.startswith((".", "_")))
    if not files:
        raise RayJobError(f"{spec}: no {', '.join(SUFFIXES)} files found")
    return files


def read_units(files: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Work units: one per Parquet row group (big files spread over many readers), one per text file."""
    import pyarrow.parquet as pq

    units = []
    for uri, kind in files:
        if kind != "parquet":
            units.append({"uri": uri, "kind": kind, "group": -1, "first": 0})
            continue
        fs, path = _filesystem(uri)
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
        first = 0
        for g in range(meta.num_row_groups):
            units.append({"uri": uri, "kind": kind, "group": g, "first": first})
            first += meta.row_group(g).num_rows
    return units


def _table(columns: dict[str, list[Any]], schema: list[tuple[str, str]]) -> Any:
    """An Arrow table with fixed column types: a block of only good rows (all-null `error`) must not get
    a `null` column type that another block contradicts."""
    import pyarrow as pa

    return pa.table({name: pa.array(columns[name], type=getattr(pa, t)()) for name, t in schema})


def _unit_rows(unit: dict[str, Any], fields: reader.Fields) -> Iterator[tuple[int, Any, str | None, str | None, str | None]]:
    """(row number, id, text, text_pair, error) of one unit, through the one reader (loraship.rows)."""
    fs, path = _filesystem(unit["uri"])
    try:
        parquet = unit["kind"] == "parquet"
        with fs.open_input_file(path) if parquet else io.BufferedReader(fs.open_input_stream(path)) as f:  # lines: buffered
            fmt = "auto" if unit["kind"] == "json" else unit["kind"]  # .json: JSON Lines or an array, by content
            group = unit["group"] if unit["group"] >= 0 else None
            for item in reader.read_stream(f, unit["uri"], fmt, fields, group, unit["first"])[1]:
                if isinstance(item, reader.RowError):
                    yield item.line, None, None, None, item.message
                else:
                    yield item.line, item.id, item.text, item.text_pair, None
    except (OSError, ValueError) as e:
        # An unreadable file (no such column, not Parquet, I/O) is one error row naming the file.
        yield 0, None, None, None, f"cannot read the rest of the file: {e}"


def read_unit(batch: Any, text_field: str, id_field: str | None, text_pair_field: str | None = None) -> Iterator[Any]:
    """Ray Data UDF: the rows of each unit in `batch`, READ_ROWS at a time; a bad row becomes an error row
    with the same words as `serve_cli predict`."""
    fields = reader.Fields(text_field, id=id_field, text_pair=text_pair_field)
    for unit in batch.to_pylist():
        out: dict[str, list[Any]] = {"file": [], "row": [], "id": [], "text": [], "text_pair": [], "error": []}
        for n, rid, text, pair, error in _unit_rows(unit, fields):
            out["file"].append(unit["uri"])
            out["row"].append(n)
            out["id"].append(str(rid) if rid is not None else f"{Path(unit['uri']).name}:{n}")
            out["text"].append(text)
            out["text_pair"].append(pair)
            out["error"].append(error)
            if len(out["row"]) == READ_ROWS:
                yield _table(out, ROWS_SCHEMA)
                out = {key: [] for key in out}
        if out["row"]:
            yield _table(out, ROWS_SCHEMA)


# --- the model, shipped through the object store -----------------------------------------------------


def pack_model(model_dir: Path, variant: str) -> tuple[bytes, str]:
    """The files a worker needs (one ONNX variant, tokenizer, config, report) as a tar, and its sha256."""
    keep = {p for p in model_dir.iterdir() if p.is_file() and p.suffix != ".onnx" and not p.name.startswith(".")}
    keep.add(model_dir / VARIANT_FILES[variant])
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for p in sorted(keep):
            tar.add(p, arcname=p.name)
    blob = buf.getvalue()
    return blob, hashlib.sha256(blob).hexdigest()


def unpack_model(blob: bytes, digest: str) -> Path:
    """Check the tar's hash and each ONNX file against the report, then extract to a private temp dir."""
    got = hashlib.sha256(blob).hexdigest()
    if got != digest:
        raise ModelDirError(f"model archive hash mismatch on this worker: {got} != {digest}")
    out = Path(tempfile.mkdtemp(prefix=f"loraship-model-{digest[:12]}-"))
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        # The "data" filter (Python >= 3.11.4) refuses links and paths outside `out`; the archive is our own,
        # checked by its hash above, so older 3.11 releases extract it as it is.
        if hasattr(tarfile, "data_filter"):
            tar.extractall(out, filter="data")
        else:
            tar.extractall(out)
    report = json.loads((out / REPORT).read_text()) if (out / REPORT).is_file() else {}
    for name, v in (report.get("variants") or {}).items():
        f = out / v.get("file", "")
        if f.is_file() and v.get("sha256") and hashlib.sha256(f.read_bytes()).hexdigest() != v["sha256"]:
            raise ModelDirError(f"{name} variant {f.name}: sha256 differs from the export report")
    return out


class Predictor:
    """Ray Data actor: loads the export once, then labels every batch it is given, in length order."""

    def __init__(self, model: list[Any], digest: str, variant: str, threads: int, max_length: int, top_k: int,
                 batch_size: int, delay: float, crash_on: str = "") -> None:
        import ray

        model_dir = unpack_model(ray.get(model[0]), digest)
        try:
            # No spinning: an actor shares its cores with Ray's own processes and the readers. The session and
            # tokenizer are read into memory here, so the unpacked files are removed at once: an actor that
            # is restarted many times leaves nothing behind.
            self.clf = OnnxClassifier(model_dir, variant=variant, threads=threads or None, max_length=max_length or None, spin=False)
        finally:
            shutil.rmtree(model_dir, ignore_errors=True)
        self.k = max(1, min(top_k, len(self.clf.labels)))
        self.batch_size = batch_size
        self.delay = delay
        self.crash_on = crash_on

    def __call__(self, batch: Any) -> Any:
        if self.delay:
            time.sleep(self.delay)
        cols = batch.to_pydict()
        if self.crash_on and self.crash_on in (t or "" for t in cols["text"]):
            os._exit(137)  # fault drill: a batch that always kills its worker, as an out-of-memory kill does
        ok = [i for i, e in enumerate(cols["error"]) if e is None]
        inputs = [cols["text"][i] if cols["text_pair"][i] is None else (cols["text"][i], cols["text_pair"][i]) for i in ok]
        probs = predict_proba_sorted(self.clf, inputs, self.batch_size)
        n = batch.num_rows
        cols.update({c: [None] * n for c in PREDICTION_COLUMNS})
        for i, p in zip(ok, probs, strict=True):
            for key, value in self.clf.task.row_output(p, self.k).items():  # the same values as serve_cli predict
                cols[key][i] = value if key in ("label", "score") else json.dumps(value)
        return _table(cols, OUT_SCHEMA)


# --- the job -----------------------------------------------------------------------------------------


def _init_ray(address: str | None) -> Any:
    if not address:
        # The job's own cluster serves only this machine: keep it on 127.0.0.1 (Ray otherwise binds its
        # services to the network address, which sandboxes and firewalls may block). Ray's variable name.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    import serve_cli

    # Each actor owns its cores: no tokenizer thread pool on top of onnxruntime's threads.
    runtime_env = {"py_modules": [str(Path(serve_cli.__file__).parent)], "env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False, logging_level="WARNING")
    else:
        ray.init(runtime_env=runtime_env, log_to_driver=False, include_dashboard=False, logging_level="WARNING")
    return ray


def _split(table: Any, errors: bool, unused: list[str]) -> Any:
    """The error rows, or the predicted rows without the error column and the other task's columns."""
    import pyarrow.compute as pc

    mask = pc.is_valid(table["error"]) if errors else pc.is_null(table["error"])
    part = table.filter(mask)
    return part.select(["file", "row", "id", "error"]) if errors else part.drop_columns(["error", *unused])


def lost_rows(read: Any, predicted: Any) -> Any:
    """Error rows for the rows that were read but came out of no batch (their batch kept killing its actor);
    None when every row came out."""
    import pyarrow as pa

    if read.count() == predicted.count():
        return None
    keys = ["file", "row", "id"]
    read_keys = pa.concat_tables(ray_tables(read, keys))
    done = pa.concat_tables(ray_tables(predicted, ["file", "row"]))
    lost = read_keys.join(done, keys=["file", "row"], join_type="left anti")
    n = lost.num_rows
    message = (f"the model worker died {MAX_BATCH_RETRIES + 1} times on the batch holding this row "
               "(out of memory?); try a smaller --batch-size or more memory per actor")
    cols = {"file": lost["file"].to_pylist(), "row": lost["row"].to_pylist(), "id": lost["id"].to_pylist(),
            **{c: [None] * n for c in PREDICTION_COLUMNS}, "error": [message] * n}
    return _table(cols, OUT_SCHEMA)


def ray_tables(ds: Any, columns: list[str]) -> list[Any]:
    import ray

    return [t.select(columns) for t in ray.get(ds.to_arrow_refs())]


def run_job(args: argparse.Namespace) -> dict[str, Any]:
    """Read, predict and write; returns the counts. Raises RayJobError/ModelDirError for what the user can fix."""
    start = time.perf_counter()
    model_dir = Path(args.model)
    config, report = read_model_dir(model_dir)
    variant = args.variant or default_variant(model_dir, report)
    if not (model_dir / VARIANT_FILES[variant]).is_file():
        raise ModelDirError(f"{model_dir / VARIANT_FILES[variant]}: variant {variant} not in this export")
    task = Task.from_config(config)
    text_field, pair_field = input_fields(task, args.text_field, args.text_pair_field)
    units = read_units(list_inputs(args.input))
    blob, digest = pack_model(model_dir, variant)
    out = Path(args.output)
    with atomic_dir(out, args.overwrite, "--overwrite", "prediction output") as tmp:
        ray = _init_ray(args.address)
        try:
            import ray.data

            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = not args.quiet and sys.stderr.isatty()
            if not os.environ.get("LORASHIP_VERBOSE"):
                # Ray Data logs every execution plan and progress line at INFO; we print one summary.
                logging.getLogger("ray.data").setLevel(logging.WARNING)
            actors = args.actors or max(1, int(ray.cluster_resources().get("CPU", 1)) // max(1, args.threads_per_actor))
            model_ref = ray.put(blob)
            # Batches that keep killing their actor are dropped by Ray Data after their retries; lost_rows()
            # then reports their rows as errors, so every row still gets an output or an error.
            ctx.max_errored_blocks = -1
            # Blocks of one window each: one actor call per block, so a batch that kills its actor costs that
            # window's rows, not a whole file's.
            window = args.batch_size * WINDOW_BATCHES
            read = (
                ray.data.from_items(units, override_num_blocks=len(units))
                .map_batches(read_unit, batch_size=1, batch_format="pyarrow", num_cpus=0, max_retries=3,
                             fn_kwargs={"text_field": text_field, "id_field": args.id_field, "text_pair_field": pair_field})
                # Ray merges small outputs into big blocks; cut them back to one window each. Materialized
                # before the actors start: they hold the CPUs these tasks need.
                .repartition(target_num_rows_per_block=window)
                .materialize()
            )
            predicted = (
                read.map_batches(
                    Predictor,
                    batch_format="pyarrow",
                    batch_size=window,  # rows sorted by length together, as the local engine
                    # One batch in flight per actor: an actor killed by one batch (out of memory) must not take
                    # the retries of other batches queued on it, which would then be reported as errors too.
                    compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1),
                    num_cpus=args.threads_per_actor,
                    fn_constructor_kwargs={
                        "model": [model_ref], "digest": digest, "variant": variant, "threads": args.threads_per_actor,
                        "max_length": args.max_length, "top_k": args.top_k, "batch_size": args.batch_size,
                        "delay": float(os.environ.get(DELAY_ENV, "0") or 0), "crash_on": os.environ.get(CRASH_ENV, ""),
                    },
                    # A dead actor is restarted and its unfinished batch resubmitted, a bounded number of times.
                    max_restarts=-1,
                    max_task_retries=MAX_BATCH_RETRIES,
                )
                .materialize()  # computed once; the two writes below read the stored blocks
            )
            lost = lost_rows(read, predicted)
            if lost is not None:
                predicted = predicted.union(ray.data.from_arrow(lost))
            unused = (["label", "score", "top_k"] if task.multi else ["label", "top_k", "labels", "scores"] if task.regression
                      else ["labels", "scores"])
            ok = predicted.map_batches(_split, fn_kwargs={"errors": False, "unused": unused}, batch_format="pyarrow")
            bad = predicted.map_batches(_split, fn_kwargs={"errors": True, "unused": unused}, batch_format="pyarrow")
            n_in, n_ok, n_err = read.count(), ok.count(), bad.count()
            if n_in != n_ok + n_err:
                raise RayJobError(f"row counts do not add up: {n_in} in, {n_ok} predicted, {n_err} errors")
            if args.output_format == "jsonl":
                ok.write_json(str(tmp / "predictions"))
            else:
                ok.write_parquet(str(tmp / "predictions"))
            if n_err:
                bad.write_json(str(tmp / "errors"))
        finally:
            ray.shutdown()
        summary = {
            "rows_in": n_in, "predicted": n_ok, "errors": n_err, "files": len({u["uri"] for u in units}),
            "variant": variant, "model_sha256": digest, "actors": actors, "threads_per_actor": args.threads_per_actor,
            "output_format": args.output_format, "seconds": round(time.perf_counter() - start, 2),
        }
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
