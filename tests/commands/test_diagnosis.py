"""Diagnosis rules on crafted histories: each shape of training curve gets exactly the expected findings."""

from __future__ import annotations

import json
import math

from pipeline.commands.cli import main
from pipeline.commands.diagnose import diagnose, format_findings
from pipeline.commands.diagnose.rules import chance_loss

C = 10  # classes; chance loss ln(10) = 2.3026


def history(train_loss, val_loss, train_acc=None, val_acc=None, **extra):
    records = []
    for i, (t, v) in enumerate(zip(train_loss, val_loss)):
        record = {"epoch": i + 1, "train/loss": t, "val/loss": v,
                  "train/accuracy": train_acc[i] if train_acc else 0.9, "val/accuracy": val_acc[i] if val_acc else 0.9}
        for key, values in extra.items():
            record[key.replace("__", "/")] = values[i]
        records.append(record)
    return records


def kinds(findings):
    return [f.kind for f in findings]


def test_overfitting_names_the_epoch_of_lowest_validation_loss():
    train = [1.5, 0.9, 0.6, 0.4, 0.25, 0.15, 0.08, 0.04, 0.02, 0.01]
    val = [1.4, 1.0, 0.8, 0.7, 0.75, 0.85, 0.95, 1.1, 1.2, 1.3]
    findings = diagnose(history(train, val, [0.6] * 9 + [1.0], [0.6] * 9 + [0.8]), C)
    assert kinds(findings) == ["overfitting"]
    finding = findings[0]
    assert finding.epoch == 4
    assert finding.summary == ("The model overfits from epoch 4 on: it keeps fitting the training data while "
                               "validation gets worse.")
    assert finding.evidence[0] == ("validation loss was lowest at epoch 4 (0.7000) and averaged 1.2000 over epochs "
                                   "8-10 (+71%), while training loss fell from 0.4000 to 0.0100")
    assert finding.evidence[1:] == ["final accuracy: train 1.000, validation 0.800 (gap 20.0 points)",
                                    "training accuracy has exceeded validation accuracy by at least 10 points since "
                                    "epoch 10"]
    assert any("early" in r for r in finding.remedies) and any("weight decay" in r for r in finding.remedies)


def test_accuracy_gap_alone_is_overfitting_since_the_gap_opened():
    train = [1.0, 0.5, 0.3, 0.2, 0.15]
    val = [1.0, 0.6, 0.5, 0.45, 0.44]  # still falling: no turning point, but the gap is >= 10 points since epoch 4
    findings = diagnose(history(train, val, [0.7, 0.92, 0.9, 0.97, 0.99], [0.7, 0.8, 0.85, 0.86, 0.86]), C)
    assert kinds(findings) == ["overfitting"]
    assert findings[0].epoch == 4
    assert findings[0].summary == ("The model overfits from epoch 4 on: it fits the training data far better than "
                                   "the validation data.")
    assert findings[0].evidence == ["final accuracy: train 0.990, validation 0.860 (gap 13.0 points)",
                                    "training accuracy has exceeded validation accuracy by at least 10 points "
                                    "since epoch 4"]


def test_underfitting_high_flat_training_loss():
    train = [2.30, 2.28, 2.27, 2.27, 2.26, 2.26]
    val = [2.30, 2.29, 2.28, 2.28, 2.27, 2.27]
    findings = diagnose(history(train, val, [0.1] * 6, [0.1] * 6), C)
    assert kinds(findings) == ["underfitting"]
    assert findings[0].summary == "The model underfits: its training loss stays high."
    assert findings[0].evidence[0] == ("final training loss 2.2600 at epoch 6 is 98% of the chance level ln(10) = "
                                       "2.3026")
    assert findings[0].evidence[1] == "training loss changed by 1.7% from epoch 1 (2.3000) to epoch 6"


def test_divergence_is_learning_rate_too_high():
    train = [2.0, 1.2, 3.5, 6.0, float("nan")]
    val = [1.9, 1.3, 3.9, 7.0, "nan"]  # metrics.jsonl stores non-finite values as strings
    findings = diagnose(history(train, val, nonfinite_step_fraction=[0, 0, 0, 0.05, 1.0]), C)
    assert kinds(findings)[0] == "lr_too_high"
    high = findings[0]
    assert high.epoch == 3
    assert high.evidence == [
        "loss is NaN or infinite at epoch(s) 5",
        "non-finite gradient steps: epoch 4: 5.0%, epoch 5: 100.0%",
        "training loss spikes: epoch 3: 1.2000 -> 3.5000, epoch 4: 3.5000 -> 6.0000",
        "training loss ended higher (6.0000) than it started (2.0000)",
    ]
    assert "healthy" not in kinds(findings)


def test_slow_monotone_decrease_is_learning_rate_too_low():
    train = [2.2 - 0.05 * i for i in range(10)]  # 2.20 -> 1.75, still falling ~2.7%/epoch
    val = [t + 0.02 for t in train]
    findings = diagnose(history(train, val, [0.3] * 10, [0.3] * 10), C)
    assert kinds(findings) == ["underfitting", "lr_too_low"]
    assert findings[1].evidence[0] == "training loss fell every epoch, from 2.2000 to 1.7500 over 10 epochs"


def test_healthy_run_says_so_with_evidence():
    train = [1.2, 0.6, 0.35, 0.25, 0.2, 0.18, 0.17, 0.165]
    val = [1.0, 0.5, 0.33, 0.26, 0.22, 0.21, 0.205, 0.205]
    findings = diagnose(history(train, val, [0.7, 0.85, 0.92, 0.95, 0.96, 0.97, 0.975, 0.976],
                                [0.75, 0.88, 0.93, 0.95, 0.96, 0.965, 0.97, 0.97]), C)
    assert kinds(findings) == ["healthy"]
    assert findings[0].summary.startswith("No sign of over- or underfitting")
    assert findings[0].evidence == ["after 8 epochs: train loss 0.1650, validation loss 0.2050",
                                    "train accuracy 0.976, validation accuracy 0.970 (gap +0.6 points)",
                                    "validation loss was lowest at epoch 7 (0.2050) and ended at 0.2050"]


def test_exploding_and_vanishing_gradients():
    train = [1.0, 0.6, 0.4, 0.3, 0.25]
    val = [1.0, 0.6, 0.4, 0.3, 0.26]
    exploding = history(train, val, grad_norm__global=[1.0, 1.1, 0.9, 1.2, 1.0],
                        grad_norm__global_max=[2.0, 2.5, 60.0, 2.1, 2.0])
    findings = diagnose(exploding, C)
    assert kinds(findings) == ["exploding_gradients", "healthy"]
    assert findings[0].epoch == 3
    assert findings[0].evidence == ["median gradient norm 1; epoch 3: max 60"]

    vanishing = history(train, val, grad_norm__global=[1.0] * 5, grad_norm__global_max=[1.5] * 5,
                        **{"grad_norm__features.0": [1e-6] * 5, "grad_norm__head.2": [0.9] * 5})
    findings = diagnose(vanishing, C)
    assert kinds(findings) == ["vanishing_gradients", "healthy"]
    assert findings[0].evidence == ["layer groups with gradients below 1/1000 of the largest (0.9): "
                                    "features.0 1e-06"]


def test_class_imbalance_from_counts_and_recall():
    records = history([1.0, 0.5, 0.3], [1.0, 0.5, 0.31])
    counts = {"cat": 900, "dog": 100}
    per_class = [{"class": "cat", "recall": 0.98, "support": 90}, {"class": "dog", "recall": 0.40, "support": 10}]
    findings = diagnose(records, 2, counts, per_class)
    assert kinds(findings) == ["class_imbalance", "healthy"]
    assert findings[0].evidence == ["training split: class 'cat' has 900 images, class 'dog' only 100 (9.0:1)",
                                    "test recall ranges from 0.40 (class 'dog') to 0.98 (class 'cat')"]
    assert kinds(diagnose(records, 2, {"cat": 100, "dog": 90}, None)) == ["healthy"]


def test_balanced_counts_are_never_called_imbalanced():
    """CIFAR-10 as the newcomer had it: 270 images per class in training, a wide recall spread on the test set.
    No imbalance finding and no class weights: the classes are equal in number, some are just harder."""
    records = history([1.0, 0.5, 0.3], [1.0, 0.5, 0.31])
    counts = {f"class{i}": 270 for i in range(10)}
    per_class = [{"class": f"class{i}", "recall": 0.2 + 0.07 * i, "support": 1000} for i in range(10)]
    findings = diagnose(records, 10, counts, per_class)
    assert kinds(findings) == ["unequal_classes", "healthy"]
    assert findings[0].summary == ("Some classes are recognised far worse than others although the training "
                                   "classes are balanced.")
    assert not any("class_weights" in r for r in findings[0].remedies)
    assert kinds(diagnose(records, 10, counts, None)) == ["healthy"]


def test_a_blown_up_first_epoch_names_the_learning_rate_to_try():
    """lr 0.2 on 810 images: validation loss 1315 after epoch 1. That is the learning rate, and the finding says
    which one to try."""
    records = history([2.9, 2.1, 1.9], [1315.5386, 2.2, 2.0])
    findings = diagnose(records, C, lr=0.2)
    assert kinds(findings)[0] == "lr_too_high"
    assert findings[0].epoch == 1
    assert findings[0].evidence == ["validation loss reached 1316 at epoch 1, 571 times the chance level ln(10) = "
                                    "2.3026: steps too large threw the weights far off"]
    assert findings[0].remedies[0] == "lower the learning rate: try optim.lr=0.02 (a tenth of 0.2)"
    assert diagnose(records, C)[0].remedies[0] == "lower optim.lr (e.g. by 3-10x)"


def test_chance_loss_and_text_format():
    assert math.isclose(chance_loss(10), math.log(10))
    text = format_findings(diagnose(history([2.3, 2.29], [2.3, 2.3]), C))
    assert text.splitlines()[0] == "[underfitting] The model underfits: its training loss stays high."
    assert text.splitlines()[1].startswith("    evidence: final training loss 2.2900")


def test_cli_diagnose_errors_are_one_line(tmp_path, capsys):
    assert main(["diagnose", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.strip() == f"error: run folder '{tmp_path / 'missing'}' does not exist"
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"epoch": 1}) + "\n")
    assert main(["diagnose", str(tmp_path)]) == 2
    assert "no config.yaml" in capsys.readouterr().err


def test_noise_on_a_near_zero_training_loss_is_not_a_spike():
    train = [1.0, 0.3, 0.05, 0.01, 0.004, 0.009, 0.003]
    val = [1.0, 0.35, 0.12, 0.09, 0.085, 0.086, 0.084]
    findings = diagnose(history(train, val, [0.99] * 7, [0.97] * 7), C)
    assert kinds(findings) == ["healthy"]


def test_one_noisy_last_epoch_is_not_overfitting():
    train = [1.2, 0.6, 0.35, 0.25, 0.2, 0.18, 0.17]
    val = [1.0, 0.5, 0.3, 0.2, 0.21, 0.2, 0.24]  # last epoch +20% over the minimum, but the last 3 only +8%
    assert kinds(diagnose(history(train, val), C)) == ["healthy"]
    val[-1] = 0.26  # last 3 average 0.2233: +12% and +0.023, a trend
    findings = diagnose(history(train, val), C)
    assert kinds(findings) == ["overfitting"] and findings[0].epoch == 4


def test_mixed_targets_are_no_sign_of_underfitting_or_an_accuracy_gap():
    """MixUp/CutMix: the training loss stays near chance and the training accuracy low by design."""
    records = history([2.0, 1.9, 1.85], [1.0, 0.6, 0.4], train_acc=[0.3, 0.35, 0.4], val_acc=[0.7, 0.85, 0.9])
    assert "underfitting" in kinds(diagnose(records, C))
    assert kinds(diagnose(records, C, mixed_targets=True)) == ["healthy"]
