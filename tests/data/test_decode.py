"""Where images are decoded: in the workers (PIL draft / torchvision) or batched in the main process
(`data.decode_device`), with the same per-sample augmentation parameters, counts and order."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from pipeline.config import load_config
from pipeline.data import Manifest, build_loader
from pipeline.data.samples.transforms import BatchNormalize, SampleAugment, build_transform
from pipeline.data.writer.digits import write_digits_jpeg_imagefolder
from pipeline.data.writer.shards import write_shards

AUGMENT = ["data.augment.random_resized_crop=true", "data.augment.hflip=0.5", "data.augment.color_jitter=0.2"]


@pytest.fixture(scope="module")
def jpeg_root(tmp_path_factory) -> Path:
    """90 colour JPEGs (40-50 px) in training shards of 32, plus 20 validation images."""
    folder = tmp_path_factory.mktemp("jpegs")
    write_digits_jpeg_imagefolder(folder, 110, size=40)
    root = folder.parent / (folder.name + "_shards")
    write_shards(folder, root, fractions=(0.8, 0.2, 0.0), max_samples=32, show_progress=False)
    return root


@pytest.fixture(scope="module")
def broken_root(tmp_path_factory) -> Path:
    """48 training and 16 validation JPEGs in shards of 16; training samples 5, 6 and 30 and validation
    sample 3 are cut in half: their headers read, their data does not decode."""
    from pipeline.data.writer.subsets import write_split_shards

    folder = tmp_path_factory.mktemp("broken_jpegs")
    write_digits_jpeg_imagefolder(folder, 64, size=40)
    files = sorted(folder.rglob("*.jpg"), key=lambda f: f.stem)
    samples = [({"jpg": f.read_bytes()}, int(f.parent.name)) for f in files]
    for index in (5, 6, 30, 48 + 3):
        data = samples[index][0]["jpg"]
        samples[index] = ({"jpg": data[:len(data) // 2]}, samples[index][1])
    root = folder.parent / (folder.name + "_shards")
    write_split_shards(root, [str(c) for c in range(10)], {"train": samples[:48], "val": samples[48:],
                                                           "test": samples[48:]}, "test", max_samples=16)
    return root


def _cfg(root: Path, *overrides: str):
    return load_config(None, [f"data.root={root}", "data.image_size=24", "train.batch_size=16",
                              "train.eval_batch_size=16", *AUGMENT, *overrides])


def _epoch(cfg, split: str = "train", epoch: int = 1, step: int = 0) -> tuple[list, int]:
    data = build_loader(cfg, Manifest.read(cfg.data.root), split, 0, 1, train=split == "train")
    data.set_position(epoch, step)
    return [(images.clone(), labels.clone()) for images, labels in data.loader], data.stream.steps_per_epoch()


@pytest.mark.parametrize("workers", [0, 2])
def test_batched_decode_matches_worker_decode(jpeg_root: Path, workers: int) -> None:
    base = [f"data.num_workers={workers}", "data.jpeg_draft=false"]
    for split in ("train", "val"):
        in_workers, steps = _epoch(_cfg(jpeg_root, *base), split)
        batched, _ = _epoch(_cfg(jpeg_root, *base, "data.decode_device=cpu"), split)
        assert len(in_workers) == len(batched) == steps > 1
        expected = 88 if split == "train" else 22  # training drops len % (slots) samples; evaluation keeps all
        assert sum(len(labels) for _, labels in batched) == expected - (expected % max(1, workers) if split ==
                                                                        "train" else 0)
        for (a, la), (b, lb) in zip(in_workers, batched):
            assert torch.equal(la, lb)  # same samples in the same order
            assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape == (len(la), 3, 24, 24)
            # Same crops, flips and jitter from the same seeds; both decode with libjpeg-turbo: same bits.
            assert torch.equal(a, b)


@pytest.mark.parametrize("auto_augment", ["randaugment", "trivialaugment", "autoaugment", "augmix"])
def test_batched_decode_matches_worker_decode_with_auto_augment(jpeg_root: Path, auto_augment: str) -> None:
    """The auto-augment ops and magnitudes are drawn from each sample's seed where the sample is read and applied
    where it is decoded: the same bits in both paths (random erasing and mixing come later, on the batch)."""
    base = ["data.num_workers=0", "data.jpeg_draft=false", f"data.augment.auto_augment={auto_augment}",
            "data.augment.randaugment_magnitude=15"]
    in_workers, steps = _epoch(_cfg(jpeg_root, *base))
    batched, _ = _epoch(_cfg(jpeg_root, *base, "data.decode_device=cpu"))
    plain, _ = _epoch(_cfg(jpeg_root, "data.num_workers=0", "data.jpeg_draft=false"))
    assert len(in_workers) == len(batched) == steps > 1
    for (a, la), (b, lb) in zip(in_workers, batched):
        assert torch.equal(la, lb) and torch.equal(a, b)
    assert not torch.equal(torch.cat([a for a, _ in in_workers]), torch.cat([a for a, _ in plain]))


def test_batched_decode_is_deterministic_and_resumable(jpeg_root: Path) -> None:
    cfg = _cfg(jpeg_root, "data.num_workers=2", "data.decode_device=cpu")
    first, steps = _epoch(cfg)
    second, _ = _epoch(cfg)
    rest, _ = _epoch(cfg, step=3)
    other_epoch, _ = _epoch(cfg, epoch=2)
    assert len(first) == steps and len(rest) == steps - 3
    assert all(torch.equal(a, b) and torch.equal(la, lb) for (a, la), (b, lb) in zip(first, second))
    assert all(torch.equal(a, b) and torch.equal(la, lb) for (a, la), (b, lb) in zip(first[3:], rest))
    assert not torch.equal(first[0][0], other_epoch[0][0])  # a new epoch draws new crops


def test_reduced_size_decode_is_close_and_deterministic(jpeg_root: Path) -> None:
    # 8 px crops of 40-50 px JPEGs: most can be decoded at 1/2 or 1/4 size.
    small = ["data.image_size=8", "data.num_workers=0"]
    full, _ = _epoch(_cfg(jpeg_root, *small, "data.jpeg_draft=false"))
    draft, _ = _epoch(_cfg(jpeg_root, *small, "data.jpeg_draft=true"))
    again, _ = _epoch(_cfg(jpeg_root, *small, "data.jpeg_draft=true"))
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(draft, again))
    a, b = torch.cat([x for x, _ in full]), torch.cat([x for x, _ in draft])
    assert not torch.equal(a, b)  # the reduced decode was used
    # ... on the same crop: a box misplaced by the rescaling would differ by far more (std of the data ~1).
    assert (a - b).abs().mean() < 0.1


@pytest.mark.parametrize("geometry", [["data.augment.rotation=10", "data.augment.translate=0.1"],
                                      ["data.augment.crop_padding=4"]], ids=["affine", "crop_padding"])
def test_sample_augment_reproduces_build_transform(jpeg_root: Path, geometry: list[str]) -> None:
    cfg = load_config(None, ["data.image_size=20", *AUGMENT, *geometry]).data
    image = Image.open(next((jpeg_root.parent / jpeg_root.name.removesuffix("_shards")).rglob("*.jpg"))).convert("RGB")
    augment, normalize = SampleAugment(cfg, train=True), BatchNormalize(cfg)
    for seed in range(5):
        torch.manual_seed(seed)
        expected = build_transform(cfg, train=True)(image)
        torch.manual_seed(seed)
        params = augment.draw(image.height, image.width)
        from torchvision.transforms.v2 import functional as F

        assert torch.equal(normalize(augment.apply(F.pil_to_tensor(image), params)), expected)
    if geometry == ["data.augment.crop_padding=4"]:  # a shift: each output pixel is an input pixel or a reflection
        assert any(isinstance(step, v2.RandomCrop) and step.padding_mode == "reflect" for step in augment.steps)


def test_cuda_decode_without_a_gpu_is_one_clear_line(jpeg_root: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match=r"^data.decode_device=cuda but no CUDA GPU is available here; use workers "
                                         r"or cpu$"):
        build_loader(_cfg(jpeg_root, "data.decode_device=cuda"), Manifest.read(jpeg_root), "train", 0, 1, train=True)


def test_normalising_in_the_main_process_equals_normalising_in_the_workers(jpeg_root: Path) -> None:
    """The workers send uint8 batches; normalised in the main process (recycled host memory on a CPU, the
    device on a GPU: `DeviceNormalize`, checked here on the CPU) they are the bits the workers would send."""
    from pipeline.data import build_stream
    from pipeline.data.samples.decode import DeviceNormalize, WorkerDecode
    from pipeline.data.stream import make_loader

    cfg = _cfg(jpeg_root, "data.num_workers=2")
    in_main, _ = _epoch(cfg)  # what build_loader gives for CPU training

    def raw_epoch(normalize):
        codec = WorkerDecode(SampleAugment(cfg.data, train=True), 3, normalize, draft=True)
        stream = build_stream(cfg, Manifest.read(jpeg_root), "train", 0, 1, train=True, codec=codec)
        stream.set_position(1)
        return list(make_loader(stream, 2, pin_memory=False))  # (images, labels, fault counts)

    in_workers, uint8 = raw_epoch(BatchNormalize(cfg.data)), raw_epoch(None)
    assert len(in_main) == len(in_workers) == len(uint8) > 1
    assert in_workers[0][0].dtype == torch.float32 and uint8[0][0].dtype == torch.uint8
    on_device = DeviceNormalize(BatchNormalize(cfg.data), torch.device("cpu"))
    for (a, la), (b, lb, _), (raw, lc, _) in zip(in_main, in_workers, uint8):
        c, lc = on_device(raw, lc)
        assert a.dtype == torch.float32 and torch.equal(a, b) and torch.equal(a, c)
        assert torch.equal(la, lb) and torch.equal(la, lc)


def test_host_normalize_recycles_only_memory_nobody_holds(jpeg_root: Path) -> None:
    from pipeline.data.samples.decode import HostNormalize

    normalize = BatchNormalize(_cfg(jpeg_root).data)
    finish, labels = HostNormalize(normalize), torch.arange(6)
    generator = torch.Generator().manual_seed(0)
    raw = [torch.randint(0, 256, (6, 3, 5, 7), dtype=torch.uint8, generator=generator) for _ in range(6)]

    def batch(index: int) -> torch.Tensor:
        images, out_labels = finish(raw[index], labels)
        assert out_labels is labels and torch.equal(images, normalize(raw[index]))  # exact, chunked or not
        return images

    kept = batch(0)  # the caller keeps it: its memory is never written again
    second = batch(1)
    assert second.data_ptr() != kept.data_ptr()
    recycled = second.data_ptr()
    del second
    third = batch(2)
    assert third.data_ptr() == recycled  # released: the next batch reuses the memory, no page faults
    view = third[2:]
    del third
    fourth = batch(3)  # a view of the third batch keeps its memory busy
    assert fourth.data_ptr() not in (kept.data_ptr(), recycled)
    weight = torch.ones(1, requires_grad=True)
    graph = (fourth * weight).sum()  # autograd saves the batch for the weight's gradient
    busy = fourth.data_ptr()
    del fourth
    fifth = batch(4)
    assert fifth.data_ptr() not in (kept.data_ptr(), recycled, busy)
    assert torch.equal(kept, normalize(raw[0])) and torch.equal(view, normalize(raw[2])[2:])
    graph.backward()
    assert weight.grad.item() == pytest.approx(normalize(raw[3]).sum().item(), rel=1e-5)
    last = fifth.data_ptr()
    del graph, fifth
    assert batch(5).data_ptr() == last  # the newest free buffer first
    assert finish(raw[0][:2], labels[:2])[0].shape == (2, 3, 5, 7)  # another shape: its own buffer


def _loaded(cfg, split: str) -> tuple[list, dict]:
    from pipeline.data.samples.faults import as_dict

    data = build_loader(cfg, Manifest.read(cfg.data.root), split, 0, 1, train=split == "train")
    data.set_position(1)
    batches = [(images.clone(), labels.clone()) for images, labels in data.loader]
    assert len(batches) == data.stream.steps_per_epoch()
    return batches, as_dict(data.bad_samples.total)


@pytest.mark.parametrize("workers", [0, 2])
def test_broken_jpegs_decoded_in_the_main_process_are_replaced_and_counted(broken_root: Path, workers: int,
                                                                           capsys) -> None:
    """decode_device=cpu|cuda: an image whose header reads but whose data does not decode is met by the main
    process; it is counted and warned about as in the workers, replaced in training, left out in evaluation."""
    base = [f"data.num_workers={workers}", "data.jpeg_draft=false", "train.eval_batch_size=8"]
    counts = {"seen": 48, "truncated": 0, "undecodable": 3, "no_label": 0, "bad_label": 0, "oversize": 0,
              "converted_mode": 0,
              "converted_size": 0, "net_retries": 0, "net_resumed": 0, "net_failed": 0}
    sizes = []
    for decode in ("workers", "cpu"):
        batches, faults = _loaded(_cfg(broken_root, *base, f"data.decode_device={decode}"), "train")
        assert faults == counts
        sizes.append([len(labels) for _, labels in batches])
    assert sizes[0] == sizes[1] and sum(sizes[1]) == 48  # the batches keep their size
    err = capsys.readouterr().err
    assert ("warning: skipping sample '00000005' of shard train-000000.tar (undecodable: RuntimeError: Image is "
            "incomplete or truncated); it is replaced by another sample of the same batch") in err
    duplicates = 0
    for images, labels in batches:  # decode_device=cpu: each broken image became a copy of a good one, label too
        same = [(i, j) for i in range(len(images)) for j in range(i) if torch.equal(images[i], images[j])]
        assert all(labels[i] == labels[j] for i, j in same)
        duplicates += len({i for i, _ in same})
    assert duplicates == 3

    (in_workers, faults_w), (in_main, faults_m) = (
        _loaded(_cfg(broken_root, *base, f"data.decode_device={decode}"), "val") for decode in ("workers", "cpu"))
    assert faults_w == faults_m == {**counts, "seen": 16, "undecodable": 1}
    # Evaluation leaves the broken image out in both paths: the same 15 images and labels, in order.
    assert torch.equal(torch.cat([x for x, _ in in_workers]), torch.cat([x for x, _ in in_main]))
    assert torch.cat([y for _, y in in_main]).tolist() == torch.cat([y for _, y in in_workers]).tolist()
    assert sum(len(y) for _, y in in_main) == 15


def test_a_training_batch_with_no_decodable_image_stops_in_one_line() -> None:
    from pipeline.data.samples.decode import DeviceDecode, EncodedImages
    from pipeline.exits import DataQualityError

    cfg = load_config(None, ["data.image_size=8"]).data
    finish = DeviceDecode(SampleAugment(cfg, True), BatchNormalize(cfg), 3, torch.device("cpu"), torch.device("cpu"))
    broken = torch.frombuffer(bytearray(b"\xff\xd8\xff\xe0 not a jpeg"), dtype=torch.uint8)
    batch = EncodedImages(torch.cat([broken, broken]), torch.tensor([0, len(broken), 2 * len(broken)]), [True, True],
                          [None, None], [("k1", "/x/train-000003.tar"), ("k2", "/x/train-000003.tar")])
    with pytest.raises(DataQualityError, match=r"^no image of a training batch decodes \(sample 'k1' of shard "
                                               r"train-000003.tar: RuntimeError: .*; and 1 more\); check the shards "
                                               r"with `pipeline data verify`$"):
        finish(batch, torch.tensor([1, 2]), torch.zeros(7, dtype=torch.long))
