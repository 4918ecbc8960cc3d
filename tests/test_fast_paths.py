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

    cls_model, full_model = (build_model(ModelConfig(name_or_path=str(tiny_bert), last_layer=last), LoraConfig(r=4), ["a", "b"], seed=0)
                             for last in ("auto", "full"))
    full, cls = step_flops_per_token(full_model, 10.0), step_flops_per_token(cls_model, 10.0)
    # Tiny BERT, width 32, feed-forward 64, 2 layers, LoRA r=4 on every linear: the last layer's query,
    # attention output and feed-forward weights (and their LoRA) count once per 10 tokens; keys and values
    # in full; attention's products for 1 query instead of 10.
    per_token = 4 * (2 * 32 * 32 + 2 * 32 * 64) + 6 * 4 * (2 * (32 + 32) + 2 * (32 + 64))
    assert full - cls == pytest.approx(per_token * (1 - 1 / 10) + 12 * 32 * (10 - 1))


def test_frozen_weights_stored_in_bf16_give_the_autocast_results(tiny_bert: Path) -> None:
    import torch

    from trainer.modeling import build_model, store_frozen_linear_weights

    def logits_and_grads(store: bool) -> tuple:
        model = build_model(ModelConfig(name_or_path=str(tiny_bert)), LoraConfig(init_std=0.05), ["a", "b", "c", "d"], seed=3)
        if store:
            assert store_frozen_linear_weights(model, torch.bfloat16) > 0
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**_batch())
        out.loss.backward()
        return model, out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    model, logits, grads = logits_and_grads(True)
    _, cast_logits, cast_grads = logits_and_grads(False)
    # autocast rounds fp32 weights to bf16 for every linear layer anyway: storing them rounded changes no result
    assert torch.equal(logits, cast_logits)
    assert all(torch.equal(g, cast_grads[n]) for n, g in grads.items())
    dtypes = {(p.requires_grad, p.dtype) for m in model.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters(recurse=False)}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}  # LoRA and head stay fp32 masters
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "LayerNorm" in n or "embeddings" in n)


def test_a_bf16_run_stores_the_frozen_weights_in_bf16(tiny_bert: Path, toy_data: Path, tmp_path: Path) -> None:
    import json

    from tests.conftest import tiny_args
    from trainer.train import main

    run = tmp_path / "run"
    assert main(tiny_args(tiny_bert, toy_data, run, "train.mixed_precision=bf16", "train.max_steps=3", "data.test=test.jsonl")) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["frozen_weights_dtype"] == "bfloat16" and summary["test_accuracy"] is not None
    run = tmp_path / "run32"
    assert main(tiny_args(tiny_bert, toy_data, run, "train.mixed_precision=no", "train.max_steps=1")) == 0
    assert json.loads((run / "summary.json").read_text())["frozen_weights_dtype"] == "float32"


def test_a_bf16_dora_run_keeps_the_frozen_weights_in_fp32(tiny_bert: Path, toy_data: Path, tmp_path: Path) -> None:
    """DoRA's weight norms read the base weights outside the autocast products: stored in bf16 they would
    be rounded there too, so a DoRA run keeps them fp32."""
    import json

    from tests.conftest import tiny_args
    from trainer.train import main

    run = tmp_path / "run"
    assert main(tiny_args(tiny_bert, toy_data, run, "train.mixed_precision=bf16", "train.max_steps=2", "lora.use_dora=true")) == 0
    assert json.loads((run / "summary.json").read_text())["frozen_weights_dtype"] == "float32"
