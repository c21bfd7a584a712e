"""task.type: multilabel and regression targets (labels, index, losses, metrics against sklearn, thresholds, mixing,
one-line refusals) and real CLI runs on tiny digits shards (resume bit-exact, non-finite guard, 2 gloo ranks,
evaluate / predict / export)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn import metrics as skm

from pipeline.config import load_config
from pipeline.data.dataset.index import add_targets, index_shard, target_stats
from pipeline.data.dataset.keys import SampleKeys
from pipeline.tasks.multilabel import Multilabel, MultilabelMetrics, best_f1_thresholds
from pipeline.tasks.regression import Regression
from pipeline.training.losses import OneHotBCE, RegressionLoss
from pipeline.training.mixing import MixedTargets
from tests.conftest import read_jsonl, run_cli
from tests.support.task_shards import MULTILABEL_CLASSES, digits_of, tags, write

TINY = ["model.channels=[8,16]", "data.image_size=8", "train.batch_size=32", "logging.wandb_mode=disabled",
        "logging.progress=false", "data.num_workers=0", "optim.lr=0.01"]
MULTILABEL = ["task.type=multilabel", "data.label_key=json.tags"]
REGRESSION = ["task.type=regression", "data.label_key=json.targets"]
STEPS_PER_EPOCH = 19  # 600 training samples / 32


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, str]:
    return write(tmp_path_factory.mktemp("task_shards"))


def _args(shards: dict, out: Path, name: str, *extra: str) -> list[str]:
    return ["train", "configs/default.yaml", f"data.train={shards['train']}", f"data.val={shards['val']}",
            f"data.test={shards['test']}", f"data.index_dir={out / 'index'}", f"run.output_dir={out}",
            f"run.name={name}", *TINY, *extra]


# ---- configuration --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, line", [
    (["task.type=regression", "data.augment.mixup_alpha=0.2"], "a mixed image has no regression target"),
    (["task.type=regression", "data.augment.cutmix_alpha=1"], "a mixed image has no regression target"),
    (["task.type=multilabel", "imbalance.balanced_sampling=true"], "imbalance.balanced_sampling draws by"),
    (["task.type=regression", "imbalance.class_weights=auto"], "task.type=regression has none"),
    (["task.type=multilabel", "train.monitor=val/mae"], "train.monitor='val/mae' is not a metric of task.type=multi"),
    (["task.type=classification", "train.monitor=val/r2"], "train.monitor='val/r2' is not a metric of task.type=cla"),
    (["task.threshold=1.5"], "task.threshold='1.5' is not valid; give a probability in (0, 1) or tune"),
    (["task.type=ranking"], "task.type='ranking' is not valid; choose one of classification, multilabel, regression"),
    (["task.loss=hinge"], "task.loss='hinge' is not valid; choose one of mse, huber, l1"),
])
def test_combinations_a_task_cannot_take_are_refused_in_one_line(overrides: list[str], line: str) -> None:
    with pytest.raises(ValueError, match=None) as error:
        load_config(None, overrides)
    assert line in str(error.value) and "\n" not in str(error.value)


def test_the_default_monitor_is_the_tasks_own() -> None:
    assert (load_config(None, []).train.monitor, load_config(None, []).train.monitor_mode) == ("val/accuracy", "max")
    regression = load_config(None, ["task.type=regression"]).train
    multilabel = load_config(None, ["task.type=multilabel"]).train
    assert (regression.monitor, regression.monitor_mode) == ("val/mae", "min")
    assert (multilabel.monitor, multilabel.monitor_mode) == ("val/map_macro", "max")
    chosen = load_config(None, ["task.type=regression", "train.monitor=val/r2", "train.monitor_mode=max"]).train
    assert (chosen.monitor, chosen.monitor_mode) == ("val/r2", "max")


def test_the_cli_refuses_regression_with_mixup_in_one_line() -> None:
    result = run_cli(["train", "task.type=regression", "data.augment.mixup_alpha=0.2"], check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: data.augment.mixup_alpha/cutmix_alpha mix labels; a mixed image has no regression target: set both "
        "to 0 with task.type=regression"]


# ---- labels ---------------------------------------------------------------------------------------------------
def _json(value) -> dict:
    return {"__key__": "k", "json": json.dumps({"y": value}).encode()}


def test_multilabel_labels_are_sorted_distinct_indices_and_collate_multi_hot() -> None:
    keys = SampleKeys(label_key="json.y", classes=("cat", "dog", "ship"), task="multilabel")
    assert keys.label(_json(["ship", "cat", "ship"]), 3) == ((0, 2), "", "")
    assert keys.label(_json([1]), 3) == ((1,), "", "")
    assert keys.label(_json([]), 3) == ((), "", "")  # an image with none of the classes
    assert keys.label(_json("dog"), 3) == ((1,), "", "")  # one name alone
    assert keys.label(_json(["cow"]), 3)[1:] == ("bad_label", "label 'cow' is not one of the 3 class names")
    assert keys.label(_json([3]), 3)[1] == "bad_label"
    assert keys.label(_json([1.5]), 3)[1] == "no_label"
    text = SampleKeys(label_key="txt", classes=("cat", "dog", "ship"), task="multilabel")
    assert text.label({"txt": b"ship, dog"}, 3) == ((1, 2), "", "")
    assert torch.equal(keys.collate([(0, 2), (), (1,)], 3), torch.tensor([[1.0, 0, 1], [0, 0, 0], [0, 1, 0]]))


def test_regression_labels_are_floats_of_the_outputs_length() -> None:
    keys = SampleKeys(label_key="json.y", task="regression")
    assert keys.label(_json(12), 1) == ((12.0,), "", "")
    assert keys.label(_json([0.5, -3]), 2) == ((0.5, -3.0), "", "")
    assert keys.label(_json([0.5, -3]), 1)[1:] == ("bad_label", "label has 2 value(s); the task has 1 output(s)")
    assert keys.label({"json": b'{"y": NaN}'}, 1)[1] == "bad_label"
    assert keys.label(_json("cat"), 1)[1] == "no_label"
    assert SampleKeys(label_key="txt", task="regression").label({"txt": b"2.5,4"}, 2) == ((2.5, 4.0), "", "")
    batch = keys.collate([(1.0, 2.0), (3.0, 4.0)], 2)
    assert batch.dtype == torch.float32 and torch.equal(batch, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))


def test_the_index_counts_each_label_of_a_set_and_sums_regression_targets(shards: dict) -> None:
    train = sorted(Path(shards["train"]).parent.glob("train-*.tar"))
    multi = index_shard(str(train[0]), SampleKeys(label_key="json.tags", task="multilabel"))
    digits = [json.loads(k) for k in index_shard(str(train[0]), SampleKeys(label_key="json.digit")).labels]
    counts = index_shard(str(train[0]), SampleKeys(label_key="json.digit")).raw_labels()
    expected = {name: sum(n for d, n in counts.items() if name in tags(d)) for name in MULTILABEL_CLASSES}
    assert dict(multi.raw_labels()) == expected and sorted(digits) == sorted(counts)
    entry = index_shard(str(train[0]), SampleKeys(label_key="json.targets", task="regression"))
    assert entry.labels == {} and entry.targets["count"] == entry.num_samples == 150
    values = np.array([[d, 0.0] for d, n in counts.items() for _ in range(n)])
    assert entry.targets["sum"][0] == pytest.approx(values[:, 0].sum())


def test_target_stats_are_the_mean_and_population_std_over_shards() -> None:
    rng = np.random.default_rng(0)
    values = rng.normal(3.0, 2.0, size=(50, 2))
    parts = [{}, {}]
    for i, row in enumerate(values):
        assert add_targets(parts[i % 2], row.tolist())
    assert not add_targets(parts[0], [1.0])  # another length
    stats = target_stats(parts)
    assert stats["count"] == 50
    assert np.allclose(stats["mean"], values.mean(axis=0)) and np.allclose(stats["std"], values.std(axis=0))


# ---- losses, mixing -------------------------------------------------------------------------------------------
def test_regression_losses_standardise_the_targets() -> None:
    outputs, target = torch.tensor([[0.5, -1.0], [2.0, 0.0]]), torch.tensor([[12.0, 1.0], [16.0, 3.0]])
    mean, std = [10.0, 2.0], [4.0, 0.5]
    standardised = (target - torch.tensor(mean)) / torch.tensor(std)
    assert RegressionLoss("mse", mean, std)(outputs, target) == F.mse_loss(outputs, standardised)
    assert RegressionLoss("l1", mean, std)(outputs, target) == F.l1_loss(outputs, standardised)
    assert RegressionLoss("huber", mean, std, 0.5)(outputs, target) == F.huber_loss(outputs, standardised, delta=0.5)


def test_multilabel_loss_is_bce_with_logits_with_pos_weight() -> None:
    logits, target = torch.randn(4, 3), torch.tensor([[1.0, 0, 1], [0, 0, 0], [0, 1, 0], [1, 1, 1]])
    loss = Multilabel(["a", "b", "c"], "0.5").build_loss([1.0, 2.0, 0.5])
    assert isinstance(loss, OneHotBCE)
    expected = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor([1.0, 2.0, 0.5]))(logits, target)
    assert torch.equal(loss(logits, target), expected)


def test_mixup_mixes_multi_hot_targets() -> None:
    hot = torch.tensor([[1.0, 0, 1], [0, 1, 0], [0, 0, 0]])
    mixed = MixedTargets(hot, 0.7).targets(3)
    assert torch.allclose(mixed, 0.7 * hot + 0.3 * hot.roll(1, 0))
    assert torch.equal(hot, torch.tensor([[1.0, 0, 1], [0, 1, 0], [0, 0, 0]]))  # the labels are left alone


# ---- metrics against sklearn ----------------------------------------------------------------------------------
def test_multilabel_metrics_equal_sklearns() -> None:
    generator = torch.Generator().manual_seed(0)
    target = (torch.rand(200, 4, generator=generator) < 0.4).float()
    logits = torch.randn(200, 4, generator=generator) + 2 * target  # informative, not perfect
    thresholds = torch.tensor([0.5, 0.3, 0.6, 0.45])
    metrics = MultilabelMetrics(thresholds)
    for part in (slice(0, 120), slice(120, 200)):  # accumulated over batches
        metrics.update(logits[part], target[part], torch.tensor(1.0))
    got = metrics.compute()
    probs = logits.sigmoid().numpy()
    truth, decided = target.int().numpy(), (probs >= thresholds.numpy()).astype(int)
    assert got["map_macro"] == pytest.approx(skm.average_precision_score(truth, probs, average="macro"), abs=1e-6)
    assert got["f1_micro"] == pytest.approx(skm.f1_score(truth, decided, average="micro"), abs=1e-6)
    assert got["f1_macro"] == pytest.approx(skm.f1_score(truth, decided, average="macro"), abs=1e-6)
    assert got["exact_match"] == pytest.approx(skm.accuracy_score(truth, decided), abs=1e-6)
    assert got["hamming_loss"] == pytest.approx(skm.hamming_loss(truth, decided), abs=1e-6)
    assert got["num_samples"] == 200


def test_regression_metrics_equal_sklearns_in_the_labels_units() -> None:
    task = Regression(["a", "b"], load_config(None, ["task.type=regression"]).task,
                      {"mean": [10.0, -2.0], "std": [3.0, 0.5]})
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(100, 2, generator=generator)
    target = task.outputs(logits) + torch.randn(100, 2, generator=generator) * torch.tensor([1.0, 0.2])
    metrics = task.metrics()
    metrics.update(logits[:60], target[:60], torch.tensor(0.5))
    metrics.update(logits[60:], target[60:], torch.tensor(0.5))
    got = metrics.compute()
    values, truth = (logits * torch.tensor([3.0, 0.5]) + torch.tensor([10.0, -2.0])).double().numpy(), target.numpy()
    for i, row in enumerate(got["per_output"]):
        assert row["mae"] == pytest.approx(skm.mean_absolute_error(truth[:, i], values[:, i]), rel=1e-5)
        assert row["rmse"] == pytest.approx(skm.root_mean_squared_error(truth[:, i], values[:, i]), rel=1e-5)
        assert row["r2"] == pytest.approx(skm.r2_score(truth[:, i], values[:, i]), rel=1e-4)
    assert got["mae"] == pytest.approx(skm.mean_absolute_error(truth, values), rel=1e-5)
    assert got["r2"] == pytest.approx(skm.r2_score(truth, values), rel=1e-4)  # uniform average over outputs
    assert got["rmse"] == pytest.approx(np.mean([r["rmse"] for r in got["per_output"]]))


def test_tuned_thresholds_give_each_class_its_best_f1() -> None:
    generator = torch.Generator().manual_seed(2)
    target = (torch.rand(300, 3, generator=generator) < 0.3).float()
    probs = (torch.randn(300, 3, generator=generator) + 1.5 * target).sigmoid()
    chosen = best_f1_thresholds(probs, target)
    for c in range(3):
        best = max(skm.f1_score(target[:, c], probs[:, c] >= t) for t in probs[:, c].unique().tolist())
        assert skm.f1_score(target[:, c], probs[:, c] >= chosen[c]) == pytest.approx(best)
    assert best_f1_thresholds(probs, torch.zeros(300, 3)) == [0.5, 0.5, 0.5]  # no positives: the default


# ---- real runs ------------------------------------------------------------------------------------------------
def _same_weights(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a)), load_file(str(b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("task", [
    [*MULTILABEL, "task.threshold=tune", "data.augment.mixup_alpha=0.4", "imbalance.class_weights=auto"],
    pytest.param([*REGRESSION, "task.loss=huber"], marks=pytest.mark.slow),  # the same checkpoint path; ~30 s
], ids=["multilabel", "regression"])
def test_resume_is_bit_identical_and_the_nonfinite_guard_skips(shards: dict, tmp_path: Path, task: list[str]) -> None:
    """Killed after the checkpoint of epoch 1, resumed: the same weights, epoch records, test metrics and task state
    as the run that was never interrupted; a NaN loss at step 5 is skipped (counted) in both."""
    nan = {"PIPELINE_NAN_AT_STEP": "5"}
    run_cli(_args(shards, tmp_path, "ref", "train.epochs=2", *task), env=nan)
    killed = run_cli(_args(shards, tmp_path, "cut", "train.epochs=2", *task), check=False,
                     env={**nan, "PIPELINE_KILL_AT_STEP": str(STEPS_PER_EPOCH), "PIPELINE_KILL_AFTER_SAVE": "1"})
    assert killed.returncode == -9
    resumed = run_cli(_args(shards, tmp_path, "cut", "train.epochs=2", *task), env=nan)
    assert "resumed from" in resumed.stdout
    for name in ("best", "last"):
        assert _same_weights(tmp_path / f"ref/checkpoints/{name}/model.safetensors",
                             tmp_path / f"cut/checkpoints/{name}/model.safetensors")
    rows = read_jsonl(tmp_path / "ref/metrics.jsonl")
    assert rows == read_jsonl(tmp_path / "cut/metrics.jsonl")
    assert [r["nonfinite/skipped_steps"] for r in rows] == [1, 0]
    for name in ("test_metrics.json", "task.json"):
        assert (tmp_path / "ref" / name).read_text() == (tmp_path / "cut" / name).read_text()
    state = json.loads((tmp_path / "ref/checkpoints/best/state.json").read_text())["task"]
    final = json.loads((tmp_path / "ref/task.json").read_text())
    if state["type"] == "regression":  # the statistics it trained with
        assert state == final and final["mean"] == pytest.approx([np.mean(digits_of("train")), 4.89], abs=0.01)
    else:  # thresholds are tuned after training, on the best weights
        assert state["thresholds"] == [0.5] * 3 and final["tuned"] and final["thresholds"] != [0.5] * 3


def test_multilabel_run_records_evaluates_predicts_and_exports(shards: dict, tmp_path: Path) -> None:
    run_cli(_args(shards, tmp_path, "m", "train.epochs=2", *MULTILABEL, "task.threshold=0.4"))
    run = tmp_path / "m"
    test = json.loads((run / "test_metrics.json").read_text())
    assert {"map_macro", "f1_micro", "f1_macro", "exact_match", "hamming_loss", "loss", "num_samples"} <= test.keys()
    assert test["num_samples"] == 150 and test["task"] == {"type": "multilabel", "thresholds": [0.4] * 3,
                                                           "tuned": False}
    assert {"train/exact_match", "val/map_macro", "val/f1_micro"} <= read_jsonl(run / "metrics.jsonl")[-1].keys()
    evaluated = json.loads(run_cli(["evaluate", str(run), "--json"]).stdout)
    for key in ("map_macro", "f1_micro", "f1_macro", "exact_match", "hamming_loss"):
        assert evaluated[key] == pytest.approx(test[key], abs=1e-6)
    assert [r["class"] for r in evaluated["per_class"]] == ["even", "round", "small"]
    assert sum(r["support"] for r in evaluated["per_class"]) == round(evaluated["labels_per_image"]["true"] * 150)
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    Image.new("RGB", (16, 16), (200, 200, 200)).save(images / "a.png")
    predicted = json.loads(run_cli(["predict", str(run), str(images), "--json"]).stdout)[0]
    assert all(p["probability"] >= 0.4 for p in predicted["labels"])
    assert [p["probability"] for p in predicted["labels"]] == sorted((p["probability"] for p in predicted["labels"]),
                                                                     reverse=True)
    run_cli(["export", str(run), "--format", "torchscript"])
    sidecar = json.loads((run / "export/torchscript/model.json").read_text())
    assert sidecar["task"] == test["task"] and "sigmoid" in sidecar["output"]
    exported = json.loads(run_cli(["predict", str(run / "export/torchscript/model.safetensors"), str(images),
                                   "--json"]).stdout)[0]
    assert exported["labels"] == predicted["labels"]


def test_regression_outputs_are_in_the_labels_units_everywhere(shards: dict, tmp_path: Path) -> None:
    run_cli(_args(shards, tmp_path, "r", "train.epochs=2", "task.type=regression", "data.label_key=json.digit"))
    run = tmp_path / "r"
    test = json.loads((run / "test_metrics.json").read_text())
    digits = digits_of("train")
    assert test["task"]["type"] == "regression" and [r["output"] for r in test["per_output"]] == ["digit"]
    assert test["task"]["mean"] == pytest.approx([np.mean(digits)]) and test["task"]["std"] == pytest.approx(
        [np.std(digits)])
    assert 0 < read_jsonl(run / "metrics.jsonl")[-1]["train/mae"] < 4  # digits 0..9: predicting 4.5 scores 2.5
    evaluated = json.loads(run_cli(["evaluate", str(run), "--json"]).stdout)
    assert evaluated["mae"] == pytest.approx(test["mae"], rel=1e-5)
    assert evaluated["per_output"][0]["mae"] == pytest.approx(test["mae"], rel=1e-5)
    findings = run_cli(["diagnose", str(run)]).stdout
    assert "ln(" not in findings  # judged against predicting the mean, not a classifier's chance
    assert "report.html" in run_cli(["report", str(run)]).stdout


def test_two_gloo_ranks_tune_the_same_thresholds_on_every_sample(shards: dict, tmp_path: Path) -> None:
    run_cli(_args(shards, tmp_path, "ddp", "train.epochs=1", *MULTILABEL, "task.threshold=tune",
                  "train.cpu=true"), nproc=2, timeout=400)
    test = json.loads((tmp_path / "ddp/test_metrics.json").read_text())
    assert test["num_samples"] == 150 and len(test["task"]["thresholds"]) == 3
    assert test["task"] == json.loads((tmp_path / "ddp/task.json").read_text())
    assert read_jsonl(tmp_path / "ddp/metrics.jsonl")[0]["step"] == 10  # 600 samples / (2 ranks x 32), rounded up


@pytest.mark.parametrize("task, member", [(MULTILABEL, "tags"), (REGRESSION, "targets")], ids=["multilabel",
                                                                                                  "regression"])
def test_cross_validation_folds_keep_the_json_labels_the_run_reads(shards: dict, tmp_path: Path, task: list[str],
                                                                     member: str) -> None:
    """Fold shards of foreign json-labelled shards carry each sample's json as it was; the fold config reads them
    with the same data.label_key, and regression folds record their training targets' statistics."""
    import tarfile

    from pipeline.commands.cv import fold_config
    from pipeline.run.data import load_manifest

    cfg = load_config(None, [*(f"data.{split}={shards[split]}" for split in ("train", "val", "test")),
                             f"data.index_dir={tmp_path / 'index'}", "cv.folds=3", f"cv.data_dir={tmp_path / 'folds'}",
                             f"run.output_dir={tmp_path}", *task])
    fold_cfg = fold_config(cfg, 0)
    assert (fold_cfg.data.label_key, fold_cfg.task.type) == (cfg.data.label_key, cfg.task.type)
    manifest = load_manifest(fold_cfg)
    assert (manifest.task, manifest.label_key) == (cfg.task.type, cfg.data.label_key)

    def labels(split: str) -> list:
        found = []
        for shard in manifest.split(split).shards:
            with tarfile.open(Path(fold_cfg.data.root) / shard.name) as tar:
                assert not any(name.endswith(".cls") for name in tar.getnames())
                found += [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
        return found

    train, val = labels("train"), labels("val")
    pooled = [tags(d) for d in digits_of("train") + digits_of("val")]
    assert sorted(map(str, (x["tags"] for x in train + val))) == sorted(map(str, pooled)) and len(val) == 250
    if member == "targets":
        values = np.array([x["targets"] for x in train])
        assert manifest.split("train").targets["mean"] == pytest.approx(values.mean(axis=0).tolist())
        assert manifest.split("train").targets["std"] == pytest.approx(values.std(axis=0).tolist())
    else:  # each class's share of the validation fold within 2 points of the pool's
        for name in MULTILABEL_CLASSES:
            share = np.mean([name in t for t in pooled])
            assert abs(np.mean([name in x["tags"] for x in val]) - share) < 0.02
            assert manifest.split("val").class_counts[name] == sum(name in x["tags"] for x in val)
