"""Typed configuration schema: one dataclass per component.

Each field carries a one-line docstring directly below it; `pipeline.config.reference` reads those
strings to produce the config reference in docs/configuration.md, so the schema *is* the documentation. Checks that
need more than a type live in `__post_init__`, which runs when the merged config is converted back
into these dataclasses (see `pipeline.config.loader`).
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pipeline.exits import SIGNAL_NAMES

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
SCHEDULERS = ("cosine", "plateau", "step", "constant")
LOSSES = ("cross_entropy", "bce")
MODES = ("min", "max")
WANDB_MODES = ("offline", "online", "disabled")
FREEZE_STRATEGIES = ("full", "feature_extraction", "partial", "gradual")
CLASS_WEIGHT_MODES = ("none", "auto")
NONFINITE_POLICIES = ("skip", "halt", "ignore")
EMA_BUFFERS = ("average", "copy")
TTA_MODES = ("none", "flip", "flip_shift")
AUTO_AUGMENTS = ("none", "randaugment", "trivialaugment", "autoaugment", "augmix")
AUTOAUGMENT_POLICIES = ("imagenet", "cifar10", "svhn")
TASK_TYPES = ("classification", "multilabel", "regression")
REGRESSION_LOSSES = ("mse", "huber", "l1")
TASK_MONITORS = {
    "classification": ("val/accuracy", "val/loss", "val/f1_macro", "val/auroc"),
    "multilabel": ("val/map_macro", "val/loss", "val/f1_micro", "val/f1_macro", "val/exact_match", "val/hamming_loss"),
    "regression": ("val/mae", "val/loss", "val/rmse", "val/r2"),
}
"""What train.monitor may name per task.type; the first is what the default (val/accuracy) means for the task."""
MONITOR_MODES = {"val/mae": "min", "val/rmse": "min", "val/hamming_loss": "min", "val/loss": "min"}
"""Monitors that are better when smaller (the rest: larger)."""


MAX_IMAGE_SIZE = 4096
"""Largest data.image_size: one 4096 px RGB image is 200 MB as float32 (a batch of 64: 13 GB); 100,000 px tried to
allocate 30 GB for a single batch."""
MAX_INT = 2**63 - 1  # what torch and numpy can hold
MAX_SEED = 2**32 - 1  # numpy's seed range


MAX_TEXT = 16_384
"""Longest text value (characters): above any path (4,096), URL with a signed query or pipe: command."""
TEXT_LIMITS = {"run.name": 255, "logging.wandb_project": 128, "logging.wandb_entity": 128}
"""Keys with a tighter limit: a folder name (255 bytes), W&B's project and entity names (128 characters)."""
MAX_KEY = 256
"""Longest key (a field name, or a finetune.lr_mult pattern)."""


def text_limit(key: str) -> int:
    """The most characters the text at `key` may hold (data.train[3] is limited as data.train is)."""
    return TEXT_LIMITS.get(key.split("[", 1)[0], MAX_TEXT)


def text_problem(value: Any, key: str = "") -> str:
    """What no config text may hold, '' when `value` is fine: the one rule, asked by the loader (per layer, naming
    where the value came from) and by `_check_values` (every config, however it was made). Length first: a NUL
    search or a message quoting 10 MB of text would be the slow part."""
    if not isinstance(value, str):
        return ""
    if len(value) > text_limit(key):
        return f"is {len(value):,} characters long; at most {text_limit(key):,} are allowed"
    return "contains a NUL character" if "\0" in value else ""


def _check_finite(key: str, value: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{key}={value!r} is not a finite number")


def _check_values(key: str, value: Any) -> None:
    """Every number finite and storable, no NUL in text: for all fields, whatever their own checks say."""
    if dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            _check_values(f"{key}.{f.name}" if key else f.name, getattr(value, f.name))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_values(f"{key}[{index}]", item)
    elif isinstance(value, dict):
        for name, item in value.items():
            if len(name) > MAX_KEY:
                raise ValueError(f"{key} has a key of {len(name):,} characters; at most {MAX_KEY} are allowed")
            _check_values(f"{key}.{name}", item)
    elif isinstance(value, float):
        _check_finite(key, value)
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
        raise ValueError(f"{key}={value} is too large (the limit is {MAX_INT})")
    elif text_problem(value, key):
        raise ValueError(f"{key}: the text {text_problem(value, key)}")

DECODE_DEVICES = ("workers", "cpu", "cuda")


def _check_choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{key}={value!r} is not valid; choose one of {', '.join(map(str, choices))}")


def _check_range(key: str, value: float, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> None:
    _check_finite(key, value)
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        lo = "" if low is None else (f"> {low}" if low_open else f">= {low}")
        hi = "" if high is None else (f"< {high}" if high_open else f"<= {high}")
        bounds = " and ".join(b for b in (lo, hi) if b)
        raise ValueError(f"{key}={value!r} is out of range; it must be {bounds}")


@dataclass
class AugmentConfig:
    """Training-time augmentation (torchvision transforms.v2). Evaluation uses resize + crop only."""

    random_resized_crop: bool = False
    """Use RandomResizedCrop(image_size) instead of a plain resize for training."""
    crop_scale_min: float = 0.08
    """Smallest area fraction RandomResizedCrop may keep."""
    hflip: float = 0.0
    """Probability of a horizontal flip (0 disables; keep 0 for digits and text)."""
    rotation: float = 0.0
    """Maximum rotation in degrees, sampled uniformly in [-rotation, rotation]."""
    translate: float = 0.0
    """Maximum translation as a fraction of the image size (RandomAffine); 0 disables."""
    crop_padding: int = 0
    """Pad each side by this many pixels (reflection) and take a random image_size crop: the CIFAR shift, ~4x
    cheaper than translate; 0 disables."""
    color_jitter: float = 0.0
    """Brightness/contrast/saturation jitter strength for ColorJitter; 0 disables."""
    auto_augment: str = "none"
    """Automatic augmentation after the steps above (torchvision.transforms.v2, bilinear, per sample in the loader):
    none, randaugment, trivialaugment (TrivialAugmentWide), autoaugment (policy: autoaugment_policy) or augmix."""
    autoaugment_policy: str = "imagenet"
    """auto_augment=autoaugment: the learned policy, imagenet, cifar10 or svhn."""
    randaugment_num_ops: int = 2
    """auto_augment=randaugment: ops applied per image (timm's n, torchvision's num_ops)."""
    randaugment_magnitude: int = 9
    """auto_augment=randaugment: magnitude of every op, 0..30 (31 bins; timm's m, torchvision's magnitude)."""
    random_erasing: float = 0.0
    """Probability of erasing a random rectangle (2-33% of the area, aspect 0.3-3.3) of a training image with 0
    on the normalised tensor (the mean colour): torchvision's RandomErasing, timm's reprob with mode const; 0: off."""
    mixup_alpha: float = 0.0
    """MixUp: lambda ~ Beta(alpha, alpha) mixes each training image with its batch neighbour, targets likewise
    (soft targets); 0: off. torchvision's reference recipes use 0.2."""
    cutmix_alpha: float = 0.0
    """CutMix: lambda ~ Beta(alpha, alpha) sets the size of the box pasted from the batch neighbour, targets mixed
    by its area; 0: off (1.0 is usual)."""
    mix_prob: float = 1.0
    """Probability that a training batch is mixed at all when mixup_alpha or cutmix_alpha is on (timm's mixup prob)."""
    mix_switch_prob: float = 0.5
    """With both mixup_alpha and cutmix_alpha on: probability a mixed batch uses CutMix instead of MixUp (timm's
    switch_prob)."""

    def __post_init__(self) -> None:
        _check_range("data.augment.crop_scale_min", self.crop_scale_min, 0.0, 1.0, low_open=True)
        _check_range("data.augment.hflip", self.hflip, 0.0, 1.0)
        _check_range("data.augment.rotation", self.rotation, 0.0, 180.0)
        _check_range("data.augment.translate", self.translate, 0.0, 1.0, high_open=True)
        _check_range("data.augment.color_jitter", self.color_jitter, 0.0)
        _check_range("data.augment.crop_padding", self.crop_padding, 0)
        _check_choice("data.augment.auto_augment", self.auto_augment, AUTO_AUGMENTS)
        _check_choice("data.augment.autoaugment_policy", self.autoaugment_policy, AUTOAUGMENT_POLICIES)
        _check_range("data.augment.randaugment_num_ops", self.randaugment_num_ops, 0, 16)
        _check_range("data.augment.randaugment_magnitude", self.randaugment_magnitude, 0, 30)
        _check_range("data.augment.random_erasing", self.random_erasing, 0.0, 1.0)
        _check_range("data.augment.mixup_alpha", self.mixup_alpha, 0.0)
        _check_range("data.augment.cutmix_alpha", self.cutmix_alpha, 0.0)
        _check_range("data.augment.mix_prob", self.mix_prob, 0.0, 1.0)
        _check_range("data.augment.mix_switch_prob", self.mix_switch_prob, 0.0, 1.0)


@dataclass
class ReadConfig:
    """How shards are read (remote ones: retries, timeouts, pace, cache, endpoint; the sample cap): the fields the
    `data:` section (DataConfig) and the reader's options (`pipeline.data.io.handles.ReadOptions`) share, each
    defined once, here."""

    retries: int = 5
    """Retries of a remote shard read after a transient failure (reset, timeout, HTTP 5xx/429), in a row; 0: none."""
    timeout_s: float = 60.0
    """Seconds a remote read waits for a connection or for the next bytes before that attempt counts as failed."""
    cache_dir: str = ""
    """Folder keeping remote shards once read to their end, so later epochs read them locally (empty: no cache)."""
    cache_max_gb: float = 50.0
    """Size cap of data.cache_dir in GB; the least recently used shards are removed beyond it."""
    endpoint_url: str = ""
    """S3-compatible endpoint for s3:// shards (MinIO, Ceph, ...: http://host:9000); empty: AWS_ENDPOINT_URL or AWS."""
    prefetch_mb: float = 32.0
    """Each worker opens its next remote shard and reads up to this many MB of it while reading the current one
    (0: off)."""
    min_bytes_per_s: float = 1000.0
    """A remote read slower than this over data.slow_window_s seconds fails like a timeout (retried, counted; curl's
    --speed-limit); 0: no minimum (only data.timeout_s, an idle timeout, applies)."""
    slow_window_s: float = 60.0
    """Seconds of waiting for a connection's bytes over which data.min_bytes_per_s is measured (curl's --speed-time)."""
    max_sample_mb: float = 64.0
    """A sample whose files hold more than this many MB is skipped unread and counted as 'oversize' (never held in
    memory: a tar or .tar.gz bomb costs time, not memory); 0: no cap."""


@dataclass
class DataConfig(ReadConfig):
    """Where the WebDataset shards live and how they are read."""

    root: str = "data/digits_shards"
    """Folder holding the shards and manifest.json written by `pipeline data shards` (used when data.train is empty)."""
    train: list[str] = field(default_factory=list)
    """Training shards instead of data.root: a folder (ours, or any WebDataset shards), shard files (.tar, .tar.gz), a
    glob, a brace pattern (train-{000000..000146}.tar) or URLs (http(s)://, s3://, gs://, pipe:COMMAND); one or a
    list."""
    val: list[str] = field(default_factory=list)
    """Validation shards, given as data.train is (required when data.train is set)."""
    test: list[str] = field(default_factory=list)
    """Test shards, given as data.train is; empty with data.train set: the final evaluation uses data.val."""
    image_key: str = ""
    """Sample key of the image (jpg, png, ...); empty: the first of png, jpg, jpeg, bmp, webp, tif(f), gif, ppm."""
    label_key: str = "cls"
    """Sample key of the label: cls (an integer), txt (a class name), or json.<field>[.<field>] (an index or name);
    task.type=multilabel: a list of indices or names, regression: a number or a list of numbers (docs/tasks.md)."""
    classes: list[str] = field(default_factory=list)
    """Class names in index order, or one entry naming a text file (one name per line). Empty: our manifest's, a
    classes.txt or _info.json beside the training shards, else the labels found while indexing (0..max, or names)."""
    index_dir: str = ""
    """Where shard indexes (per-shard sample counts for exact resume) are cached; empty: ~/.cache/pipeline/index."""
    auto_prepare_digits: Optional[bool] = None
    """If `root` has no manifest, build scikit-learn's digits shards there first (the bundled demo). null: only at the
    default root data/digits_shards; true: at any local folder; false: never. A URL or pattern root is never built."""
    image_size: int = 32
    """Side length in pixels the model sees (images are resized/cropped to image_size x image_size); at most 4096, at
    least what model.name takes (simple_cnn: 2 ** len(model.channels); a torchvision model is tried at start)."""
    channels: int = 3
    """Colour channels fed to the model: 1 (grayscale) or 3 (RGB); images are converted on load."""
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    """Per-channel normalisation mean (one value per channel, or one value for all)."""
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    """Per-channel normalisation standard deviation (one value per channel, or one for all)."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0 reads in the main process)."""
    worker_timeout_s: float = 600.0
    """Seconds the run waits for a loader worker's next batch; a worker that delivers nothing for that long (stuck in
    a read, stopped) ends the run with exit 76, naming it and the shard it was reading. 0: wait for ever. The default
    outlasts the slowest read the default network settings allow (6 attempts of up to data.timeout_s=60 s, with
    backoff) and equals dist.timeout_s; raise it with data.timeout_s or data.retries, or for very slow batches."""
    worker_start: str = "forkserver"
    """How workers start: forkserver (forked from a clean single-threaded server; immune to the fork deadlocks a
    multi-threaded main process can cause, e.g. CPython < 3.11.8's gh-112275), fork (fastest start), or spawn."""
    shuffle_buffer: int = 1000
    """Samples held in each worker's shuffle buffer, shared by the shards it mixes (data.mix_shards); the buffer is
    refilled per shard."""
    mix_shards: int = 16
    """Training shards each worker reads at once, taking their samples in turn, so a batch draws from many shards
    (class-sorted shards still give mixed batches); 1: one shard after another. Costs per worker: as many open
    files or connections, the same shuffle-buffer memory, data.prefetch_mb shared (docs/data.md)."""
    drop_last: bool = False
    """Drop each worker's final partial batch (all ranks always run the same number of steps)."""
    pin_memory: bool = True
    """Pin host memory for faster host-to-GPU copies (ignored on CPU)."""
    eval_crop_pct: Optional[float] = None
    """Evaluation crop: resize the short side to floor(image_size / eval_crop_pct), then centre-crop image_size (timm's
    crop_pct; torchvision's ImageNet 256 -> 224 is 0.875). null: 0.875 with data.augment.random_resized_crop, else 1."""
    decode_device: str = "workers"
    """workers (decode + augment per image in the loader workers), or cpu / cuda: workers only read JPEG bytes and
    draw each image's augmentation parameters; the main process decodes the batch (torchvision decode_jpeg, nvJPEG
    on cuda) and crops/flips/normalises it on that device, with the same parameters."""
    jpeg_draft: bool = True
    """Decode JPEGs at 1/2, 1/4 or 1/8 size (PIL draft) when the crop still covers image_size pixels (workers)."""
    max_bad_fraction: float = 0.01
    """Stop (exit 65) when more than this fraction of an epoch's train or val samples were skipped as bad
    (undecodable, unlabelled, truncated shard; see docs/data.md "Bad data"); 0: any bad sample stops the run,
    1: never."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Training augmentation."""

    def __post_init__(self) -> None:
        if not self.root:
            raise ValueError("data.root is empty; give the folder that holds manifest.json")
        member, _, path = self.label_key.partition(".")
        if not member or (member == "json" and not path) or (path and not all(path.split("."))):
            raise ValueError(f"data.label_key={self.label_key!r} is not a sample key such as cls, txt or json.label "
                             "(json.<field>[.<field>...])")
        _check_range("data.image_size", self.image_size, 1, MAX_IMAGE_SIZE)
        _check_choice("data.channels", self.channels, (1, 3))
        _check_range("data.num_workers", self.num_workers, 0)
        _check_range("data.worker_timeout_s", self.worker_timeout_s, 0.0)
        _check_range("data.shuffle_buffer", self.shuffle_buffer, 1)
        _check_range("data.mix_shards", self.mix_shards, 1)
        _check_choice("data.decode_device", self.decode_device, DECODE_DEVICES)
        _check_choice("data.worker_start", self.worker_start, tuple(multiprocessing.get_all_start_methods()))
        _check_range("data.max_bad_fraction", self.max_bad_fraction, 0.0, 1.0)
        _check_range("data.retries", self.retries, 0)
        _check_range("data.timeout_s", self.timeout_s, 0.0, low_open=True)
        _check_range("data.cache_max_gb", self.cache_max_gb, 0.0, low_open=True)
        _check_range("data.prefetch_mb", self.prefetch_mb, 0.0)
        _check_range("data.min_bytes_per_s", self.min_bytes_per_s, 0.0)
        _check_range("data.slow_window_s", self.slow_window_s, 0.0, low_open=True)
        _check_range("data.max_sample_mb", self.max_sample_mb, 0.0)
        if self.eval_crop_pct is not None:
            _check_range("data.eval_crop_pct", self.eval_crop_pct, 0.0, 1.0, low_open=True)
        if self.endpoint_url and not self.endpoint_url.startswith(("http://", "https://")):
            raise ValueError(f"data.endpoint_url={self.endpoint_url!r} must start with http:// or https://")
        for key, values in (("data.mean", self.mean), ("data.std", self.std)):
            if len(values) not in (1, self.channels):
                raise ValueError(f"{key} has {len(values)} values; give 1 or data.channels={self.channels}")
        if any(not math.isfinite(v) for v in [*self.mean, *self.std]):
            raise ValueError(f"data.mean={list(self.mean)} and data.std={list(self.std)} must be finite numbers")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"data.std={list(self.std)} must be positive")


@dataclass
class ModelConfig:
    """Which network to build."""

    name: str = "simple_cnn"
    """`simple_cnn`, any torchvision classification model name (e.g. resnet18, resnet50), or timm/<name> for any of
    timm's models (e.g. timm/resnet50, timm/efficientnet_b0, timm/convnext_nano; a pretrained tag may follow:
    timm/resnet18.a1_in1k), built with pretrained=False (weights come through finetune.weights)."""
    channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    """simple_cnn: output channels of each conv-BN-ReLU-pool block."""
    residual: bool = False
    """simple_cnn: add a residual conv-BN-ReLU pair inside each block."""
    dropout: float = 0.0
    """Dropout probability before the classifier head."""
    small_input_stem: bool = False
    """ResNet-style torchvision models: a 3x3 stride-1 first convolution and no max-pool (the CIFAR stem: keeps a
    32 px image's detail); pretrained weights still load, the new first convolution is reported as initialised."""
    channels_last: bool = False
    """Store activations as NHWC (channels_last); faster on GPUs with tensor cores."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    drop_path: Optional[float] = None
    """Stochastic depth: the largest probability of skipping a residual branch, rising linearly with depth. Taken by
    simple_cnn with model.residual=true, by torchvision's stochastic_depth_prob families (efficientnet_*,
    efficientnet_v2_*, convnext_*, swin_*, swin_v2_*, maxvit_t) and by timm models whose constructor takes
    drop_path_rate (resnet*, resnext*, efficientnet*, mobilenetv3_*, convnext*, regnet*, ...; not vgg*, densenet*);
    null: the model's own default (0 for simple_cnn and timm)."""
    sync_bn: bool = False
    """Several ranks: BatchNorm statistics over the global batch (SyncBatchNorm; CPU ranks: all-reduces over gloo)."""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("model.name is empty; use simple_cnn, a torchvision model name or timm/<name>")
        if self.name == "timm/":
            raise ValueError("model.name='timm/' names no model; use timm/<name>, e.g. timm/resnet18")
        if not self.channels or any(c <= 0 for c in self.channels):
            raise ValueError(f"model.channels={list(self.channels)} must be a non-empty list of positive ints")
        _check_range("model.dropout", self.dropout, 0.0, 1.0, high_open=True)
        if self.drop_path is not None:
            _check_range("model.drop_path", self.drop_path, 0.0, 1.0, high_open=True)


@dataclass
class OptimConfig:
    """Optimizer and loss."""

    name: str = "adamw"
    """One of sgd, adam, adamw, rmsprop."""
    lr: float = 1e-3
    """Peak learning rate (per optimizer step, after accumulation)."""
    weight_decay: float = 0.0
    """Decoupled (AdamW) or L2 weight decay."""
    l1: float = 0.0
    """L1 penalty: l1 x sum(abs(w)) is added to the training loss (gradient l1 x sign(w)), over the weights that get
    weight decay (norm weights and biases are left out when optim.exclude_norm_and_bias); 0: off."""
    exclude_norm_and_bias: bool = True
    """Apply no weight decay to normalisation weights and biases."""
    momentum: float = 0.9
    """Momentum for sgd and rmsprop."""
    nesterov: bool = False
    """Nesterov momentum for sgd."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam/AdamW betas."""
    loss: str = "cross_entropy"
    """task.type=classification: cross_entropy, or bce (sigmoid per class on one-hot targets). multilabel always uses
    BCE-with-logits and regression task.loss: both leave this key (and label_smoothing) aside."""
    label_smoothing: float = 0.0
    """Label smoothing for cross_entropy (also of MixUp/CutMix's soft targets); not applied with bce or multilabel."""
    class_weights: Optional[list[float]] = None
    """Per-class loss weights (one per class), or null for none; task.type=multilabel: BCE's pos_weight per class."""

    def __post_init__(self) -> None:
        _check_choice("optim.name", self.name, OPTIMIZERS)
        _check_range("optim.lr", self.lr, 0.0, low_open=True)
        _check_range("optim.weight_decay", self.weight_decay, 0.0)
        _check_range("optim.l1", self.l1, 0.0)
        _check_range("optim.momentum", self.momentum, 0.0, 1.0, high_open=True)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):  # NaN fails this too
            raise ValueError(f"optim.betas={list(self.betas)} must be two numbers in [0, 1)")
        _check_choice("optim.loss", self.loss, LOSSES)
        _check_range("optim.label_smoothing", self.label_smoothing, 0.0, 1.0, high_open=True)
        if self.class_weights is not None and any(not w >= 0 or math.isinf(w) for w in self.class_weights):
            raise ValueError(f"optim.class_weights={list(self.class_weights)} must be finite and non-negative")


@dataclass
class SchedulerConfig:
    """Learning-rate schedule."""

    name: str = "cosine"
    """cosine (linear warmup then cosine, per optimizer step), plateau, step, or constant."""
    warmup_steps: int = 0
    """cosine/constant: optimizer steps of linear warmup from 0 to optim.lr."""
    warmup_epochs: float = 0.0
    """cosine/constant: warmup length in epochs (added to warmup_steps)."""
    min_lr_ratio: float = 0.0
    """cosine: final learning rate as a fraction of optim.lr."""
    step_size: int = 10
    """step: epochs between decays."""
    gamma: float = 0.1
    """step/plateau: multiplicative decay factor."""
    patience: int = 3
    """plateau: epochs without improvement of train.monitor before decaying."""

    def __post_init__(self) -> None:
        _check_choice("scheduler.name", self.name, SCHEDULERS)
        _check_range("scheduler.warmup_steps", self.warmup_steps, 0)
        _check_range("scheduler.warmup_epochs", self.warmup_epochs, 0.0)
        _check_range("scheduler.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        _check_range("scheduler.step_size", self.step_size, 1)
        _check_range("scheduler.gamma", self.gamma, 0.0, 1.0, low_open=True)
        _check_range("scheduler.patience", self.patience, 0)


@dataclass
class TrainConfig:
    """The training loop."""

    epochs: int = 30
    """Number of passes over the training split."""
    batch_size: int = 64
    """Samples per rank per micro-batch (global batch = batch_size x ranks x grad_accum_steps)."""
    eval_batch_size: int = 256
    """Samples per rank per evaluation batch."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    max_grad_norm: float = 0.0
    """Clip gradients to this global L2 norm; 0 disables clipping."""
    precision: str = "auto"
    """auto (accelerate launch's mixed_precision when launched with one, else fp32), fp32, bf16 (autocast) or fp16
    (autocast + GradScaler, GPU only). An explicit value wins over accelerate's; one line says so when they differ."""
    seed: int = 0
    """Seed for Python, NumPy, torch and the data order."""
    monitor: str = "val/accuracy"
    """Metric that picks the best checkpoint, drives early stopping and plateau decay. classification: val/accuracy,
    val/loss, val/f1_macro, val/auroc; multilabel: val/map_macro, val/loss, val/f1_micro, val/f1_macro,
    val/exact_match, val/hamming_loss; regression: val/mae, val/loss, val/rmse, val/r2. The default val/accuracy means
    val/map_macro (max) for task.type=multilabel and val/mae (min) for regression."""
    monitor_mode: str = "max"
    """max if a larger monitor value is better, else min (set for you with the task's default monitor)."""
    early_stopping_patience: int = 0
    """Stop after this many epochs without improvement (0 disables); best weights are restored."""
    early_stopping_min_delta: float = 0.0
    """Smallest change of the monitor that counts as an improvement."""
    log_every_steps: int = 20
    """Optimizer steps between progress/loss updates (the only host syncs in the loop)."""
    cpu: bool = False
    """Force the CPU even when a GPU is present."""
    nonfinite: str = "skip"
    """A NaN/inf loss or gradient: skip (drop that update, count it, warn), halt (write nonfinite.json, exit 70),
    or ignore (no check: saves the one host sync per optimizer step the check costs; NaNs reach the weights)."""
    max_nonfinite_steps: int = 10
    """skip: stop (exit 70) after this many non-finite optimizer steps in a row."""
    cudnn_benchmark: bool = True
    """GPU: let cuDNN time its convolution algorithms for the input shapes once (faster for fixed image sizes)."""
    ema_decay: float = 0.0
    """Exponential moving average of the weights (timm's ModelEmaV3), e.g. 0.999; 0 disables. When on, the EMA copy is
    what validation, the best checkpoint, the test metrics, evaluate, predict and export use."""
    ema_warmup: bool = False
    """timm's EMA decay warm-up: the decay after optimizer step t is min(ema_decay, 1 - t^(-2/3)), so the early
    weights fade fast; either way the first update (t = 1) copies the weights."""
    ema_every_steps: int = 1
    """Optimizer steps between EMA updates (each update applies the decay once, as timm's update(model, step))."""
    ema_buffers: str = "average"
    """BatchNorm running statistics and other float buffers of the EMA copy: average (timm ModelEmaV3's default) or
    copy (taken from the trained model at each update: timm's exclude_buffers=True)."""
    cpu_threads: str = "auto"
    """torch's intra-op threads in each training process: auto (OMP_NUM_THREADS when set, else this node's usable
    cores / ranks on it - data.num_workers, at least 1, so the loader's workers and the main process never
    oversubscribe the cores) or a number."""

    def __post_init__(self) -> None:
        if self.cpu_threads != "auto" and not (str(self.cpu_threads).isdigit() and int(self.cpu_threads) >= 1):
            raise ValueError(f"train.cpu_threads={self.cpu_threads!r} is not valid; give auto or a whole number >= 1")
        _check_range("train.epochs", self.epochs, 1)
        _check_range("train.batch_size", self.batch_size, 1)
        _check_range("train.eval_batch_size", self.eval_batch_size, 1)
        _check_range("train.grad_accum_steps", self.grad_accum_steps, 1)
        _check_range("train.max_grad_norm", self.max_grad_norm, 0.0)
        _check_choice("train.precision", self.precision, PRECISIONS)
        every = tuple(dict.fromkeys(m for monitors in TASK_MONITORS.values() for m in monitors))
        _check_choice("train.monitor", self.monitor, every)  # which fit task.type: Config.__post_init__
        _check_choice("train.monitor_mode", self.monitor_mode, MODES)
        _check_range("train.early_stopping_patience", self.early_stopping_patience, 0)
        _check_range("train.early_stopping_min_delta", self.early_stopping_min_delta, 0.0)
        _check_range("train.log_every_steps", self.log_every_steps, 1)
        _check_range("train.seed", self.seed, 0, MAX_SEED)
        _check_choice("train.nonfinite", self.nonfinite, NONFINITE_POLICIES)
        _check_range("train.max_nonfinite_steps", self.max_nonfinite_steps, 1)
        _check_range("train.ema_decay", self.ema_decay, 0.0, 1.0, high_open=True)
        _check_range("train.ema_every_steps", self.ema_every_steps, 1)
        _check_choice("train.ema_buffers", self.ema_buffers, EMA_BUFFERS)


@dataclass
class CheckpointConfig:
    """Checkpoints under <run folder>/checkpoints/: step-NNNNNNNN folders, `last` (link) and `best`."""

    resume: str = "auto"
    """auto (continue from the newest complete checkpoint; refused when the folder holds an earlier run but no intact
    checkpoint), never (start from scratch; an earlier run's files are moved to <run>/earlier/<UTC time>/), or a
    checkpoint folder path."""
    every_steps: int = 0
    """Also checkpoint every N optimizer steps, mid-epoch (0: only at epoch ends)."""
    every_minutes: float = 0.0
    """Also checkpoint when this many minutes passed since the last save (0 disables)."""
    keep_last: int = 2
    """Step checkpoints kept; older ones are pruned only after a newer one is complete."""
    save_last: bool = True
    """Write a step checkpoint at the end of every epoch (what resume=auto continues from)."""
    save_best: bool = True
    """Write checkpoints/best whenever train.monitor improves."""
    signals: list[str] = field(default_factory=lambda: ["SIGUSR1", "SIGTERM"])
    """Signals that make every rank finish the current step, checkpoint, and exit with code 75."""
    resume_changes: str = "refuse"
    """refuse: a resume whose config differs from its checkpoint's in a key that changes the weights or their
    trajectory (model, data, batch, optimizer, schedule, precision, seed...), or whose data differs (its data.json:
    classes, shard fingerprint), stops with exit 2; allow: resume anyway (recorded in config_history.jsonl), except
    onto another number of classes. Logging, reporting and checkpoint cadence may always change."""
    check_every_steps: int = 1
    """Optimizer steps between the ranks' agreement on stop signals and time-based saves (one all-reduce of CPU
    flags over a gloo group: it does not wait for the GPU)."""

    def __post_init__(self) -> None:
        if not self.resume:
            raise ValueError("checkpoint.resume is empty; use auto, never, or a checkpoint folder")
        _check_range("checkpoint.every_steps", self.every_steps, 0)
        _check_range("checkpoint.every_minutes", self.every_minutes, 0.0)
        _check_range("checkpoint.keep_last", self.keep_last, 1)
        _check_range("checkpoint.check_every_steps", self.check_every_steps, 1)
        _check_choice("checkpoint.resume_changes", self.resume_changes, ("refuse", "allow"))
        for name in self.signals:
            _check_choice("checkpoint.signals[]", name, SIGNAL_NAMES)


@dataclass
class LoggingConfig:
    """Console, metrics.jsonl and Weights & Biases."""

    wandb_mode: str = "offline"
    """offline (default; sync later with `wandb sync`), online, or disabled."""
    wandb_project: str = "pipeline"
    """W&B project name."""
    wandb_entity: Optional[str] = None
    """W&B entity (team or user); null uses your default."""
    progress: bool = True
    """Show rich progress bars (main process only)."""
    training_signals: bool = True
    """Add gradient/weight norms, lr per param group, non-finite step fraction and images/s to metrics.jsonl."""
    wandb_base_url: Optional[str] = None
    """online: the W&B server (e.g. https://wandb.example.com); null: $WANDB_BASE_URL, else https://api.wandb.ai."""
    wandb_init_timeout: float = 60.0
    """online: seconds for the server to answer (probed before wandb.init) and the run to start; else offline."""
    wandb_finish_timeout: float = 600.0
    """online: seconds the end of the run may spend uploading; the rest stays on disk for `wandb sync` (0: wait)."""
    tensorboard: bool = False
    """Also write TensorBoard event files under <run folder>/tensorboard (needs pip install -e ".[tensorboard]")."""

    def __post_init__(self) -> None:
        _check_choice("logging.wandb_mode", self.wandb_mode, WANDB_MODES)
        _check_range("logging.wandb_init_timeout", self.wandb_init_timeout, 0.0, low_open=True)
        _check_range("logging.wandb_finish_timeout", self.wandb_finish_timeout, 0.0)


@dataclass
class RunConfig:
    """Where the run folder goes: <output_dir>/<name>/."""

    output_dir: str = "runs"
    """Parent folder of run folders."""
    name: str = "digits"
    """Run folder name (and W&B run name)."""

    def __post_init__(self) -> None:
        if (not self.name or "/" in self.name or self.name in (".", "..") or len(self.name.encode()) > 255
                or any(ord(c) < 32 for c in self.name)):
            raise ValueError(f"run.name={self.name!r} must be a folder name: not empty, '.' or '..', without '/' or "
                             "control characters, at most 255 bytes")
        if not self.output_dir:
            raise ValueError("run.output_dir is empty; give a folder for run folders")


@dataclass
class FinetuneConfig:
    """Fine-tuning: pretrained weights, freezing strategy, discriminative learning rates."""

    weights: str = ""
    """Pretrained weights: a torchvision weights name (e.g. ResNet18_Weights.IMAGENET1K_V1, read from the local
    torch hub cache), hf-hub:<org>/<name> (e.g. hf-hub:timm/resnet18.a1_in1k, read from the local Hugging Face cache:
    $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub), a Hugging Face cache folder (models--org--name
    or one of its snapshots), a .pth/.pt/.bin/.safetensors state dict, or a run/checkpoint folder of ours; empty:
    random init. Nothing is downloaded."""
    load_head: bool = False
    """Also load the pretrained classifier head if its shape fits (normally a new head learns the new classes)."""
    match_input: bool = True
    """With a torchvision weights name, take data.mean/std/image_size from the weights' own preprocessing; with a timm
    model and weights other than a run folder of ours, data.mean/std/image_size and data.eval_crop_pct from its
    pretrained config (a hub folder's config.json, else timm's for model.name)."""
    freeze: str = "full"
    """full (train all), feature_extraction (only the head), partial (finetune.trainable), or gradual."""
    trainable: list[str] = field(default_factory=list)
    """partial: the module groups left trainable, e.g. [layer4, fc]."""
    groups: list[str] = field(default_factory=list)
    """Module groups ordered input -> output (name prefixes) for gradual unfreezing and layer-wise decay;
    empty: automatic (timm models: the stages of timm's coarse group_matcher, e.g. stem, layer1..layer4, head;
    others: top-level children, `features` split per block). Uncovered parameters join the first group."""
    unfreeze_every: int = 1
    """gradual: epochs between unfreezing one more group (the head first, then the groups nearest to it)."""
    frozen_bn_eval: bool = True
    """Keep BatchNorm layers of frozen groups in eval mode, so their running statistics stay pretrained."""
    lr_mult: dict[str, float] = field(default_factory=dict)
    """Learning-rate multipliers per group name or fnmatch pattern, e.g. {layer4: 0.1, 'layer[1-3]': 0.01}."""
    layer_decay: float = 1.0
    """Layer-wise LR decay: the group k places before the head gets lr x layer_decay**k (1 disables)."""

    def __post_init__(self) -> None:
        _check_choice("finetune.freeze", self.freeze, FREEZE_STRATEGIES)
        if self.freeze == "partial" and not self.trainable:
            raise ValueError("finetune.freeze=partial needs finetune.trainable, e.g. [layer4, fc]")
        _check_range("finetune.unfreeze_every", self.unfreeze_every, 1)
        _check_range("finetune.layer_decay", self.layer_decay, 0.0, 1.0, low_open=True)
        for pattern, mult in self.lr_mult.items():
            if not 0 <= mult < math.inf:
                raise ValueError(f"finetune.lr_mult.{pattern}={mult} must be a finite number >= 0")


@dataclass
class ImbalanceConfig:
    """Class imbalance: weighted loss and class-balanced sampling."""

    class_weights: str = "none"
    """none, or auto: cross-entropy weights n / (classes x count) from the manifest's training counts."""
    balanced_sampling: bool = False
    """Resample each training shard with replacement so every class is drawn equally often (same epoch length); each
    worker then reads one shard at a time (data.mix_shards does not apply)."""

    def __post_init__(self) -> None:
        _check_choice("imbalance.class_weights", self.class_weights, CLASS_WEIGHT_MODES)


@dataclass
class DistConfig:
    """Several ranks: how long they wait for one another before a wait is an error (exit 76, one line)."""

    timeout_s: float = 600.0
    """Seconds a collective (gradient all-reduce, barrier, agreement on a stop) may wait for the other ranks; the
    longest legitimate wait is rank 0 writing a checkpoint or report while the others wait (torch's default: 1800)."""
    init_timeout_s: float = 120.0
    """Seconds for every rank to join the process group at start (a rank that never started, a port still held by
    an earlier run) before the run stops with one line."""

    def __post_init__(self) -> None:
        _check_range("dist.timeout_s", self.timeout_s, 0.0, low_open=True)
        _check_range("dist.init_timeout_s", self.init_timeout_s, 0.0, low_open=True)


@dataclass
class EvalConfig:
    """How the final test, `pipeline evaluate` and `pipeline predict` run the model (validation is always plain)."""

    tta: str = "none"
    """Test-time augmentation, logits averaged: none, flip (the image and its mirror, 1/2 each), or flip_shift (as
    airbench: 1/2 flip of the image, 1/4 flip of it shifted one pixel up-left, 1/4 down-right; reflection padding)."""

    def __post_init__(self) -> None:
        _check_choice("eval.tta", self.tta, TTA_MODES)


@dataclass
class TaskConfig:
    """What the model predicts per image: one class, a set of classes, or numbers (docs/tasks.md)."""

    type: str = "classification"
    """classification (one class per image: softmax), multilabel (any set of the classes: a sigmoid per class,
    BCE-with-logits; labels are lists of class indices or names under data.label_key=json.<field>) or regression
    (numbers: task.num_outputs values per image under data.label_key=json.<field>, a number or a list of numbers)."""
    threshold: str = "0.5"
    """multilabel: the probability at or above which a class is predicted: one number for every class, or tune (per
    class, the threshold of the best F1 on the validation split with the best weights; stored in <run>/task.json, used
    by the test, evaluate, predict and export). Validation during training uses 0.5 when tuning."""
    num_outputs: int = 0
    """regression: values per image; 0: the length of the labels found while indexing the training shards."""
    loss: str = "mse"
    """regression: mse, huber (delta task.huber_delta) or l1, on targets standardised with the training split's mean
    and std per output (outputs are un-standardised everywhere they are shown)."""
    huber_delta: float = 1.0
    """regression, loss=huber: where the loss turns from quadratic to linear, in standard deviations of the target."""
    standardize: bool = True
    """regression: standardise targets with the training split's mean/std (from the shard index) for the loss."""

    def __post_init__(self) -> None:
        _check_choice("task.type", self.type, TASK_TYPES)
        if self.threshold != "tune":
            try:
                value = float(self.threshold)
            except ValueError:
                value = math.nan
            if not 0.0 < value < 1.0:
                raise ValueError(f"task.threshold={self.threshold!r} is not valid; give a probability in (0, 1) "
                                 "or tune")
        _check_range("task.num_outputs", self.num_outputs, 0, 4096)
        _check_choice("task.loss", self.loss, REGRESSION_LOSSES)
        _check_range("task.huber_delta", self.huber_delta, 0.0, low_open=True)


def _task_monitor(cfg: "Config") -> None:
    """train.monitor must be a metric of task.type; its default (val/accuracy) becomes the task's own."""
    kind = cfg.task.type
    monitors = TASK_MONITORS[kind]
    if cfg.train.monitor == "val/accuracy" and kind != "classification":
        cfg.train.monitor = monitors[0]
        cfg.train.monitor_mode = MONITOR_MODES.get(monitors[0], "max")
    elif cfg.train.monitor not in monitors:
        raise ValueError(f"train.monitor={cfg.train.monitor!r} is not a metric of task.type={kind}; choose one of "
                         f"{', '.join(monitors)}")


def _check_task(cfg: "Config") -> None:
    """Combinations task.type does not allow (one line each), and the task's default monitor."""
    kind, aug = cfg.task.type, cfg.data.augment
    _task_monitor(cfg)
    if kind == "classification":
        return
    mixes = aug.mixup_alpha > 0 or aug.cutmix_alpha > 0
    if kind == "regression" and mixes:
        raise ValueError("data.augment.mixup_alpha/cutmix_alpha mix labels; a mixed image has no regression target: "
                         "set both to 0 with task.type=regression")
    if cfg.imbalance.balanced_sampling:
        raise ValueError(f"imbalance.balanced_sampling draws by a sample's one class; task.type={kind} has none: "
                         "set it to false")
    if kind == "regression" and (cfg.imbalance.class_weights != "none" or cfg.optim.class_weights is not None):
        raise ValueError("class weights (optim.class_weights, imbalance.class_weights) weigh classes; "
                         "task.type=regression has none")


# ---- the commands' settings: `cv:` and `report:` (sections of a run's config) and `tune:` (its own file section,
# see pipeline.commands.tune.config); kept together, below the core's sections -------------------------------------
@dataclass
class ReportConfig:
    """The run report (`pipeline report RUN_DIR`): one self-contained report.html in the run folder."""

    enabled: bool = False
    """Write <run folder>/report.html at the end of training (and log its images to W&B when logging is on)."""
    gradcam_examples: int = 6
    """Grad-CAM overlays shown for correctly and for wrongly classified test images (each)."""
    feature_map_layers: list[str] = field(default_factory=list)
    """Layer names (as in model.named_modules()) whose feature maps are shown; empty: first and last conv."""
    feature_map_channels: int = 16
    """Channels shown per feature-map grid."""
    sample_images: int = 2
    """Test images whose feature maps are shown."""

    def __post_init__(self) -> None:
        _check_range("report.gradcam_examples", self.gradcam_examples, 0)
        _check_range("report.feature_map_channels", self.feature_map_channels, 1)
        _check_range("report.sample_images", self.sample_images, 0)


@dataclass
class CVConfig:
    """k-fold cross-validation (`pipeline cv`): stratified folds over train+val; the test split is kept."""

    folds: int = 5
    """Number of folds K."""
    fold: int = -1
    """Run only this fold (0-based; one SLURM array task each); -1 runs every fold."""
    seed: int = 0
    """Seed of the stratified fold assignment."""
    data_dir: str = ""
    """Where per-fold shards are written; empty: <data.root>_cv<K> (with data.train set: <run.name>_cv<K>/data)."""

    def __post_init__(self) -> None:
        _check_range("cv.folds", self.folds, 2)
        _check_range("cv.seed", self.seed, 0, MAX_SEED)
        _check_range("cv.fold", self.fold, -1)
        if self.fold >= self.folds:
            raise ValueError(f"cv.fold={self.fold} must be < cv.folds={self.folds} (or -1 for all folds)")


SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "hyperband", "none")
DIRECTIONS = ("maximize", "minimize")
STORAGE_ENV = "PIPELINE_TUNE_STORAGE"


@dataclass
class TuneConfig:
    """An Optuna study: where it lives, how it samples and prunes, its budget and its search space."""

    study_name: str = "study"
    """Study name; also the study folder <output_dir>/<study_name>/ and the name inside the database."""
    output_dir: str = "runs/tune"
    """Parent folder of study folders (trial run folders go to <study folder>/trials/)."""
    storage: Optional[str] = None
    """Database URL (sqlite:///..., postgresql://user@host/db); null: $PIPELINE_TUNE_STORAGE if set,
    else an SQLite file study.db in the study folder. Passwords are never printed or saved."""
    base_config: Optional[str] = None
    """YAML loaded first as the base config (the tuning file's own sections go on top); null: none."""
    sampler: str = "tpe"
    """tpe (Bayesian, default), random, or grid (every param needs `choices` or a `step`)."""
    pruner: str = "median"
    """median, hyperband, or none: stops trials whose per-epoch metric is poor."""
    n_trials: Optional[int] = 20
    """Trials the whole study should have (all workers together; failed ones are not counted);
    null: no count limit (timeout_s, or an exhausted grid, ends the study)."""
    timeout_s: Optional[float] = None
    """Seconds after which this worker starts no new trial (a running trial is finished); null: none."""
    metric: str = "val/accuracy"
    """Epoch-record key to optimise (reported every epoch for pruning); a trial's value is its best epoch."""
    direction: str = "maximize"
    """maximize or minimize `metric`."""
    seed: int = 0
    """Sampler seed; worker_index and the study's trial count at start are mixed in, so parallel or
    restarted workers do not draw the same points."""
    worker_index: int = 0
    """This worker's index among parallel workers (slurm/tune.sbatch passes the array task id)."""
    sampler_startup_trials: int = 5
    """tpe: random trials before the Bayesian model takes over."""
    pruner_startup_trials: int = 3
    """median: completed trials before any trial may be pruned."""
    pruner_warmup_epochs: int = 1
    """median: epochs every trial completes before it may be pruned (0: pruning from epoch 1 on);
    hyperband: its minimum resource (at least 1 epoch)."""
    heartbeat_s: int = 30
    """Seconds between a running trial's heartbeats in the database."""
    grace_s: int = 120
    """A running trial without a heartbeat for this long is marked failed (its worker died) and retried."""
    max_retries: int = 1
    """How often a trial whose worker died is retried with the same parameters (0: never)."""
    max_consecutive_failures: int = 3
    """Stop this worker after this many failed trials in a row (e.g. a space that gives invalid configs)."""
    space: dict[str, Any] = field(default_factory=dict)
    """Search space: config key -> {type: float|int|categorical, low, high, log, step, choices, when}."""

    def __post_init__(self) -> None:
        if not self.study_name or "/" in self.study_name:
            raise ValueError(f"tune.study_name={self.study_name!r} must be a non-empty name without '/'")
        for key, value, choices in (("tune.sampler", self.sampler, SAMPLERS), ("tune.pruner", self.pruner, PRUNERS),
                                    ("tune.direction", self.direction, DIRECTIONS)):
            if value not in choices:
                raise ValueError(f"{key}={value!r} is not valid; choose one of {', '.join(choices)}")
        if self.n_trials is not None and self.n_trials < 0:
            raise ValueError(f"tune.n_trials={self.n_trials} must be >= 0 (or null for no count limit)")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ValueError(f"tune.timeout_s={self.timeout_s} must be > 0 (or null for no time limit)")
        if self.n_trials is None and self.timeout_s is None and self.sampler != "grid":
            raise ValueError("tune.n_trials and tune.timeout_s are both null; set at least one budget")
        if "/" not in self.metric:
            raise ValueError(f"tune.metric={self.metric!r} must be an epoch-record key such as val/accuracy")
        for key in ("worker_index", "sampler_startup_trials", "pruner_startup_trials", "pruner_warmup_epochs",
                    "max_retries"):
            if getattr(self, key) < 0:
                raise ValueError(f"tune.{key}={getattr(self, key)} must be >= 0")
        for key in ("heartbeat_s", "grace_s", "max_consecutive_failures"):
            if getattr(self, key) < 1:
                raise ValueError(f"tune.{key}={getattr(self, key)} must be >= 1")
        if self.grace_s <= self.heartbeat_s:
            raise ValueError(f"tune.grace_s={self.grace_s} must be larger than tune.heartbeat_s={self.heartbeat_s}")
        if not self.space:
            raise ValueError("tune.space is empty; give at least one config key to search, "
                             "e.g. tune.space: {optim.lr: {type: float, low: 1e-4, high: 1e-1, log: true}}")

    @property
    def study_dir(self) -> Path:
        return Path(self.output_dir) / self.study_name

    def storage_url(self) -> str:
        """The database URL this study uses (see `storage`)."""
        if self.storage:
            return self.storage
        if os.environ.get(STORAGE_ENV):
            return os.environ[STORAGE_ENV]
        return f"sqlite:///{(self.study_dir / 'study.db').resolve()}"


@dataclass
class Config:
    """The whole run. Merge order: these defaults <- YAML file <- command-line dotted overrides."""

    data: DataConfig = field(default_factory=DataConfig)
    """Data: shards, transforms, loader."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model: architecture and its switches."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and loss."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """Learning-rate schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training loop."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing and resume."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Logging."""
    run: RunConfig = field(default_factory=RunConfig)
    """Run folder."""
    report: ReportConfig = field(default_factory=ReportConfig)
    """Run report (report.html)."""
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    """Fine-tuning: pretrained weights, freezing, discriminative learning rates."""
    imbalance: ImbalanceConfig = field(default_factory=ImbalanceConfig)
    """Class imbalance handling."""
    cv: CVConfig = field(default_factory=CVConfig)
    """k-fold cross-validation."""
    dist: DistConfig = field(default_factory=DistConfig)
    """Several ranks: timeouts."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Final evaluation: test-time augmentation."""
    task: TaskConfig = field(default_factory=TaskConfig)
    """What is predicted: classification, multilabel or regression."""

    def __post_init__(self) -> None:
        _check_values("", self)
        if self.model.name == "simple_cnn":  # each block halves the image: its last pooling needs 2 x 2 pixels
            smallest = 2 ** len(self.model.channels)
            if not smallest <= self.data.image_size <= MAX_IMAGE_SIZE:
                raise ValueError(f"data.image_size={self.data.image_size} is out of range for model.name=simple_cnn "
                                 f"with {len(self.model.channels)} blocks (model.channels, each halves the image); it "
                                 f"must be >= {smallest} and <= {MAX_IMAGE_SIZE}")
        if self.train.precision == "fp16" and self.train.cpu:
            raise ValueError("train.precision=fp16 needs a GPU; use bf16 or fp32 with train.cpu=true")
        if self.imbalance.class_weights == "auto" and self.optim.class_weights is not None:
            raise ValueError("set either optim.class_weights (explicit) or imbalance.class_weights=auto, not both")
        _check_task(self)
