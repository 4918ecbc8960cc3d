"""Quiet by default: third-party messages that are expected and that a user cannot act on are filtered at
their source, one narrow filter each. `--verbose` or LORASHIP_VERBOSE=1 shows everything.

What is filtered, and why it is expected here:
- transformers: "Some weights of ... were not initialized ... newly initialized" and "You should probably
  TRAIN this model": the classification head is new by design; training is what comes next.
- transformers: "`torch_dtype` is deprecated": optimum's ONNX exporter still passes it (loraship passes `dtype`).
- torch.jit TracerWarning during the ONNX export: constants registered by the tracer are checked by our
  own parity checks at several batch sizes and lengths.
- onnxruntime.quantization: "Please consider to run pre-processing before quantization": dynamic int8 of
  a transformer needs no shape pre-processing (its accuracy is measured by the export gate).
"""

from __future__ import annotations

import logging
import os
import warnings

VERBOSE_ENV = "LORASHIP_VERBOSE"


class _DropMessages(logging.Filter):
    def __init__(self, *starts: str) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def quiet_third_party(force_verbose: bool = False) -> None:
    """Install the filters (idempotent); with `force_verbose` set LORASHIP_VERBOSE=1 for child processes."""
    if force_verbose:
        os.environ[VERBOSE_ENV] = "1"
    if verbose():
        return
    logging.getLogger("transformers.modeling_utils").addFilter(
        _DropMessages("Some weights of", "You should probably TRAIN", "`torch_dtype` is deprecated")
    )
    # optimum's exporter still passes `torch_dtype` to transformers 4.57 (ours passes `dtype`).
    logging.getLogger("transformers.configuration_utils").addFilter(_DropMessages("`torch_dtype` is deprecated"))
    # onnxruntime.quantization logs this on the root logger.
    logging.getLogger().addFilter(_DropMessages("Please consider to run pre-processing before quantization"))
    try:
        from torch.jit import TracerWarning
    except ImportError:  # serve-only installs have no torch; nothing to filter then
        return
    warnings.filterwarnings("ignore", category=TracerWarning)
