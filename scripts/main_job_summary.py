"""The main job's closing summary: accuracy (fp32 and int8), the default variant, speed, where things are,
and the commands to use the model next. Reads only the files the stages wrote.

    python scripts/main_job_summary.py runs/agnews_minilm
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    run = Path((argv if argv is not None else sys.argv[1:])[0])
    report = json.loads((run / "onnx" / "export_report.json").read_text())
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    by_variant = {c["variant"]: c for c in metrics["compare"]}
    lines = ["", "== summary"]
    lines.append(f"training: {summary['steps']} steps in {summary['train_seconds'] / 60:.1f} min "
                 f"({summary['samples_per_second']:.1f} samples/s, {summary['mixed_precision']}); test accuracy {summary.get('test_accuracy', float('nan')):.4f}")
    for variant in ("fp32", "int8"):
        c = by_variant.get(variant)
        if c:
            lines.append(f"ONNX {variant}: accuracy {c['accuracy']:.4f}, weighted F1 {c['f1_weighted']:.4f}, "
                         f"macro F1 {c['f1_macro']:.4f}, {c['rows_per_second']:.0f} rows/s, {c['bytes'] / 1e6:.1f} MB")
    lines.append(f"default variant: {report['default_variant']} ({report['gate']['verdict']})")
    lines.append(f"report: {run / 'eval' / 'report.md'}; confusion matrix: {run / 'eval' / 'confusion_matrix.png'}; "
                 f"predictions: {run / 'predictions.jsonl'}")
    model = run / "onnx"
    lines += ["next:",
              f"  serve_cli predict --model {model} --input texts.jsonl --output preds.jsonl",
              f"  echo 'Stocks rally as oil prices fall' | serve_cli predict --model {model} --input - --format txt",
              f"  serve_cli eval --model {model} --input labeled.jsonl --report-dir my_eval",
              "(serve_cli is in .venv/bin; `source .venv/bin/activate` puts it on PATH)"]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
