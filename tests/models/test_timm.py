"""timm models: `model.name=timm/<name>`, weights from files and the Hugging Face cache (never downloaded), the
pretrained config as input settings, layer groups as timm's group_matcher names them, gradual unfreezing, a short
training run and a fine-tune from its weights, export parity for three families."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pipeline.commands.cli import main
from pipeline.commands.train import train
from pipeline.config import load_config
from pipeline.config.schema import FinetuneConfig, ModelConfig
from pipeline.models import create_model
from pipeline.models.pretrained import load_pretrained, read_pretrained_state
from pipeline.training.finetune import match_input
from pipeline.training.freezing import FreezeCallback, build_groups, trainable_groups
from tests.conftest import ROOT, run_cli

timm = pytest.importorskip("timm")

RUN = ["logging.wandb_mode=disabled", "logging.progress=false", "data.num_workers=0", "train.batch_size=32",
       "data.image_size=16", "data.augment.rotation=0", "data.augment.translate=0", "checkpoint.resume=never"]


def _model(name: str, classes: int = 5, channels: int = 3, **kwargs) -> torch.nn.Module:
    return create_model(ModelConfig(name=f"timm/{name}", **kwargs), classes, channels)


def test_timm_model_takes_classes_channels_and_drop_path():
    model = _model("resnet18", classes=7, channels=1, drop_path=0.2)
    assert model.fc.out_features == 7 and model.conv1.in_channels == 1
    rates = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert rates == pytest.approx([0.2 * i / 7 for i in range(1, 8)])  # linear in depth (block 0: none), max 0.2
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 7)
    assert not any(type(m).__name__ == "DropPath" for m in _model("resnet18").modules())  # null: timm's default 0


def test_unknown_timm_name_and_refused_drop_path_are_one_line():
    with pytest.raises(ValueError) as info:
        _model("resnet_18")
    assert str(info.value) == ("model.name='timm/resnet_18': timm has no model 'resnet_18'; did you mean "
                               "timm/resnet18, timm/resnetv2_18, timm/resnet18d, timm/resnetv2_18d?")
    with pytest.raises(ValueError, match=r"^model.drop_path is not taken by timm/vgg11 \(its timm constructor has no "
                                         r"drop_path_rate\)"):
        _model("vgg11", drop_path=0.1)
    with pytest.raises(ValueError, match="names no model"):
        ModelConfig(name="timm/")


def test_config_check_does_not_import_timm():
    code = ("import sys; from pipeline.config import load_config; "
            "load_config(None, ['model.name=timm/resnet18']); assert 'timm' not in sys.modules, 'timm imported'")
    import subprocess

    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


@pytest.mark.parametrize("name, expected", [
    ("resnet18", ["stem", "layer1", "layer2", "layer3", "layer4", "head"]),
    ("efficientnet_b0", ["stem", *[f"blocks.{i}" for i in range(7)], "head"]),
    ("convnext_nano", ["stem", "stages.0", "stages.1", "stages.2", "stages.3", "head"]),
])
def test_layer_groups_are_timms_coarse_groups(name, expected):
    model = _model(name)
    groups = build_groups(model)
    assert [g.name for g in groups] == expected
    ours = [[n for n, _ in g.params] for g in groups]
    theirs = timm.models.group_parameters(model, model.group_matcher(coarse=True))
    assert ours == [theirs[i] for i in sorted(theirs)]  # exactly timm's grouping, in its order
    assert sum(len(g) for g in ours) == len(list(model.parameters()))


def test_gradual_unfreezing_of_a_timm_model_opens_its_groups_from_the_head():
    model = _model("resnet18")
    cfg = FinetuneConfig(freeze="gradual", unfreeze_every=2)
    groups = build_groups(model)
    assert [trainable_groups(cfg, groups, e) for e in (0, 1, 2, 4)] == [
        ["head"], ["head"], ["layer4", "head"], ["layer3", "layer4", "head"]]
    callback = FreezeCallback(cfg, model, groups)
    callback.set_epoch(2)
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"layer4", "fc"}
    assert not model.bn1.training or model.bn1._frozen_stats  # frozen BatchNorm held in eval mode


def _saved_state(tmp_path: Path) -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    return {k: v.clone() for k, v in timm.create_model("resnet18", num_classes=1000).state_dict().items()}


def _check_loaded(model: torch.nn.Module, state: dict, report) -> None:
    assert report.head == ["fc.weight", "fc.bias"] and report.missing == [] and report.unexpected == []
    assert len(report.loaded) == len(state) - 2
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in report.loaded)


@pytest.mark.parametrize("form", ["safetensors", "pth"])
def test_timm_state_dict_files_load(tmp_path, form):
    state = _saved_state(tmp_path)
    path = tmp_path / f"resnet18.{form}"
    save_file(state, str(path)) if form == "safetensors" else torch.save(state, path)
    model = _model("resnet18", classes=4)
    _check_loaded(model, state, load_pretrained(model, read_pretrained_state(str(path)), str(path)))


def _hf_cache(root: Path, state: dict, pretrained_cfg: dict | None = None) -> Path:
    """The layout huggingface_hub writes: models--timm--<name>/{refs/main, snapshots/<hash>/model.safetensors}."""
    repo = root / "models--timm--resnet18.a1_in1k"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    save_file(state, str(snapshot / "model.safetensors"))
    if pretrained_cfg:
        (snapshot / "config.json").write_text(json.dumps({"architecture": "resnet18",
                                                          "pretrained_cfg": pretrained_cfg}))
    return repo


def test_hugging_face_cache_by_hub_name_and_by_folder(tmp_path, monkeypatch):
    state = _saved_state(tmp_path)
    repo = _hf_cache(tmp_path / "hub", state)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    for source in ("hf-hub:timm/resnet18.a1_in1k", str(repo), str(repo / "snapshots" / "0123abcd")):
        model = _model("resnet18", classes=4)
        _check_loaded(model, state, load_pretrained(model, read_pretrained_state(source), source))


def test_missing_hub_weights_name_the_path_looked_for(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as info:
        read_pretrained_state("hf-hub:timm/resnet50.a1_in1k")
    assert str(info.value).startswith(
        "finetune.weights='hf-hub:timm/resnet50.a1_in1k' is not in the local Hugging Face cache (no download here): "
        f"looked for {tmp_path}/hub/models--timm--resnet50.a1_in1k/snapshots/<refs/main>/model.safetensors")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="is not hf-hub:<org>/<name>"):
        read_pretrained_state("hf-hub:resnet50")


def test_match_input_takes_the_pretrained_config(tmp_path, monkeypatch):
    base = ["model.name=timm/resnet18", "data.image_size=32"]
    state_file = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(1)}, str(state_file))
    cfg = match_input(load_config(None, [*base, f"finetune.weights={state_file}"]))
    assert (cfg.data.image_size, cfg.data.eval_crop_pct) == (224, 0.95)  # timm's resnet18 default tag: a1_in1k
    assert cfg.data.mean == [0.485, 0.456, 0.406] and cfg.data.std == [0.229, 0.224, 0.225]
    tagged = match_input(load_config(None, ["model.name=timm/resnet18.tv_in1k", f"finetune.weights={state_file}"]))
    assert tagged.data.eval_crop_pct == 0.875
    _hf_cache(tmp_path / "hub", {"x": torch.zeros(1)}, {"input_size": [3, 160, 160], "mean": [0.5, 0.5, 0.5],
                                                          "std": [0.25, 0.25, 0.25], "crop_pct": 0.9})
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    hub = match_input(load_config(None, [*base, "finetune.weights=hf-hub:timm/resnet18.a1_in1k"]))
    assert (hub.data.image_size, hub.data.eval_crop_pct, hub.data.mean) == (160, 0.9, [0.5, 0.5, 0.5])
    gray = match_input(load_config(None, [*base, "data.channels=1", "data.mean=[0.5]", "data.std=[0.5]",
                                          f"finetune.weights={state_file}"]))
    assert gray.data.mean == [pytest.approx(sum([0.485, 0.456, 0.406]) / 3)]
    off = match_input(load_config(None, [*base, f"finetune.weights={state_file}", "finetune.match_input=false"]))
    assert off.data.image_size == 32


@pytest.fixture(scope="module")
def timm_run(tmp_path_factory, tiny_digits_root: Path) -> Path:
    """timm/resnet18 trained two epochs (4 steps each) on 128 digits (8x8 grayscale upscaled to 16 px)."""
    out = tmp_path_factory.mktemp("timm")
    metrics = train(load_config(ROOT / "configs" / "default.yaml", [
        f"data.root={tiny_digits_root}", f"run.output_dir={out}", "run.name=resnet18", "model.name=timm/resnet18",
        "model.drop_path=0.05", "train.epochs=2", "optim.lr=0.003", *RUN]))
    rows = [json.loads(line) for line in (out / "resnet18" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4, 8] and all(r["train/loss"] < 10 for r in rows)
    assert 0 <= metrics["accuracy"] <= 1 and metrics["num_skipped"] == 0
    return out / "resnet18"


@pytest.mark.slow  # two training runs of a timm ResNet-18 (~2-4 min on 2 cores)
def test_timm_model_trains_and_fine_tunes_from_its_weights_with_gradual_unfreezing(timm_run, tiny_digits_root):
    out = timm_run.parent
    weights = timm_run / "checkpoints" / "best" / "model.safetensors"
    train(load_config(ROOT / "configs" / "default.yaml", [
        f"data.root={tiny_digits_root}", f"run.output_dir={out}", "run.name=ft", "model.name=timm/resnet18",
        f"finetune.weights={weights}", "finetune.freeze=gradual", "finetune.load_head=true", "train.epochs=2",
        "optim.lr=0.001", *RUN]))
    report = json.loads((out / "ft" / "pretrained_load.json").read_text())
    assert len(report["loaded"]) == 122 and report["head"] == report["missing"] == []  # every tensor, the head too
    rows = [json.loads(line) for line in (out / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["trainable_params"] for r in rows] == [5130, 5130 + 8393728]  # fc, then layer4 too
    assert {k for k in rows[0] if k.startswith("lr/")} == {
        f"lr/{g}/{s}" for g in ("stem", "layer1", "layer2", "layer3", "layer4", "head") for s in ("decay", "no_decay")}


# resnet18 in the regular suite; the other two families (~1-3 min each on 2 cores) are slow
@pytest.mark.parametrize("name", ["resnet18", *(pytest.param(n, marks=pytest.mark.slow)
                                               for n in ("efficientnet_b0", "mobilenetv3_small_100"))])
def test_export_parity_for_three_timm_families(name, timm_run, tiny_digits_root, capsys):
    if name == "resnet18":
        run_dir = timm_run
    else:
        run_dir = timm_run.parent / name
        train(load_config(ROOT / "configs" / "default.yaml", [
            f"data.root={tiny_digits_root}", f"run.output_dir={timm_run.parent}", f"run.name={name}",
            f"model.name=timm/{name}", "train.epochs=1", *RUN]))
    for fmt in ("torchscript", "exported"):
        assert main(["export", str(run_dir), "--format", fmt]) == 0
        out = capsys.readouterr().out
        diff = float(re.search(r"max abs diff of logits (\S+) on 32 validation images", out).group(1))
        assert diff <= 1e-4
        sidecar = json.loads((run_dir / "export" / fmt / "model.json").read_text())
        assert sidecar["model"] == f"timm/{name}" and sidecar["max_abs_diff"] == diff


def test_cli_unknown_timm_model_exits_2_with_one_line(tmp_path, tiny_digits_root):
    result = run_cli(["train", "configs/default.yaml", f"data.root={tiny_digits_root}",
                      "model.name=timm/efficientnet_b9",
                      f"run.output_dir={tmp_path}", *RUN], check=False, env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "error: model.name='timm/efficientnet_b9': timm has no model 'efficientnet_b9'; did you mean timm/")
