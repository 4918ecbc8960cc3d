"""Exact shortcuts of the training forward: the same logits and gradients, less work."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.config import LoraConfig, ModelConfig


def _batch() -> dict:
    import torch

    torch.manual_seed(1)
    ids = torch.randint(5, 100, (5, 11))
    mask = torch.ones(5, 11, dtype=torch.long)
    for row, length in enumerate([11, 7, 3, 9, 1]):  # padded rows, one with the first token only
        mask[row, length:] = 0
        ids[row, length:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 2, 3, 1])}


def _logits_and_grads(model_dir: Path, last_layer: str, train: bool) -> tuple:
    from trainer.modeling import build_model

    model = build_model(ModelConfig(name_or_path=str(model_dir), last_layer=last_layer),
                        LoraConfig(init_std=0.05), ["a", "b", "c", "d"], seed=3)
    model.train(train)
    out = model(**_batch())
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return model, out.logits.detach(), grads


@pytest.mark.parametrize("train", [True, False])
def test_cls_only_last_layer_gives_the_same_logits_and_gradients(tiny_bert: Path, train: bool) -> None:
    import torch

    model, logits, grads = _logits_and_grads(tiny_bert, "auto", train)
    _, full_logits, full_grads = _logits_and_grads(tiny_bert, "full", train)
    assert torch.allclose(logits, full_logits, atol=1e-5), (logits - full_logits).abs().max()
    assert grads.keys() == full_grads.keys() and len(grads) > 10
    for name, g in grads.items():
        assert torch.allclose(g, full_grads[name], atol=1e-5, rtol=1e-4), name
    # It did the work for one row per text: the last layer's feed-forward saw sequences of length 1.
    seen = []
    last = model.get_base_model().bert.encoder.layer[-1]
    last.intermediate.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    model(**_batch())
    assert seen == [torch.Size([5, 1, 32])]
    assert model.loraship_last_layer == "cls"


def test_cls_only_last_layer_falls_back_on_other_architectures(tiny_distilbert: Path) -> None:
    from trainer.modeling import build_model

    model = build_model(ModelConfig(name_or_path=str(tiny_distilbert)), LoraConfig(), ["a", "b"], seed=0)
    assert model.loraship_last_layer == "full"


def test_step_flops_count_the_first_token_only_last_layer(tiny_bert: Path) -> None:
    from trainer.mfu import step_flops_per_token
    from trainer.modeling import build_model

    model = build_model(ModelConfig(name_or_path=str(tiny_bert)), LoraConfig(r=4), ["a", "b"], seed=0)
    full, cls = step_flops_per_token(model, 10.0), step_flops_per_token(model, 10.0, cls_only_last_layer=True)
    # Tiny BERT, width 32, feed-forward 64, 2 layers, LoRA r=4 on every linear: the last layer's query,
    # attention output and feed-forward weights (and their LoRA) count once per 10 tokens; keys and values
    # in full; attention's products for 1 query instead of 10.
    per_token = 4 * (2 * 32 * 32 + 2 * 32 * 64) + 6 * 4 * (2 * (32 + 32) + 2 * (32 + 64))
    assert full - cls == pytest.approx(per_token * (1 - 1 / 10) + 12 * 32 * (10 - 1))
