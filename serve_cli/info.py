"""`serve_cli info`: labels, task, variants and the export report's summary of an ONNX dir."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from loraship.task import THRESHOLDS_KEY, Task
from serve_cli.runtime import VARIANT_FILES, int8_batch_independent, read_model_dir


def cmd_info(args: argparse.Namespace) -> int:
    config, report = read_model_dir(args.model)
    d = Path(args.model)
    info: dict[str, Any] = {
        "model": str(d),
        "labels": [config["id2label"][str(i)] for i in range(len(config["id2label"]))],
        "architecture": (config.get("architectures") or ["?"])[0],
        "task": Task.from_config(config).name,
        "variants": {v: {"file": f, "bytes": (d / f).stat().st_size} for v, f in VARIANT_FILES.items() if (d / f).is_file()},
        "default_variant": report.get("default_variant"),
        "max_length": report.get("max_length"),
    }
    if config.get(THRESHOLDS_KEY):
        info["thresholds"] = config[THRESHOLDS_KEY]
    if report:
        info["quantization"] = report.get("quantization", {}).get("method")
        info["parity_fp32_max_abs_diff"] = report.get("parity_fp32", {}).get("max_abs_diff")
        info["merge_max_abs_diff"] = report.get("merge", {}).get("max_abs_diff")
        if "gate" in report:
            info["default_chosen_by"] = report["gate"].get("by")
            info["verdict"] = report["gate"].get("verdict")
        if "int8_search" in report:
            s = report["int8_search"]
            info["int8_batch_independent"] = int8_batch_independent(report)
            info["int8_search"] = {"selected_on": s["selected_on"], "chosen": s["chosen"], "candidates": [
                {k: c.get(k) for k in ("name", "batch_independent", "exclude", "accuracy", "drop_points", "expected_drop_points",
                                       "unlabelled_expected_drop_points", "agreement", "rows_per_second", "chosen")} for c in s["candidates"]]}
        if "eval_file" in report:
            ev = report["eval_file"]
            info["eval_file"] = {k: ev[k] for k in ("file", "rows", "merged", "onnx_fp32", "onnx_int8") if k in ev}
        info["versions"] = report.get("versions")
    print(json.dumps(info, indent=2))
    return 0
