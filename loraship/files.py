"""File names that one stage writes and another reads."""

ADAPTER_META = "loraship.json"  # in adapter/, merged and ONNX dirs: labels, max length, the shareable config
REPORT = "export_report.json"  # in the ONNX dir: variants, parity, the int8 choice
VALIDATION_FILE = "validation.jsonl"  # the trainer's validation split, in the run dir: what the export chooses on
CALIBRATION_FILE = "calibration.jsonl"  # training texts for int8 calibration and sensitivity, in the run dir
