"""The training recipe's augmentation, each part against its reference implementation (torchvision.transforms.v2):
MixUp/CutMix targets and boxes, random erasing, automatic augmentation (whole transform and each op), soft-target
losses; and end to end: the same run through both decode paths, and a SIGKILL mid-epoch resumed bit-exactly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from pipeline.config import load_config
from pipeline.data.samples.auto_augment import INTERPOLATION, auto_augment_step
from pipeline.data.samples.transforms import SampleAugment, build_transform, seeded_cpu_rng
from pipeline.training.losses import build_loss
from pipeline.training.mixing import BatchAugment, HardTargets, MixedTargets
from tests.conftest import TINY, read_jsonl, run_cli

CLASSES = 5


def _augment(*overrides: str) -> BatchAugment:
    return BatchAugment(load_config(None, list(overrides)).data.augment, seed=7)


def _batch(size: int = 8, height: int = 10, width: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(size * height)
    return (torch.randn(size, 3, height, width, generator=generator),
            torch.randint(CLASSES, (size,), generator=generator))


# ---- MixUp / CutMix --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [["data.augment.mixup_alpha=0.4"], ["data.augment.cutmix_alpha=1.0"],
                                       ["data.augment.mixup_alpha=0.2", "data.augment.cutmix_alpha=1.0",
                                        "data.augment.mix_prob=0.8", "data.augment.mix_switch_prob=0.5"]],
                         ids=["mixup", "cutmix", "both"])
def test_mixup_and_cutmix_equal_torchvision_for_the_same_draws(overrides: list[str]) -> None:
    """Ours against torchvision's MixUp/CutMix forward, its generator forced to the same state: after the draws
    that choose whether (mix_prob) and which (mix_switch_prob) to mix, torchvision draws lambda (and the box)
    from the same generator, so images and targets must be the same bits."""
    augment = _augment(*overrides)
    cfg = load_config(None, overrides).data.augment
    seen = set()
    for step in range(40):
        images, labels = _batch()
        position = (1, 0, step, 0)
        mixed, targets = augment(images.clone(), labels, position)
        with seeded_cpu_rng(augment.batch_seed(position)):
            kind = "none"
            if torch.rand(1) < cfg.mix_prob:
                both = cfg.mixup_alpha > 0 and cfg.cutmix_alpha > 0
                kind = "cutmix" if (bool(torch.rand(1) < cfg.mix_switch_prob) if both else cfg.cutmix_alpha > 0) \
                    else "mixup"
            if kind == "none":
                expected_images, expected_targets = images, F.one_hot(labels, CLASSES).float()
            else:
                reference = v2.CutMix(alpha=cfg.cutmix_alpha, num_classes=CLASSES) if kind == "cutmix" else \
                    v2.MixUp(alpha=cfg.mixup_alpha, num_classes=CLASSES)
                expected_images, expected_targets = reference(images, labels)
        seen.add(kind)
        assert isinstance(targets, MixedTargets)
        assert torch.equal(mixed, expected_images), (step, kind)
        assert torch.equal(targets.targets(CLASSES), expected_targets), (step, kind)
        assert targets.targets(CLASSES).sum(1).allclose(torch.ones(len(labels)))
    alone = "mixup" if cfg.cutmix_alpha == 0 else "cutmix" if cfg.mixup_alpha == 0 else ""
    assert seen == ({alone} if alone else {"none", "mixup", "cutmix"})


def test_cutmix_box_and_lambda_are_torchvisions() -> None:
    """The box and the area-corrected lambda for the same lambda and centre: CutMix.make_params under the same
    generator state, and the pasted region is exactly the neighbour's (roll by one)."""
    augment = _augment("data.augment.cutmix_alpha=1.0")
    images, _ = _batch(height=9, width=13)
    for step in range(20):
        position = (0, 0, step, 1)
        with seeded_cpu_rng(augment.batch_seed(position)):
            kind, params = augment.draw_mix(images.shape)
        with seeded_cpu_rng(augment.batch_seed(position)):
            torch.rand(1)  # mix_prob's draw
            expected = v2.CutMix(alpha=1.0, num_classes=CLASSES).make_params([images])
        assert kind == "cutmix" and params == {"box": expected["box"], "lam": expected["lam_adjusted"]}
        x1, y1, x2, y2 = params["box"]
        assert params["lam"] == pytest.approx(1 - (x2 - x1) * (y2 - y1) / (9 * 13))


def test_mixing_is_seeded_by_the_batch_position_and_leaves_the_run_rng_alone() -> None:
    augment = _augment("data.augment.mixup_alpha=0.2", "data.augment.cutmix_alpha=1.0",
                       "data.augment.random_erasing=0.5")
    images, labels = _batch()
    torch.manual_seed(3)
    state = torch.get_rng_state()
    a, ta = augment(images.clone(), labels, (2, 0, 5, 0))
    assert torch.equal(torch.get_rng_state(), state)
    b, tb = augment(images.clone(), labels, (2, 0, 5, 0))
    c, _ = augment(images.clone(), labels, (2, 0, 5, 1))  # another rank mixes its batch otherwise
    assert torch.equal(a, b) and torch.equal(ta.targets(CLASSES), tb.targets(CLASSES)) and not torch.equal(a, c)


def test_no_mixing_keeps_integer_labels_and_the_old_accuracy() -> None:
    images, labels = _batch()
    out, targets = _augment()(images, labels, (0, 0, 0, 0))
    assert out is images and isinstance(targets, HardTargets) and targets.targets(CLASSES) is labels
    logits = F.one_hot(labels, CLASSES).float()
    assert targets.correct(logits).item() == len(labels)


def test_training_accuracy_with_soft_targets_is_the_targets_weight_on_the_prediction() -> None:
    labels = torch.tensor([0, 1, 2, 3])  # neighbours (roll by one): 3, 0, 1, 2
    targets = MixedTargets(labels, lam=0.7)
    own = F.one_hot(labels, CLASSES).float()
    neighbour = F.one_hot(labels.roll(1, 0), CLASSES).float()
    assert targets.correct(own).item() == pytest.approx(4 * 0.7)
    assert targets.correct(neighbour).item() == pytest.approx(4 * 0.3)
    assert targets.correct(F.one_hot(torch.full((4,), 4), CLASSES).float()).item() == 0
    assert MixedTargets(labels, 1.0).correct(own).item() == 4


# ---- random erasing --------------------------------------------------------------------------------------------
def test_random_erasing_equals_torchvision_per_image() -> None:
    """v2.RandomErasing(p, value=0) called on each image of the batch in turn, from the same generator state, gives
    the same bits; erasing comes before mixing, and it draws first."""
    augment = _augment("data.augment.random_erasing=0.5")
    erased_images = 0
    for step in range(10):
        images, labels = _batch(height=16, width=16)
        position = (0, 0, step, 0)
        out, targets = augment(images.clone(), labels, position)
        with seeded_cpu_rng(augment.batch_seed(position)):
            reference = v2.RandomErasing(p=0.5, value=0)
            expected = torch.stack([reference(image) for image in images])
        assert torch.equal(out, expected) and isinstance(targets, HardTargets)
        erased_images += sum(not torch.equal(a, b) for a, b in zip(out, images))
    assert 20 <= erased_images <= 60  # of 80, p = 0.5


# ---- losses with soft targets ----------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [[], ["optim.label_smoothing=0.1"],
                                       ["optim.label_smoothing=0.1", "optim.class_weights=[1,2,0.5,1,3]"],
                                       ["optim.class_weights=[1,2,0.5,1,3]"]],
                         ids=["plain", "smoothing", "smoothing+weights", "weights"])
def test_cross_entropy_on_one_hot_targets_is_the_integer_label_loss(overrides: list[str]) -> None:
    loss = build_loss(load_config(None, overrides).optim, CLASSES)
    logits, labels = torch.randn(8, CLASSES, generator=torch.Generator().manual_seed(0)), torch.arange(8) % CLASSES
    hard = loss(logits, labels)
    assert torch.equal(hard, torch.nn.CrossEntropyLoss(weight=loss.weight, label_smoothing=loss.label_smoothing)(
        logits, labels))  # integer labels: torch's loss, unchanged
    assert loss(logits, F.one_hot(labels, CLASSES).float()).item() == pytest.approx(hard.item(), rel=1e-6)


def test_cross_entropy_on_mixed_targets() -> None:
    logits = torch.randn(6, CLASSES, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    targets = MixedTargets(labels, lam=0.6).targets(CLASSES)
    smooth = build_loss(load_config(None, ["optim.label_smoothing=0.1"]).optim, CLASSES)
    # Without class weights: torch's own probability-target loss (smoothing applied to the targets likewise) ...
    assert smooth(logits, targets).item() == pytest.approx(F.cross_entropy(logits, targets, label_smoothing=0.1).item(),
                                                           rel=1e-6)
    # ... and, by linearity, lam * loss(own labels) + (1 - lam) * loss(neighbours' labels): timm's mixup criterion.
    assert smooth(logits, targets).item() == pytest.approx(
        0.6 * smooth(logits, labels).item() + 0.4 * smooth(logits, labels.roll(1, 0)).item(), rel=1e-6)
    weights = [1, 2, 0.5, 1, 3]
    weighted = build_loss(load_config(None, [f"optim.class_weights={weights}", "optim.label_smoothing=0.1"]).optim,
                          CLASSES)
    w = torch.tensor(weights, dtype=torch.float32)
    smoothed = targets * 0.9 + 0.1 / CLASSES
    expected = (-(F.log_softmax(logits, -1) * smoothed * w).sum() / (targets * w).sum()).item()
    assert weighted(logits, targets).item() == pytest.approx(expected, rel=1e-6)


def test_bce_takes_mixed_targets_with_class_weights_as_pos_weight() -> None:
    logits = torch.randn(6, CLASSES, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    targets = MixedTargets(labels, lam=0.3).targets(CLASSES)
    weights = [1, 2, 0.5, 1, 3]
    bce = build_loss(load_config(None, ["optim.loss=bce", f"optim.class_weights={weights}"]).optim, CLASSES)
    expected = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=torch.tensor(weights))
    assert torch.equal(bce(logits, targets), expected)
    assert torch.equal(bce(logits, labels), bce(logits, F.one_hot(labels, CLASSES).float()))


# ---- automatic augmentation ------------------------------------------------------------------------------------
POLICIES = [("randaugment", "imagenet"), ("trivialaugment", "imagenet"), ("autoaugment", "imagenet"),
            ("autoaugment", "cifar10"), ("augmix", "imagenet")]


@pytest.mark.parametrize("name,policy", POLICIES, ids=[f"{n}-{p}" for n, p in POLICIES])
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 8, 8), (3, 2, 3)], ids=["32px", "8px-gray", "2x3px"])
def test_auto_augment_equals_torchvision_under_the_same_seed(name: str, policy: str, shape: tuple) -> None:
    """The parameters drawn apart, then applied: the same bits as torchvision's transform run under the same seed
    (so the same ops and magnitudes were chosen), down to 2 x 3 pixel images."""
    step = auto_augment_step(name, policy, num_ops=3, magnitude=12)
    image = torch.randint(256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    chosen = set()
    for seed in range(60):
        torch.manual_seed(seed)
        expected = step.reference(image)
        torch.manual_seed(seed)
        params = step.make_params([image])
        out = step.transform(image, params)
        assert out.dtype == torch.uint8 and out.shape == image.shape
        assert torch.equal(out, expected), (seed, params)
        chosen |= {op for op, _ in params.get("ops", [])} | {op for c in params.get("chains", []) for op, _ in c}
    assert len(chosen) >= 8  # most of the op space was exercised


def _functional(image: torch.Tensor, op: str, magnitude: float) -> torch.Tensor:
    """torchvision.transforms.v2.functional's op with the parameters the auto-augment papers define."""
    affine = dict(angle=0.0, scale=1.0, interpolation=INTERPOLATION, fill=None)
    return {
        "Identity": lambda: image,
        "ShearX": lambda: TF.affine(image, translate=[0, 0], shear=[math.degrees(math.atan(magnitude)), 0.0],
                                    center=[0, 0], **affine),
        "ShearY": lambda: TF.affine(image, translate=[0, 0], shear=[0.0, math.degrees(math.atan(magnitude))],
                                    center=[0, 0], **affine),
        "TranslateX": lambda: TF.affine(image, translate=[int(magnitude), 0], shear=[0.0, 0.0], **affine),
        "TranslateY": lambda: TF.affine(image, translate=[0, int(magnitude)], shear=[0.0, 0.0], **affine),
        "Rotate": lambda: TF.rotate(image, magnitude, interpolation=INTERPOLATION, fill=None),
        "Brightness": lambda: TF.adjust_brightness(image, 1.0 + magnitude),
        "Color": lambda: TF.adjust_saturation(image, 1.0 + magnitude),
        "Contrast": lambda: TF.adjust_contrast(image, 1.0 + magnitude),
        "Sharpness": lambda: TF.adjust_sharpness(image, 1.0 + magnitude),
        "Posterize": lambda: TF.posterize(image, int(magnitude)),
        "Solarize": lambda: TF.solarize(image, 255.0 * magnitude),
        "AutoContrast": lambda: TF.autocontrast(image),
        "Equalize": lambda: TF.equalize(image),
        "Invert": lambda: TF.invert(image),
    }[op]()


@pytest.mark.parametrize("size", [8, 32])
def test_each_sampled_op_equals_the_functional_op(size: int) -> None:
    """Every op TrivialAugment and RandAugment sample, with the magnitude they sampled, against
    torchvision.transforms.v2.functional applied with the same parameters: bit-equal on uint8."""
    image = torch.randint(256, (3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(size))
    ops = set()
    for name in ("trivialaugment", "randaugment", "autoaugment"):
        step = auto_augment_step(name)
        for seed in range(80):
            torch.manual_seed(seed)
            for op, magnitude in step.make_params([image])["ops"]:
                assert torch.equal(step.transform(image, {"ops": [(op, magnitude)]}),
                                   _functional(image, op, magnitude)), (op, magnitude)
                ops.add(op)
    assert len(ops) == 15  # all 14 of TrivialAugment's, and Invert from AutoAugment


@pytest.mark.parametrize("name", ["randaugment", "trivialaugment", "autoaugment", "augmix"])
def test_sample_augment_with_auto_augment_reproduces_build_transform(name: str) -> None:
    """The loader's two halves (parameters drawn from the sample's seed, applied elsewhere) give what the one-piece
    torchvision pipeline gives under that seed, with crop, flip and the auto-augment step."""
    from PIL import Image

    cfg = load_config(None, ["data.image_size=12", "data.augment.random_resized_crop=true", "data.augment.hflip=0.5",
                             f"data.augment.auto_augment={name}"]).data
    pixels = torch.randint(256, (20, 17, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)).numpy()
    image = Image.fromarray(pixels)
    augment = SampleAugment(cfg, train=True)
    normalize = build_transform(cfg, train=True).transforms[-1]
    for seed in range(10):
        torch.manual_seed(seed)
        expected = build_transform(cfg, train=True)(image)
        torch.manual_seed(seed)
        params = augment.draw(image.height, image.width)
        out = augment.apply(TF.pil_to_tensor(image), params)
        assert torch.equal(normalize(TF.to_dtype(out, torch.float32, scale=True)), expected)


# ---- end to end ------------------------------------------------------------------------------------------------
RECIPE = ["data.augment.mixup_alpha=0.2", "data.augment.cutmix_alpha=1.0", "data.augment.auto_augment=trivialaugment",
          "data.augment.random_erasing=0.25", "optim.label_smoothing=0.1"]


def _args(digits_root: Path, out: Path, name: str, *extra: str) -> list[str]:
    return ["train", "configs/default.yaml", f"data.root={digits_root}", f"run.output_dir={out}", f"run.name={name}",
            *TINY, "train.batch_size=64", *RECIPE, *extra]


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(str(a)), load_file(str(b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow  # two full runs; test_decode's batch-level equality of both paths stays in the suite
def test_both_decode_paths_train_the_same_weights(digits_root: Path, tmp_path: Path) -> None:
    """The recipe (trivialaugment, erasing, mixup/cutmix) with the images decoded and augmented in the workers, or
    read there and decoded/augmented in the main process (data.decode_device=cpu): bit-identical runs."""
    one = ["train.epochs=1", "data.num_workers=2"]
    run_cli(_args(digits_root, tmp_path, "workers", *one))
    run_cli(_args(digits_root, tmp_path, "main", *one, "data.decode_device=cpu"))
    assert _same_weights(tmp_path / "workers/checkpoints/last/model.safetensors",
                         tmp_path / "main/checkpoints/last/model.safetensors")
    rows = read_jsonl(tmp_path / "workers/metrics.jsonl")
    assert rows == read_jsonl(tmp_path / "main/metrics.jsonl")
    assert 0 < rows[0]["train/accuracy"] < 1  # soft-target accuracy, see pipeline.training.mixing


def test_sigkill_mid_epoch_with_the_recipe_resumes_bit_exact(digits_root: Path, tmp_path: Path) -> None:
    """Killed (SIGKILL) at step 26 of 40, two steps after the checkpoint at step 24 (checkpoint.every_steps=8), with
    the default 2 workers and an EMA of the weights: the resumed run replays steps 25-26 with the same crops,
    auto-augment ops, erasures and mixes, and ends with the clean run's weights and EMA weights, metrics and test
    metrics, bit for bit."""
    args = ["train.epochs=2", "checkpoint.every_steps=8", "data.num_workers=2", "train.ema_decay=0.9",
            "train.ema_warmup=true"]
    run_cli(_args(digits_root, tmp_path, "clean", *args))
    killed = run_cli(_args(digits_root, tmp_path, "cut", *args), check=False, env={"PIPELINE_KILL_AT_STEP": "26"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = run_cli(_args(digits_root, tmp_path, "cut", *args))
    assert "resumed from" in resumed.stdout and "step 24" in resumed.stdout
    clean, cut = tmp_path / "clean", tmp_path / "cut"
    for weights in ("checkpoints/best/model.safetensors", "checkpoints/last/model.safetensors",
                    "checkpoints/best/ema.safetensors", "checkpoints/last/ema.safetensors"):
        assert _same_weights(clean / weights, cut / weights), weights
    assert read_jsonl(clean / "metrics.jsonl") == read_jsonl(cut / "metrics.jsonl")
    assert json.loads((clean / "test_metrics.json").read_text()) == json.loads((cut / "test_metrics.json").read_text())
