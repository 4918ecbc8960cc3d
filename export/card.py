"""The model card (README.md, Hugging Face format) written into every merged and ONNX dir.

YAML metadata (library_name, pipeline_tag, base_model, license when known, tags, model-index with the
validation and test figures of the export report), then: the task and labels (and thresholds), the
training data as sizes, label counts and a fingerprint (no paths, no texts), the recipe that ran, the
metrics of fp32 and int8 and why that variant is the default, how to call it, and its limitations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

# Base models whose card loraship can name: the packaged MiniLM is the hub's all-MiniLM-L6-v2 (Apache-2.0).
KNOWN_BASES = {"packaged:all-MiniLM-L6-v2": ("sentence-transformers/all-MiniLM-L6-v2", "apache-2.0")}
CARD = "README.md"


def _metrics(report: dict[str, Any]) -> list[tuple[str, str, str, float]]:
    """(split, variant, metric, value) of every figure the card publishes, all taken from the export report."""
    out: list[tuple[str, str, str, float]] = []
    search = report.get("int8_search")
    if search:
        metric = search.get("metric", "accuracy")
        out.append(("validation", "fp32", metric, search["fp32"]["accuracy"]))
        chosen = next((c for c in search["candidates"] if c["name"] == search["shipped"]), None)
        if chosen:
            out.append(("validation", "int8", metric, chosen["accuracy"]))
    ev = report.get("eval_file")
    if ev:
        for variant in ("fp32", "int8"):
            for metric, value in ev[f"onnx_{variant}"].items():
                out.append(("test", variant, metric, value))
    return out


def model_index(name: str, report: dict[str, Any], dataset: str) -> list[dict[str, Any]]:
    results = []
    for split, variant, metric, value in _metrics(report):
        results.append({
            "task": {"type": "text-classification", "name": "Text Classification"},
            "dataset": {"name": f"{dataset} ({split})", "type": dataset, "split": split},
            "metrics": [{"type": metric, "value": round(float(value), 6), "name": f"{split} {metric} (ONNX {variant})"}],
        })
    return [{"name": name, "results": results}] if results else []


def write(out_dir: Path, meta: dict[str, Any], report: dict[str, Any] | None, kind: str, final_dir: Path | None = None) -> Path:
    """Write out_dir/README.md. `kind`: "onnx" (report: the export report) or "merged". `final_dir`: where the dir
    will live (out_dir may be a temp dir renamed into place), for the names in the usage examples."""
    report = report or {}
    shown = final_dir or out_dir
    base, license_id = KNOWN_BASES.get(meta.get("base_model", ""), (meta.get("base_model", "unknown"), None))
    config = meta.get("config") or {}
    name = report.get("source", {}).get("run") or shown.parent.name or "model"
    dataset = Path(config.get("data", {}).get("train") or "").stem
    if dataset in ("", "train", "data", "training"):  # a split's file name says nothing of the data set
        dataset = name
    metadata: dict[str, Any] = {
        "library_name": "onnx" if kind == "onnx" else "transformers",
        "pipeline_tag": "text-classification",
        "base_model": base,
        "tags": ["loraship", "lora", "text-classification", *(["onnx", "int8"] if kind == "onnx" else [])],
    }
    if license_id:
        metadata["license"] = license_id
    index = model_index(name, report, dataset) if kind == "onnx" else []
    if index:
        metadata["model-index"] = index
    body = "\n".join(_sections(shown, meta, report, kind, base, name))
    text = "---\n" + yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True) + "---\n\n" + body + "\n"
    path = out_dir / CARD
    path.write_text(text, encoding="utf-8")
    return path


def _sections(out_dir: Path, meta: dict[str, Any], report: dict[str, Any], kind: str, base: str, name: str) -> list[str]:
    task = meta.get("task", "single_label")
    labels = meta["labels"]
    pair = meta.get("text_pair_field")
    what = {"multi_label": "multi-label text classifier", "regression": "text regression model"}.get(task, "single-label text classifier")
    if pair:
        what = what.replace("text", "sentence-pair", 1)
    lines = [f"# {name}: {what}", "",
             f"LoRA fine-tune of `{base}`, merged into the base model"
             + (" and exported to ONNX (fp32 and int8)." if kind == "onnx" else "."), "", "## Task and labels", ""]
    if pair:
        lines += [f"Inputs: a pair of texts, `{meta.get('text_field', 'text')}` and `{pair}`, encoded as the tokenizer's pair "
                  "(`[CLS] a [SEP] b [SEP]`), truncated longest-first.", ""]
    if task == "regression":
        t = meta.get("target") or {}
        lines += [f"One score, `{t.get('name', labels[0])}`, in the training data's units: the model was trained on the target "
                  f"scaled by the training mean {t.get('mean', 0):.4g} and standard deviation {t.get('std', 1):.4g}; the scale is "
                  "stored in config.json (`loraship_target`) and serve_cli undoes it (raw ONNX output x std + mean)."]
    else:
        lines += [f"{len(labels)} labels: " + ", ".join(f"`{n}`" for n in labels) + "."]
    if task == "multi_label":
        th = meta.get("thresholds") or {}
        lines += ["", "Multi-label: one sigmoid probability per label; a label is on when its probability is at or above its "
                  f"threshold (chosen on {th.get('chosen_on', 'validation')}; global {th.get('global', 0.5)}; "
                  f"{len(th.get('own_threshold', []))} labels with their own). A text may get no label.", "",
                  "| label | threshold |", "|---|---|"] + [f"| {n} | {t:.2f} |" for n, t in (th.get("per_label") or {}).items()]
    lines += ["", "## Training data", "", *_data_lines(meta)]
    lines += ["", "## Training", "", *_recipe_lines(meta)]
    if kind == "onnx":
        lines += ["", "## Evaluation", "", *_eval_lines(report)]
    lines += ["", "## How to use", "", *_usage_lines(out_dir, kind, task, bool(pair))]
    max_length = meta.get("max_length")
    lines += ["", "## Limitations", "",
              f"- Inputs are truncated to {max_length} tokens; longer texts are judged on their beginning.",
              "- Evaluated only on the splits above (same source as the training data); not on other domains, languages "
              "or time periods. Measure it on your own data (`serve_cli eval`) before relying on it.",
              ("- Dynamic int8 computes activation scales per batch: a text's int8 probabilities can change slightly with "
             "its batch mates (fp32 does not)." if not report.get("int8_search", {}).get("batch_independent") else
             "- The int8 file computes each row from that row alone: its answer does not depend on its batch mates.")
            if kind == "onnx" else "- The int8 variant is made by the ONNX export."]
    return lines


def _data_lines(meta: dict[str, Any]) -> list[str]:
    data = meta.get("data")
    if not data:
        return ["Not recorded with this adapter (trained before loraship recorded data facts)."]
    rows = ", ".join(f"{k} {v:,}" for k, v in data["rows"].items())
    if "target" in data:
        t = data["target"]
        return [f"- Rows: {rows}.", f"- Training target `{t['name']}`: {t['min']:.4g} to {t['max']:.4g}, mean {t['mean']:.4g}, "
                f"standard deviation {t['std']:.4g}.",
                f"- Fingerprint of the training rows (order, targets, token lengths): `{data['fingerprint']}`. No file paths or "
                "texts are part of this model."]
    counts = sorted(data["label_counts"].items(), key=lambda kv: -kv[1])
    shown = ", ".join(f"{n} {c:,}" for n, c in counts[:12]) + (f", ... ({len(counts)} labels)" if len(counts) > 12 else "")
    return [f"- Rows: {rows}.", f"- Training rows per label: {shown}.",
            f"- Fingerprint of the training rows (order, labels, token lengths): `{data['fingerprint']}`. No file paths or "
            "texts are part of this model."]


def _recipe_lines(meta: dict[str, Any]) -> list[str]:
    cfg = meta.get("config") or {}
    lora, train, tr = cfg.get("lora", {}), cfg.get("train", {}), meta.get("training") or {}
    lines = [f"- LoRA r={lora.get('r')}, alpha={lora.get('alpha')}, dropout={lora.get('dropout')}, "
             f"targets {lora.get('target_modules')}; learning rate {train.get('lr')}, batch {train.get('batch_size')}, "
             f"seed {train.get('seed')}; max length {meta.get('max_length')} tokens; pooling {meta.get('pooling', 'first')}."]
    if tr:
        lines.append(f"- Ran {tr['steps']:,} optimizer steps ({tr.get('epochs')} epochs), best adapter at step {tr['best_step']:,}; "
                     f"{tr['loop_seconds'] / 60:.1f} min on {tr['device']} ({tr['processes']} process(es), mixed precision "
                     f"{tr['mixed_precision']}).")
        lines += [f"- {k.replace('_', ' ')}: {v:.4f}" for k, v in tr.items() if k.startswith(("best_validation", "test_"))]
    return lines


def _eval_lines(report: dict[str, Any]) -> list[str]:
    rows = _metrics(report)
    if not rows:
        return ["No labelled rows were given to the export (no validation split, no `--eval-file`)."]
    lines = ["| split | variant | metric | value |", "|---|---|---|---|"]
    lines += [f"| {s} | {v} | {m} | {x:.4f} |" for s, v, m, x in rows]
    gate = report.get("gate") or {}
    lines += ["", f"Default variant: **{report.get('default_variant')}** ({gate.get('by', 'n/a')}): {gate.get('verdict', '')}.",
              "The default is chosen on validation rows only; the test figures are reported, never used to choose."]
    q = report.get("quantization") or {}
    if q:
        lines.append(f"int8 method: {q.get('method')}.")
    return lines


def _usage_lines(out_dir: Path, kind: str, task: str, pair: bool = False) -> list[str]:
    call = '["a text"], ["its pair"]' if pair else '["a text"]'
    if kind == "merged":
        return ["```python", "from transformers import AutoModelForSequenceClassification, AutoTokenizer", "",
                f'tok = AutoTokenizer.from_pretrained("{out_dir.name}")',
                f'model = AutoModelForSequenceClassification.from_pretrained("{out_dir.name}")',
                f'logits = model(**tok({call}, return_tensors="pt")).logits',
                ("probs = logits.sigmoid()  # multi-label: compare with config.loraship_thresholds" if task == "multi_label"
                 else "score = logits[:, 0] * model.config.loraship_target['std'] + model.config.loraship_target['mean']"
                 if task == "regression" else "probs = logits.softmax(-1)"), "```"]
    return ["```bash", f"serve_cli predict --model {out_dir.name} --input texts.jsonl --output predictions.jsonl",
            f"serve_cli serve --model {out_dir.name}   # HTTP, TEI-compatible /predict", "```", "",
            "```python", "import onnxruntime as ort", "from tokenizers import Tokenizer", "",
            f'tok = Tokenizer.from_file("{out_dir.name}/tokenizer.json")',
            f'session = ort.InferenceSession("{out_dir.name}/model_quantized.onnx")  # or model.onnx (fp32)',
            'enc = tok.encode("a text", "its pair")' if pair else 'enc = tok.encode("a text")',
            'feed = {"input_ids": [enc.ids], "attention_mask": [enc.attention_mask], "token_type_ids": [enc.type_ids]}',
            "logits = session.run(None, {k: v for k, v in feed.items() if k in {i.name for i in session.get_inputs()}})[0]",
            "```", "", "```python", "from optimum.onnxruntime import ORTModelForSequenceClassification", "",
            f'model = ORTModelForSequenceClassification.from_pretrained("{out_dir.name}", file_name="model_quantized.onnx")', "```"]
