"""Regenerate the generated sections of the docs from their sources, or check them (--check).

    python benchmarks/report.py          # rewrite the sections
    python benchmarks/report.py --check  # exit 1 if a file is out of date (a test runs this)

- docs/config.md "config-reference": from the field docs of the dataclasses in trainer/config.py.
- benchmarks/README.md "results": every table, from benchmarks/results/*.json (never typed by hand).
- README.md "headline": a few headline figures with their machine, from the same JSON files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
CONFIG_DOC = REPO / "docs" / "config.md"
BENCH_README = REPO / "benchmarks" / "README.md"
RESULTS = REPO / "benchmarks" / "results"


def config_reference() -> str:
    sys.path.insert(0, str(REPO))
    from trainer.config import field_docs

    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, typ, default, doc in field_docs():
        lines.append(f"| `{key}` | {typ} | `{json.dumps(default)}` | {doc} |")
    return "\n".join(lines)


def _load(name: str) -> dict[str, Any] | None:
    p = RESULTS / f"{name}.json"
    return json.loads(p.read_text()) if p.is_file() else None


def results() -> str:
    out: list[str] = []
    machines = set()
    q = _load("quality")
    if q:
        machines.add((q["machine"]["cpu"], q["machine"]["cores"]))
        out += [f"### Quality: AG News test split ({q['test_rows']:,} rows), accuracy / weighted F1", "",
                "| setup | untrained | best adapter | merged | ONNX fp32 | ONNX int8 | training wall time |", "|---|---|---|---|---|---|---|"]
        for r in q["rows"]:
            cells = [f"{r[c]['accuracy']:.4f} / {r[c]['f1_weighted']:.4f}" for c in ("untrained", "adapter", "merged", "onnx_fp32", "onnx_int8")]
            out.append(f"| {r['name']} | " + " | ".join(cells) + f" | {r['train_seconds'] / 60:.1f} min |")
        out += ["", "Reference project: 0.918 / 0.918 (distilbert-base-uncased, 120k rows, GPU); untrained head 0.25.",
                f"Command: `{q['command']}`.", ""]
    t = _load("train_throughput")
    if t:
        machines.add((t["machine"]["cpu"], t["machine"]["cores"]))
        out += [f"### Training throughput (median of {t['reps']} runs of {t['steps']} steps)", "",
                "| setup | samples/s | tokens/s | x reference | MFU |", "|---|---|---|---|---|"]
        for r in t["rows"]:
            mfu = f"{r['mfu']:.0%}" if r.get("mfu") is not None else "-"
            out.append(f"| {r['name']} | {r['samples_per_second']:.1f} | {r['tokens_per_second']:.0f} | {r['ratio_vs_reference']:.2f} | {mfu} |")
        out += ["", f"Command: `{t['command']}`.", ""]
    i = _load("inference")
    if i:
        machines.add((i["machine"]["cpu"], i["machine"]["cores"]))
        out += [f"### Inference, end to end on the {i['test_rows']:,} test texts (process start to predictions written)", "",
                "| setup | rows/s | x pipeline | accuracy | p50 / p95 ms (batch 1) | size |", "|---|---|---|---|---|---|"]
        for r in i["rows"]:
            lat = f"{r['p50_ms']:.1f} / {r['p95_ms']:.1f}" if "p50_ms" in r else "-"
            out.append(f"| {r['name']} | {r['rows_per_second']:.0f} | {r['ratio_vs_pipeline']:.2f} | {r['accuracy']:.4f} | {lat} | {r['size_mb']:.1f} MB |")
        out += ["", f"Cold start, `serve_cli predict` on a 10-row file (process start to exit): {i['cold_start_seconds']:.2f} s.",
                f"Command: `{i['command']}`.", ""]
    qz = _load("quantization")
    if qz:
        machines.add((qz["machine"]["cpu"], qz["machine"]["cores"]))
        out += [f"### Int8 methods of the export (in process, serve_cli batching, median of {qz['reps']} runs)", "",
                "| method | rows/s | accuracy | size |", "|---|---|---|---|"]
        for r in qz["rows"]:
            if "error" in r:
                out.append(f"| {r['name']} | failed | - | - |")
            else:
                out.append(f"| {r['name']} | {r['rows_per_second']:.0f} | {r['accuracy']:.4f} | {r['size_mb']:.1f} MB |")
        out += ["", f"Command: `{qz['command']}`.", ""]
    out += train_step(machines) + int8_candidates(machines) + int8_profile(machines) + recipe_table(machines) + pooling(machines)
    out += multilabel(machines)
    out += pairs(machines)
    h = _load("serve_http")
    if h:
        machines.add((h["machine"]["cpu"], h["machine"]["cores"]))
        sm = h["summary"]
        reps = h.get("reps", 1)
        out += [f"### HTTP serving, closed loop on loopback ({h['machine']['cpu']}, {h['machine']['cores']} cores, "
                f"flags: {', '.join(h['machine'].get('flags', [])) or 'n/a'}; "
                + (f"median of {reps} runs per cell)" if reps > 1 else "one run)"), "",
                f"`serve_cli serve` ({h['variant']}, dynamic batching) vs the naive server a user writes (FastAPI + transformers "
                "`pipeline` per request, fp32), each request 1 or 32 AG News test texts, "
                f"{h['duration_s']:g} s of load per run; the load generator (a minimal keep-alive HTTP/1.1 client) shares "
                "the machine's cores with the server.", "",
                "| server | texts/request | clients | requests | rows/s | p50 ms | p99 ms | CPU ms per request: server (its event loop) / load generator |",
                "|---|---|---|---|---|---|---|---|"]
        for r in h["rows"]:
            cpu = (f"{r['server_cpu_ms_per_request']:.2f} ({r['event_loop_cpu_ms_per_request']:.2f}) / {r['client_cpu_ms_per_request']:.2f}"
                   if "server_cpu_ms_per_request" in r else "-")
            out.append(f"| {r['server']} | {r['texts_per_request']} | {r['concurrency']} | {r['requests']} | "
                       f"{r['rows_per_second']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {cpu} |")
        out += ["", f"`serve_cli predict` on the same texts, in process: {sm['predict_rows_per_second']:.0f} rows/s. "
                f"Single-text requests at 64 clients: {sm['ours_single_c64_vs_predict']:.2f}x of that, "
                f"{sm['ours_vs_naive_single_c64']:.1f}x the naive server"
                + (f" (p99 {sm['ours_p99_ms_single_c64']:.0f} ms; without merging equal-length texts in deep queues, "
                   f"`--merge-depth 0`: {sm['no_merge_single_c64_vs_predict']:.2f}x, p99 {sm['no_merge_p99_ms_single_c64']:.0f} ms)"
                   if "no_merge_single_c64_vs_predict" in sm else "")
                + f"; p99 at 8 clients {sm['ours_p99_ms_single_c8']:.1f} ms"
                + (f" ({sm['ours_p99_over_p50_single_c8']:.2f}x p50"
                   + "".join(f"; with `--max-batch-size {n}` {sm[f'batch{n}_p99_over_p50_single_c8']:.2f}x"
                             for n in (4, 32) if f"batch{n}_p99_over_p50_single_c8" in sm)
                   + ")" if "ours_p99_over_p50_single_c8" in sm else "")
                + (f"; one 32-text request at 1 client {sm['ours_32_texts_c1_vs_predict']:.2f}x `serve_cli predict`'s rows/s"
                   if "ours_32_texts_c1_vs_predict" in sm else "") + ". "
                + (f"Labels equal to `serve_cli predict`'s under 64-client load: {100 * sm['int8_label_agreement_with_predict_c64']:.2f}%."
                   if sm.get("int8_label_agreement_with_predict_c64") is not None else ""),
                (f"By Little's law, 8 closed-loop clients see a mean latency of at least 8 / (the model's best rows/s) = "
                 f"{sm['little_law_min_mean_ms_c8']:.0f} ms on this CPU, whatever the server does."
                 if "little_law_min_mean_ms_c8" in sm else ""),
                f"Command: `{h.get('command', 'python benchmarks/serve_http.py')}`.", ""]
    d = _load("data_scale")
    if d:
        machines.add((d["machine"]["cpu"], d["machine"]["cores"]))
        runs, sp = d["runs"], d["speed_20k"]
        out += ["### Training data past memory", "",
                f"The AG News training copy repeated to {d['rows']:,} rows ({d['steps']} training steps each, real `accelerate launch`; "
                f"{d['machine']['cpu']}, {d['machine']['cores']} cores). Peak RSS is each trainer process's VmHWM "
                "(anonymous memory plus the file pages it has mapped).", "",
                "| run | data setup | cache | peak RSS per process |", "|---|---|---|---|"]
        names = {"first_run_1proc": "first run, 1 process", "rerun_1proc": "rerun, 1 process", "rerun_2proc": "2 processes (cpu_2proc)"}
        for key, name in names.items():
            r = runs[key]
            rss = ", ".join(f"{m / 1024:.2f} GiB" for m in r["peak_rss_mb_per_process"])
            out.append(f"| {name} | {r['data_setup_seconds']:.1f} s | {r['data_cache']['train']} | {rss} |")
        a, b = sp["arrow"], sp["lists_baseline"]
        out += ["", f"Training speed on the 20k copy, side by side in the same run (median of {len(a['samples_per_second'])}): "
                f"Arrow data {a['samples_per_second_median']:.1f} samples/s, the previous list-based data path "
                f"({d['baseline_ref']}) {b['samples_per_second_median']:.1f} samples/s; peak RSS {a['peak_rss_mb']/1024:.2f} vs "
                f"{b['peak_rss_mb']/1024:.2f} GiB. Most of the RSS is the training step itself (activations of a 32 x 128-token "
                "batch), the same at 20k and at 2M rows.", "Command: `python benchmarks/data_scale.py`.", ""]
    r = _load("inference_ray")
    if r:
        machines.add((r["machine"]["cpu"], r["machine"]["cores"]))
        out += ["### Prediction on Ray Data", "",
                f"`serve_cli predict` (one process, all cores) vs `--engine ray` on a local Ray cluster of this machine "
                f"({r['machine']['cpu']}, {r['machine']['cores']} cores), AG News test texts, default variant; whole process "
                "wall time, Ray's cluster start included.", "",
                "| rows | setup | rows/s | x local |", "|---|---|---|---|"]
        for row in r["rows"]:
            out.append(f"| {row['rows']:,} | {row['name']} | {row['rows_per_second']:.0f} | {row['ratio_vs_local']:.2f} |")
        agree = r.get("label_agreement_ray_vs_local") or {}
        if agree:
            out += ["", "Labels equal between the engines (2 actors vs local, int8): " + ", ".join(
                f"{100 * v:.2f}% of {int(k):,} rows" for k, v in agree.items()) + "; dynamic int8 picks activation scales per "
                "batch and the engines form different batches (fp32, and int8 over the same batches, are tested equal)."]
        out += ["", f"Command: `{r['command']}`.", ""]
    if not out:
        return "No measurements saved yet: run the scripts in `benchmarks/` (see benchmarks/README.md)."
    head = "Measured on " + "; ".join(f"{cpu}, {cores} cores" for cpu, cores in sorted(machines)) + ", by the scripts in `benchmarks/` (figures from `benchmarks/results/*.json`)."
    return head + "\n\n" + "\n".join(out).rstrip()


def _measured(name: str, machines: set[tuple[str, int]]) -> dict[str, Any] | None:
    """The saved result, its machine noted for the results' header."""
    r = _load(name)
    if r:
        machines.add((r["machine"]["cpu"], r["machine"]["cores"]))
    return r


def train_step(machines: set[tuple[str, int]]) -> list[str]:
    r = _measured("train_step", machines)
    if not r:
        return []
    m = r["machine"]
    first = r["rows"][0]["variant"]
    out = [f"### Training-step options (median of {r['reps']} runs of {r['steps']} steps; {m['cpu']}, {m['cores']} cores, "
           f"flags: {', '.join(m.get('flags', [])) or 'n/a'})", "",
           "The default model and batches, one option changed per row (`benchmarks/train_step.py` says what each does).", "",
           f"| variant | samples/s | x {first} | compile s |", "|---|---|---|---|"]
    for row in r["rows"]:
        compiled = f"{row['compile_seconds']:.0f}" if row.get("compile_seconds") is not None else "-"
        out.append(f"| {row['variant']} | {row['samples_per_second']:.1f} | {row['x_first']:.2f} | {compiled} |")
    reasons: dict[str, list[str]] = {}
    for name, why in r.get("skipped", {}).items():
        reasons.setdefault(why, []).append(name)
    skipped = [f"Not measured ({why}): {', '.join(names)}." for why, names in reasons.items()]
    return [*out, "", *skipped, *([""] if skipped else []), f"Command: `{r['command']}`.", ""]


def int8_candidates(machines: set[tuple[str, int]]) -> list[str]:
    c = _measured("int8_candidates", machines)
    if not c:
        return []
    m = c["machine"]
    out = [f"### Accuracy-aware int8, per task ({m['cpu']}, {m['cores']} cores, flags: {', '.join(m.get('flags', [])) or 'n/a'})", "",
           "The export's search with every candidate measured; it chooses on the run's validation split "
           "and training texts (expected drop: fp32's probabilities as soft labels), the test split only reports. "
           "rows/s: serve_cli batching, median of interleaved runs; flips: argmax changes per 10,000 test rows between "
           "serve_cli's sorted batches and random batches of 32.", "",
           "| task | candidate | expected drop val / train | val acc | test acc (drop) | rows/s (x fp32) | flips/10k | |",
           "|---|---|---|---|---|---|---|---|"]
    for t in c["tasks"]:
        # The export (without --int8-try-all) keeps the first candidate that qualifies: candidates come fastest first.
        ok = [r["name"] for r in t["rows"] if "within the criterion" in (r.get("why") or "")]
        for r in t["rows"]:
            mark = "" if r["name"] not in ok else ("chosen by the export" if r["name"] == ok[0] else "qualifies")
            exp = "-" if r.get("expected_drop_points") is None else f"{r['expected_drop_points']:+.2f} / {r['unlabelled_expected_drop_points']:+.2f}"
            out.append(f"| {t['task']} ({t['labels']} labels, {t['validation_rows']:,} val / {t['test_rows']:,} test) | {r['name']} | {exp} | "
                       f"{r['validation_accuracy']:.4f} | {r['test_accuracy']:.4f} ({r['test_drop_points']:+.2f}) | "
                       f"{r['rows_per_second']:.0f} ({r['x_fp32']:.2f}x) | {r['flips_per_10k_rows']:.0f} | {mark} |")
    return [*out, "", f"Command: `{c['command']}`.", ""]


def int8_profile(machines: set[tuple[str, int]]) -> list[str]:
    p = _measured("int8_profile", machines)
    if not p:
        return []
    fp, q = p["variants"]["fp32"], p["variants"]["int8"]
    return [f"### Where int8 time goes (AG News, {p['rows']:,} test texts, session time, {p['threads']} threads)", "",
            "| variant | rows/s | ms/row | linear layers ms/row | everything else ms/row |", "|---|---|---|---|---|",
            *[f"| {v} | {r['rows_per_second']:.0f} | {r['ms_per_row']:.2f} | {r['linear_ms_per_row']:.2f} | {r['other_ms_per_row']:.2f} |"
              for v, r in (("fp32", fp), (f"int8 ({p['int8_method']})", q))],
            "", f"int8 {p['int8_x_fp32']:.2f}x fp32; its linear layers {p['linear_layers_int8_x_fp32']:.2f}x. What stays fp32 "
            "(LayerNorm, GELU, softmax, attention's activation products) bounds the whole: with linear layers exactly 2x faster "
            f"(the int8/fp32 multiply-add peak without VNNI) the model would gain {p['bound_if_linear_2x']:.2f}x.",
            f"Command: `{p['command']}`.", ""]


def recipe_table(machines: set[tuple[str, int]]) -> list[str]:
    r = _measured("recipe", machines)
    if not r:
        return []
    m = r["machine"]
    out = [f"### Recipe settings, one training each ({m['cpu']}, {m['cores']} cores; single seed)", "",
           "Defaults with one setting changed; the best adapter is chosen on validation, test only reports. Task agnews under "
           "`train.time_budget_minutes=5` (equal training time per setting); agnews_full: the default epochs, no budget." + (f" {r['note']}" if r.get("note") else ""), "",
           "| task | setting | val acc | test acc | test macro F1 | epochs / steps | training |", "|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        if "error" in row:
            out.append(f"| {row['task']} | {row['setting']} | failed | | | | |")
            continue
        out.append(f"| {row['task']} | {row['setting']} | {row['validation_accuracy']:.4f} | {row['test_accuracy']:.4f} | "
                   f"{row['test_f1_macro']:.4f} | {row['epochs']} / {row['steps']} | {row['train_seconds'] / 60:.1f} min |")
    return [*out, "", f"Command: `{r['command']}`.", ""]


def pooling(machines: set[tuple[str, int]]) -> list[str]:
    r = _measured("pooling", machines)
    if not r:
        return []
    m = r["machine"]
    first = r["rows"][0]
    out = [f"### Pooling for the classifier, AG News ({m['cpu']}, {m['cores']} cores; single seed)", "",
           "The trainer's defaults and the same batches and schedule; cls: the model's own head (pooler on the first token, what "
           "loraship trains and exports), mean: the masked mean of the last layer's tokens into the classifier (how "
           f"all-MiniLM-L6-v2 was trained). Validation: {first['validation_rows']:,} held-out training rows; test: {first['test_rows']:,}.", "",
           "| pooling | epochs | val acc | test acc | training | samples/s |", "|---|---|---|---|---|---|"]
    for row in r["rows"]:
        out.append(f"| {row['arm']} | {row['epochs']} | {row['validation_accuracy']:.4f} | {row['test_accuracy']:.4f} | {row['train_seconds'] / 60:.1f} min | "
                   f"{row['samples_per_second']:.1f} |")
    return [*out, "", f"Command: `{r['command']}`.", ""]


def multilabel(machines: set[tuple[str, int]]) -> list[str]:
    r = _measured("multilabel", machines)
    if not r:
        return []
    m, t, o = r["machine"], r["test_torch"], r["test_onnx"]
    out = [f"### Multi-label: GoEmotions, 28 labels ({m['cpu']}, {m['cores']} cores; defaults and data paths only)", "",
           f"Training: {r['training']['steps']:,} steps ({r['training']['recipe']['epochs']:g} epochs, {r['training']['mixed_precision']}), "
           f"{r['training']['loop_seconds'] / 60:.1f} min; thresholds chosen on validation (global {r['thresholds']['global']:.2f}, "
           f"{r['thresholds']['own_threshold']} labels with their own). Test: {r['data']['test']:,} rows. Published reference: BERT-base "
           "macro F1 0.46 (the GoEmotions paper).", "",
           "| model | macro F1 | micro F1 | samples F1 | subset accuracy | rows/s |", "|---|---|---|---|---|---|",
           f"| trained adapter (PyTorch) | {t['f1_macro']:.4f} | {t['f1_micro']:.4f} | {t['f1_samples']:.4f} | {t['accuracy']:.4f} | - |"]
    for v in ("fp32", "int8"):
        tag = " (default)" if r["default_variant"] == v else ""
        out.append(f"| ONNX {v}{tag} | {o[v]['f1_macro']:.4f} | {o[v]['f1_micro']:.4f} | {o[v]['f1_samples']:.4f} | "
                   f"{o[v]['accuracy']:.4f} | {r['rows_per_second'][v]:.0f} |")
    same = "; ".join(f"{v}: HTTP {s['http_equal']:.2%}, Ray {s['ray_equal']:.2%}" for v, s in r["same_labels"].items())
    return [*out, "", f"int8 {r['int8_speedup']:.2f}x fp32's rows/s; its test drop: macro F1 {r['int8_drop_points']['f1_macro']:+.2f}, "
            f"micro F1 {r['int8_drop_points']['f1_micro']:+.2f} points. The first {next(iter(r['same_labels'].values()))['rows']:,} "
            f"test rows, labels equal to `serve_cli predict`'s: {same}.", "", "Command: `python benchmarks/multilabel.py`.", ""]


def pairs(machines: set[tuple[str, int]]) -> list[str]:
    r = _measured("pairs", machines)
    if not r:
        return []
    m = r["machine"]
    out = [f"### Sentence pairs: SICK entailment (3 classes) and relatedness (regression) ({m['cpu']}, {m['cores']} cores; "
           "defaults and data paths only)", "",
           f"{r['data']['train']:,} training pairs, {r['data']['validation']} validation, {r['data']['test']:,} test. Published "
           "references: SemEval-2014's best systems 0.845 accuracy / 0.828 Pearson; fine-tuned BERT-base about 0.88-0.89 Pearson.", "",
           "| task | model | metric | test | other figures | rows/s |", "|---|---|---|---|---|---|"]
    for name in ("entailment", "relatedness"):
        if name not in r:
            continue
        t, metric = r[name], r[name]["metric"]
        others = [k for k in t["test_onnx"]["fp32"] if k != metric][:3]
        out.append(f"| {name} | trained adapter (PyTorch) | {metric} | {t['test_torch'][metric]:.4f} | "
                   + ", ".join(f"{k} {t['test_torch'][k]:.4f}" for k in others) + " | - |")
        for v in ("fp32", "int8"):
            tag = " (default)" if t["default_variant"] == v else ""
            o = t["test_onnx"][v]
            out.append(f"| {name} | ONNX {v}{tag} | {metric} | {o[metric]:.4f} | " + ", ".join(f"{k} {o[k]:.4f}" for k in others)
                       + f" | {t['rows_per_second'][v]:.0f} |")
    for name in ("entailment", "relatedness"):
        if name in r:
            t = r[name]
            same = "; ".join(f"{v}: HTTP {x['http_equal']:.2%}, Ray {x['ray_equal']:.2%}" for v, x in t["same_outputs"].items())
            out += ["", f"{name}: {t['training']['steps']} steps ({t['training']['recipe']['epochs']:g} epochs, "
                    f"{t['training']['mixed_precision']}), {t['training']['loop_seconds']:.0f} s; int8 ({t['int8_chosen']}) "
                    f"{t['int8_speedup']:.2f}x fp32's rows/s, int8 minus fp32 on test {t['int8_minus_fp32']:+.4f} {t['metric']}; "
                    f"all {r['data']['test']:,} test pairs, outputs equal to `serve_cli predict`'s "
                    f"(label, or score within 1e-5): {same}."]
    return [*out, "", "Command: `python benchmarks/pairs.py`.", ""]


def headline() -> str:
    """The README's short results table: one line per headline figure, its machine, a link to the full results."""
    rows = []
    q, t, i, m, pr = (_load(n) for n in ("quality", "train_throughput", "inference", "multilabel", "pairs"))
    if q:
        best = max(q["rows"], key=lambda r: r["onnx_int8"]["accuracy"])
        rows.append(f"| AG News test accuracy, ONNX int8 (reference project: 0.918) | {best['onnx_int8']['accuracy']:.4f} | {q['machine']['cpu']} |")
    if t:
        best = max(t["rows"], key=lambda r: r["ratio_vs_reference"])
        rows.append(f"| training samples/s vs the HF Trainer recipe | {best['ratio_vs_reference']:.2f}x | {t['machine']['cpu']} |")
    if i:
        best = max(i["rows"], key=lambda r: r["ratio_vs_pipeline"])
        rows.append(f"| inference rows/s vs the HF pipeline (7,600 texts, end to end) | {best['ratio_vs_pipeline']:.2f}x | {i['machine']['cpu']} |")
    rows += serving_headline(i)
    if m:
        rows.append(f"| GoEmotions (multi-label) test macro F1, int8 default (paper's BERT-base: 0.46) | "
                    f"{m['test_onnx'][m['default_variant']]['f1_macro']:.4f} | {m['machine']['cpu']} |")
    if pr:
        for name, what in (("entailment", "SICK-E (sentence pairs) test accuracy"), ("relatedness", "SICK-R (regression) test Pearson")):
            if name in pr:
                t = pr[name]
                rows.append(f"| {what}, int8 default (SemEval-2014 best: {0.845 if name == 'entailment' else 0.828}) | "
                            f"{t['test_onnx'][t['default_variant']][t['metric']]:.4f} | {pr['machine']['cpu']} |")
    return "\n".join(["| figure | value | machine |", "|---|---|---|", *rows, "",
                      "Every table, its command and machine: [benchmarks/README.md](benchmarks/README.md#results)."])


def serving_headline(inference: dict[str, Any] | None) -> list[str]:
    """Headline rows of the serving goals: the default int8 vs dynamic int8, HTTP against predict, cold start."""
    rows = []
    c, h = _load("int8_candidates"), _load("serve_http")
    if c:
        cells = []
        for task in c["tasks"]:
            by = {r["name"]: r for r in task["rows"]}
            default = next((r for r in task["rows"] if "within the criterion" in (r.get("why") or "")), None)  # the export's
            if default and "dynamic" in by:
                cells.append(f"{task['task']} {default['name']} {default['rows_per_second'] / by['dynamic']['rows_per_second']:.2f}x")
        rows.append(f"| int8 default (batch-independent) rows/s vs dynamic int8 | {', '.join(cells)} | {c['machine']['cpu']} |")
    if h:
        sm = h["summary"]
        rows.append(f"| HTTP single texts, 64 clients: rows/s vs `serve_cli predict` / vs the naive server | "
                    f"{sm['ours_single_c64_vs_predict']:.2f}x / {sm['ours_vs_naive_single_c64']:.1f}x | {h['machine']['cpu']} |")
        rows.append(f"| HTTP single texts, 8 clients: p99 / p50 latency | {sm['ours_p99_over_p50_single_c8']:.2f} "
                    f"({sm['ours_p99_ms_single_c8']:.1f} ms) | {h['machine']['cpu']} |")
        if "ours_32_texts_c1_vs_predict" in sm:
            rows.append(f"| HTTP one 32-text request, 1 client: rows/s vs `serve_cli predict` | "
                        f"{sm['ours_32_texts_c1_vs_predict']:.2f}x | {h['machine']['cpu']} |")
    if inference and "cold_start_seconds" in inference:
        rows.append(f"| cold start, `serve_cli predict` on 10 rows | {inference['cold_start_seconds']:.2f} s | {inference['machine']['cpu']} |")
    return rows


SECTIONS = {README: (("headline", headline),), CONFIG_DOC: (("config-reference", config_reference),),
            BENCH_README: (("results", results),)}


def render(text: str, sections: tuple[tuple[str, Any], ...]) -> str:
    for name, make in sections:
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        a, b = text.index(start) + len(start), text.index(end)
        text = text[:a] + "\n" + make() + "\n" + text[b:]
    return text


def main() -> int:
    stale = []
    for path, sections in SECTIONS.items():
        current = path.read_text(encoding="utf-8")
        wanted = render(current, sections)
        if current != wanted:
            stale.append(path)
            if "--check" not in sys.argv:
                path.write_text(wanted, encoding="utf-8")
    if stale and "--check" in sys.argv:
        print(f"{', '.join(str(p.relative_to(REPO)) for p in stale)} out of date: run python benchmarks/report.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
