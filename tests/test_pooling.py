"""model.pooling=mean: the classifier reads the mean of the last layer's tokens through one appended standard
encoder layer, so the adapter, the merged model, ONNX and serve_cli all compute the same thing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import tiny_args
from trainer.config import LoraConfig, ModelConfig


def _mean_model(model_dir: Path, **model_kwargs: str):
    from trainer.modeling import build_model

    return build_model(ModelConfig(name_or_path=str(model_dir), pooling="mean", **model_kwargs), LoraConfig(r=4),
                       ["a", "b", "c"], seed=0)


def test_the_appended_layer_gives_the_classifier_the_mean_of_the_real_tokens(tiny_bert: Path) -> None:
    import torch

    model = _mean_model(tiny_bert, last_layer="full").eval()
    bert = model.get_base_model().bert
    assert bert.config.num_hidden_layers == len(bert.encoder.layer) == 3  # tiny BERT has 2
    torch.manual_seed(0)
    ids = torch.randint(5, 100, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    with torch.no_grad():
        out = bert(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    previous, first = out.hidden_states[-2], out.last_hidden_state[:, 0]
    m = mask.unsqueeze(-1).float()
    mean = torch.nn.functional.layer_norm((previous * m).sum(1) / m.sum(1), first.shape[-1:])
    # The first token's own state enters only through the residual, at 1/32 of the mean's weight.
    assert torch.nn.functional.cosine_similarity(first, mean).min() > 0.995
    # Padding is outside the mean: a row alone and the same row padded in a batch give the same logits.
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask).logits
        alone = model(input_ids=ids[1:2, :5], attention_mask=mask[1:2, :5]).logits
    torch.testing.assert_close(batch[1:2], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("train", [True, False])
def test_first_token_only_pooling_layer_gives_the_same_logits_and_gradients(tiny_bert: Path, train: bool) -> None:
    import torch

    from tests.test_fast_paths import _batch

    results = []
    for last_layer in ("auto", "full"):
        model = _mean_model(tiny_bert, last_layer=last_layer)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(hash(name) % 2**31))
        model.train(train)
        batch = _batch()
        batch["labels"] = batch["labels"] % 3
        out = model(**batch)
        out.loss.backward()
        results.append((model.loraship_last_layer, out.logits.detach(),
                        {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (kind, logits, grads), (_, full_logits, full_grads) = results
    assert kind == "cls"
    torch.testing.assert_close(logits, full_logits, atol=1e-5, rtol=1e-4)
    for name, g in grads.items():
        torch.testing.assert_close(g, full_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_a_mean_pooling_run_merges_exports_and_serves_its_own_predictions(tiny_bert: Path, toy_data: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from export.to_onnx import main as export_main
    from serve_cli.__main__ import main as serve_main
    from trainer.train import main as train_main

    run = tmp_path / "run"
    # LoRA B starts at zero (the default), as in real runs: training moves every B that gets a gradient, while the
    # pooling layer's query, key and feed-forward stay exactly zero, and the int8 export must handle all-zero weights.
    assert train_main(tiny_args(tiny_bert, toy_data, run, "data.test=test.jsonl", "model.pooling=mean", "train.epochs=3")) == 0
    assert json.loads((run / "adapter" / "loraship.json").read_text())["pooling"] == "mean"
    assert export_main(["--run", str(run)]) == 0
    merged = load_file(str(run / "merged" / "model.safetensors"))
    assert not merged["bert.encoder.layer.2.attention.self.query.weight"].any()
    assert merged["bert.encoder.layer.2.attention.self.value.weight"].count_nonzero() > 32, "LoRA trained the value"
    report = json.loads((run / "onnx" / "export_report.json").read_text())
    assert report["merge"]["max_abs_diff"] <= 1e-4 and report["parity_fp32"]["max_abs_diff"] <= 1e-4
    # The merged model is a standard BERT with the pooling layer as its last encoder layer.
    merged_config = json.loads((run / "merged" / "config.json").read_text())
    assert merged_config["num_hidden_layers"] == 3 and merged_config["architectures"] == ["BertForSequenceClassification"]
    # serve_cli on the ONNX fp32 model predicts what the trainer's own evaluation of the adapter predicted.
    summary = json.loads((run / "summary.json").read_text())
    rep = tmp_path / "report"
    assert serve_main(["eval", "--model", str(run / "onnx"), "--input", str(toy_data / "test.jsonl"), "--variant", "fp32",
                       "--report-dir", str(rep), "--quiet"]) == 0
    assert json.loads((rep / "metrics.json").read_text())["accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-9)


def test_mean_pooling_on_another_architecture_fails_clearly(tiny_distilbert: Path, toy_data: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from trainer.train import main as train_main

    assert train_main(tiny_args(tiny_distilbert, toy_data, tmp_path / "run", "model.pooling=mean")) == 1
    err = capsys.readouterr().err
    assert "model.pooling=mean" in err and "DistilBertForSequenceClassification" in err and "model.pooling=first" in err



def test_an_adapter_whose_weights_do_not_fit_the_base_is_refused(tiny_bert: Path, toy_data: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from export.to_onnx import main as export_main
    from trainer.train import main as train_main

    run = tmp_path / "run"
    assert train_main(tiny_args(tiny_bert, toy_data, run, "model.pooling=mean", "train.max_steps=2")) == 0
    meta_file = run / "adapter" / "loraship.json"
    meta = json.loads(meta_file.read_text())
    del meta["pooling"]  # as if trained elsewhere: the base the merge builds lacks the pooling layer
    meta_file.write_text(json.dumps(meta))
    assert export_main(["--run", str(run)]) == 1
    err = capsys.readouterr().err
    assert "adapter weights fit no layer" in err and "encoder.layer.2." in err
    assert not (run / "merged").exists() and not (run / "onnx").exists()


@pytest.mark.parametrize("lora", [{"use_dora": True}, {"target_modules": ["query", "value"], "use_dora": True}])
def test_the_pooling_layers_zero_weights_get_no_adapter(tiny_bert: Path, lora: dict) -> None:
    """DoRA divides by the norm of base + LoRA weight, zero there at the start (LoRA B starts at zero): the
    pooling layer's zero query, key and feed-forward weights stay unadapted (plain LoRA there gets no gradient
    anyway), so DoRA runs and no adapter weight is wasted."""
    import torch

    from tests.test_fast_paths import _batch
    from trainer.modeling import build_model

    model = build_model(ModelConfig(name_or_path=str(tiny_bert), pooling="mean"), LoraConfig(r=4, **lora),
                        ["a", "b", "c", "d"], seed=0)
    adapted = {n.split(".lora_")[0].removeprefix("base_model.model.") for n, _ in model.named_parameters() if ".lora_" in n}
    pooling_layer = {n.removeprefix("bert.encoder.layer.2.") for n in adapted if n.startswith("bert.encoder.layer.2.")}
    assert pooling_layer == ({"attention.self.value", "attention.output.dense"} if "target_modules" not in lora
                             else {"attention.self.value"})
    assert "bert.encoder.layer.1.attention.self.query" in adapted
    out = model(**_batch())
    out.loss.backward()
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_resuming_with_another_model_layout_fails_clearly(tiny_bert: Path, toy_data: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from trainer.train import main as train_main

    run = tmp_path / "run"
    assert train_main(tiny_args(tiny_bert, toy_data, run, "train.max_steps=4", "train.save_every=2")) == 0
    capsys.readouterr()
    assert train_main(tiny_args(tiny_bert, toy_data, run, "train.max_steps=8", "train.resume=latest", "model.pooling=mean")) == 1
    err = capsys.readouterr().err
    assert "step_4: the checkpoint does not fit this run's model: it was written with model.pooling='first' (this run: 'mean')" in err
    assert "Traceback" not in err
