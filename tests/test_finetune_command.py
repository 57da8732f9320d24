"""``smartformer finetune`` end to end, and the layer-wise learning rates and weight updates behind it."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from downstream_cases import case_csv, run_downstream, tiny_checkpoint  # noqa: F401  (fixtures)

from smartformer.downstream.cases import CropOptions, build_crops, read_cases
from smartformer.downstream.features import load_encoder
from smartformer.downstream.finetune import Classifier, FinetuneSettings, finetune, layer_id, param_groups_lrd

pytestmark = pytest.mark.usefixtures("one_thread")


def test_finetune_command(case_csv, tiny_checkpoint, tmp_path):
    options = ["--folds", "2", "--epochs", "2", "--patience", "1", "--lr", "3e-4", "--bootstrap", "50"]
    assert run_downstream("finetune", case_csv, tiny_checkpoint, tmp_path, *options) == 0
    predictions = pd.read_csv(tmp_path / "predictions.csv")
    assert len(predictions) == 24 and predictions["case"].is_unique
    assert predictions["probability"].between(0, 1).all() and predictions["probability"].std() > 0
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["task"] == "finetune" and report["settings"]["layer_decay"] == 0.75
    for fold in report["results"][tiny_checkpoint.name]["1"]["per_fold"]:
        assert fold["n_val"] > 0 and fold["n_train"] + fold["n_val"] == 12  # validation carved from training
        assert 1 <= fold["best_epoch"] <= fold["epochs_run"] <= 2
        assert all("val_loss" in h for h in fold["history"])
    for file in ("folds.csv", "roc.png", "comparison.md"):
        assert (tmp_path / file).is_file()


def test_layer_wise_lr_groups():
    model = Classifier(load_encoder("random:tiny"), "both")
    lr, decay = 1e-3, 0.5
    groups = param_groups_lrd(model, lr, weight_decay=0.05, layer_decay=decay)
    top = sum(model.encoder.config.backbone.depths) + 2  # 8 blocks + semantic + head = 10
    assert top == 10
    named = dict(model.named_parameters())
    seen = [n for g in groups for n in g["names"]]
    assert sorted(seen) == sorted(named)  # every parameter exactly once
    by_name = {n: g for g in groups for n in g["names"]}
    expected = {
        "head.1.weight": 0,
        "encoder.semantic.cls_token": 1,
        "encoder.backbone.layers4.0.blocks.1.mlp.linear1.weight": 2,  # last block
        "encoder.backbone.layers2.0.blocks.0.attn.qkv.weight": 7,  # 3rd block of 8: id 3
        "encoder.backbone.layers1.0.downsample.reduction.weight": 8,  # with stage 1's last block (id 2)
        "encoder.backbone.patch_embed.proj.weight": top,
    }
    for name, steps in expected.items():
        assert by_name[name]["lr"] == pytest.approx(lr * decay**steps), name
        assert by_name[name]["layer_id"] == top - steps
    assert layer_id("encoder.backbone.mask_token", model) == 0
    assert by_name["encoder.backbone.layers1.0.blocks.0.norm1.weight"]["weight_decay"] == 0.0
    assert by_name["encoder.backbone.layers1.0.blocks.0.attn.relative_position_bias_table"]["weight_decay"] == 0.0
    assert by_name["encoder.backbone.layers1.0.blocks.0.attn.qkv.weight"]["weight_decay"] == 0.05
    ids = [g["layer_id"] for g in groups]
    assert ids == sorted(ids) and set(ids) == set(range(top + 1))


def test_layer_wise_lr_groups_of_a_vit():
    model = Classifier(load_encoder("random:vit_tiny"), "both")
    groups = param_groups_lrd(model, 1e-3, weight_decay=0.05, layer_decay=0.5)
    by_name = {n: g for g in groups for n in g["names"]}
    assert sorted(by_name) == sorted(dict(model.named_parameters()))  # every parameter exactly once
    top = 4 + 2  # 4 blocks + final norm + head
    assert [
        by_name[n]["layer_id"]
        for n in (
            "encoder.backbone.patch_embedding.patch_embeddings.weight",
            "encoder.backbone.cls_token",
            "encoder.backbone.blocks.0.attn.qkv.weight",
            "encoder.backbone.blocks.3.mlp.linear2.weight",
            "encoder.backbone.norm.weight",
            "head.1.weight",
        )
    ] == [0, 0, 1, 4, 5, top]
    assert by_name["encoder.backbone.patch_embedding.position_embeddings"]["weight_decay"] == 0.0


def test_finetune_changes_the_encoder(case_csv, tiny_checkpoint):
    table = read_cases(case_csv)
    keep = np.arange(0, 24, 2)  # 12 cases: one lesion and one air crop per patient
    crops = build_crops(table, CropOptions(size=(32, 32, 32), spacing=(3.0, 3.0, 3.0)), progress=False)[keep]
    labels = table.labels[keep]
    encoder = load_encoder(str(tiny_checkpoint))
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    settings = FinetuneSettings(epochs=4, lr=1e-3, patience=1, batch_size=4, flip_prob=0.5)
    train, val = np.arange(8), np.arange(8, 12)
    result = finetune(encoder, crops, labels, train, val, settings)
    after = result.model.encoder.state_dict()
    for key in (
        "backbone.patch_embed.proj.weight",
        "backbone.layers1.0.blocks.0.attn.qkv.weight",
        "semantic.cls_token",
    ):
        assert not torch.equal(before[key], after[key]), key
    history = result.history
    assert 1 <= result.best_epoch <= len(history) <= 4
    if len(history) < 4:  # stopped early: exactly `patience` epochs after the best one
        assert len(history) == result.best_epoch + settings.patience
    best = min(h["val_loss"] for h in history)
    assert history[result.best_epoch - 1]["val_loss"] == best


def test_holdout_cases_are_predicted_by_every_fold_model(case_csv, tmp_path):
    options = ["--folds", "2", "--holdout", "0.34", "--epochs", "1", "--patience", "1", "--bootstrap", "0"]
    assert run_downstream("finetune", case_csv, "random:tiny", tmp_path, *options) == 0
    folds = pd.read_csv(tmp_path / "folds.csv")
    test = pd.read_csv(tmp_path / "predictions.csv").query("set == 'holdout'")
    assert sorted(test["case"]) == sorted(list(folds.loc[folds["fold"] == -1, "case"]) * 2)
    assert (
        json.loads((tmp_path / "metrics.json").read_text())["results"]["random_tiny"]["1"]["holdout"]["n"]
        == (folds["fold"] == -1).sum()
    )
