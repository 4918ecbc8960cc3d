"""Merge a LoRA adapter into its fp32 base model, proving adapter and merged logits agree."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path
from typing import Any

import numpy as np

from export.common import META, ExportError, torch_logits
from loraship.task import INPUTS_KEY, PROBLEM_TYPES, SINGLE, TARGET_KEY, THRESHOLDS_KEY


def read_adapter(adapter_dir: Path) -> dict[str, Any]:
    """The adapter's metadata (labels, base model, max_length); clear errors for anything missing."""
    if not adapter_dir.is_dir():
        raise ExportError(f"{adapter_dir}: adapter dir not found (train one with trainer/train.py)")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (adapter_dir / name).is_file():
            raise ExportError(f"{adapter_dir}: {name} missing: not a LoRA adapter dir saved with safetensors")
    meta: dict[str, Any] = {}
    if (adapter_dir / META).is_file():
        meta = json.loads((adapter_dir / META).read_text(encoding="utf-8"))
    adapter_cfg = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    meta.setdefault("base_model", adapter_cfg.get("base_model_name_or_path"))
    if not meta.get("labels"):
        raise ExportError(f"{adapter_dir}: no label map ({META} with 'labels' missing); the export needs id2label")
    meta.setdefault("max_length", 512)
    meta.setdefault("sample_texts", [])
    return meta


def generated_texts(tokenizer_dir: Path, n: int = 48, seed: int = 0, trust_remote_code: bool = False,
                    pair: bool = False) -> list[Any]:
    """Texts of whole vocabulary words, short to past max_length, for parity checks when the adapter
    carries no sample texts and no eval file is given: parity is about arithmetic, not about meaning.
    `pair`: (text, text) pairs, each side of its own length, so truncation cuts either side."""
    from transformers import AutoTokenizer

    vocab = sorted(w for w in AutoTokenizer.from_pretrained(str(tokenizer_dir), trust_remote_code=trust_remote_code).get_vocab() if w.isalpha() and w.isascii())
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 200))) for _ in range(n + 1)]
    return list(itertools.pairwise(texts)) if pair else texts[:n]


def check_safetensors(path: Path) -> None:
    """Fail cleanly on a truncated or corrupted weights file before peft tries to use it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                f.get_tensor(key)
    except Exception as e:
        raise ExportError(f"{path}: cannot read adapter weights ({e}); the file is corrupted or not safetensors") from e


def merge(adapter_dir: Path, meta: dict[str, Any], base_model: str, out_dir: Path, texts: list[str], atol: float, trust_remote_code: bool) -> dict[str, Any]:
    """Base (fp32) + adapter -> merged model dir; proves adapter and merged logits agree."""
    import torch
    from peft import PeftModel
    from peft.utils import load_peft_weights, set_peft_model_state_dict
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from trainer.modeling import append_mean_pooling_layer, resolve_model_path

    labels = meta["labels"]
    try:
        base = AutoModelForSequenceClassification.from_pretrained(
            resolve_model_path(base_model),
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={n: i for i, n in enumerate(labels)},
            problem_type=PROBLEM_TYPES[meta.get("task", SINGLE)],
            dtype=torch.float32,  # merge in fp32 whatever precision trained the adapter
            trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError) as e:  # missing dir, bad hub id, unreachable hub
        raise ExportError(f"base model {base_model!r} of {adapter_dir} cannot be loaded: {e}. Pass --base-model PATH") from e
    if meta.get("pooling", "first") == "mean":
        try:  # the layer the trainer appended: the adapter's weights for it apply to this same construction
            append_mean_pooling_layer(base)
        except ValueError as e:
            raise ExportError(f"{adapter_dir}: trained with mean pooling, but {e}") from e
    check_safetensors(adapter_dir / "adapter_model.safetensors")
    try:
        model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
        # peft only warns about adapter weights that fit no layer of this base (another base, a layer the
        # trainer appended): loading them again tells which, and the merge stops instead of dropping them.
        unexpected = set_peft_model_state_dict(model, load_peft_weights(str(adapter_dir))).unexpected_keys
    except Exception as e:
        raise ExportError(f"{adapter_dir}: cannot apply the adapter to {base_model}: {e}") from e
    if unexpected:
        raise ExportError(f"{adapter_dir}: {len(unexpected)} adapter weights fit no layer of {base_model} (e.g. {unexpected[0]}): "
                          "it was trained on another base model or layout; pass the right --base-model")
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir), trust_remote_code=trust_remote_code)
    adapter_logits = torch_logits(model, tokenizer, texts, meta["max_length"])
    merged = model.merge_and_unload()
    merged.eval()
    leftover = [k for k in merged.state_dict() if "lora_" in k or "modules_to_save" in k]
    if leftover:
        raise ExportError(f"merge left adapter layers behind: {leftover[:3]}")
    merged_logits = torch_logits(merged, tokenizer, texts, meta["max_length"])
    diff = float(np.abs(adapter_logits - merged_logits).max())
    if diff > atol or not np.array_equal(adapter_logits.argmax(-1), merged_logits.argmax(-1)):
        raise ExportError(f"merge parity failed: adapter vs merged max abs logit diff {diff:.2e} > {atol:g}")
    merged.config.id2label = dict(enumerate(labels))
    merged.config.label2id = {n: i for i, n in enumerate(labels)}
    if meta.get("thresholds"):  # multi-label decisions, chosen on validation: serving reads them from config.json
        setattr(merged.config, THRESHOLDS_KEY, meta["thresholds"])
    if meta.get("target"):  # regression: the scale that turns the model's output into the data's units
        setattr(merged.config, TARGET_KEY, meta["target"])
    setattr(merged.config, INPUTS_KEY, {"text": meta.get("text_field", "text"), "text_pair": meta.get("text_pair_field") or None})
    merged.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return {"rows": len(texts), "max_abs_diff": diff}
