"""Where a shard sample becomes a model input: decoding and augmentation in workers or on a device.

`data.decode_device=workers` (default): each DataLoader worker decodes its samples with PIL (JPEGs
at 1/2, 1/4 or 1/8 size when the crop still covers the output size, `data.jpeg_draft`) and applies
the augmentation. The workers send uint8 batches (4x less shared memory to fill and copy, pinned for a
GPU) and the main process normalises each batch on the training device. On the CPU it writes into
batch memory it recycles (`HostNormalize`): a float batch in fresh memory costs a page fault per 4 KiB
on first write, which made shipping float batches from the workers ~4x dearer than normalising there.

`data.decode_device=cpu|cuda`: the workers only read each sample's bytes and draw its augmentation
parameters from its seed; the main process decodes the whole batch with
`torchvision.io.decode_jpeg(list, device=...)` (nvJPEG on a GPU), then crops, flips and normalises
it there with those parameters. For when the CPU cannot decode as fast as the GPU trains.
Non-JPEG images (PNG, ...) are decoded on the CPU in that path and moved to the device.

Both paths draw the same parameters from the same per-sample seed (`SampleAugment`), so they give
the same crops, flips and batches; pixels differ only as much as the two JPEG decoders do.

Bad samples: the workers' inspection catches what does not even open (and bad labels, truncated
shards) in both paths. An image whose header reads but whose data does not decode is found by the
workers in the first path (replaced by another sample of the same shard), by the main process in the
second: in training it is replaced by the next good image of the same batch (its image, crop and
label), in evaluation left out; it is counted as `undecodable` either way, with the same warning.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from PIL import Image
from torch.utils.data import default_collate, get_worker_info
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms.v2 import functional as F

from pipeline.config.schema import DataConfig
from pipeline.data.samples.faults import FIELDS, NO_POSITION, FaultWarnings, SampleCheck, replace_bad
from pipeline.data.samples.images import to_mode, to_uint8
from pipeline.data.samples.memory import shared_empty, storage_users
from pipeline.data.samples.transforms import BatchNormalize, SampleAugment, seeded_cpu_rng
from pipeline.errors import short_error
from pipeline.exits import UndecodableBatch

JPEG_KEYS = ("jpg", "jpeg")


def _draw(augment: SampleAugment, seed: Optional[int], height: int, width: int) -> list:
    """The sample's augmentation parameters: from its seed (training) or fixed (evaluation)."""
    if seed is None:
        return augment.draw(height, width)
    with seeded_cpu_rng(seed):
        return augment.draw(height, width)


@dataclass
class Decoded:
    """An image decoded (maybe at reduced size) for the augmentation parameters of one position."""

    image: torch.Tensor
    params: Optional[list]
    seed: Optional[int]


class WorkerDecode:
    """Decode and augment each sample where it is read (a DataLoader worker); batches of images.

    The loader always sends uint8 batches (`normalize=None`; see the module docstring). Normalising in
    the workers, as the loader once did, stays as an option: the loader benchmark's reference, and the
    test that the main process's normalising gives the same bits.
    """

    def __init__(self, augment: SampleAugment, channels: int, normalize: Optional[BatchNormalize], draft: bool):
        self.augment, self.normalize, self.draft = augment, normalize, draft
        self.mode = "L" if channels == 1 else "RGB"
        self.read_mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB

    def decode(self, image: Image.Image, data: bytes, key: str, seed: Optional[int]) -> Decoded:
        """Decode for the position with `seed` (the stream's inspection calls this; bad data raises)."""
        width, height = image.size
        known = seed != NO_POSITION
        params = _draw(self.augment, seed, height, width) if known else None
        reduction = self.augment.max_reduction(params, height, width) if self.draft and known else 1.0
        if key in JPEG_KEYS and image.format == "JPEG" and reduction < 2:
            # torchvision's libjpeg-turbo decoder straight into a tensor: the same pixels as PIL's, without
            # PIL's two copies into a tensor (~30% of the per-image time at 224 px). What it refuses goes
            # to PIL below, which then raises (or not) exactly as `pipeline data verify` does.
            try:
                tensor = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=self.read_mode)
                return Decoded(tensor, params, seed)
            except RuntimeError:
                pass
        if image.format == "JPEG":
            # draft() makes libjpeg decode straight to the target mode and, where the crop allows, at 1/2,
            # 1/4 or 1/8 size (DCT scaling): less to decode and less to resize.
            image.draft(self.mode, (math.ceil(width / reduction), math.ceil(height / reduction)))
            if image.size != (width, height):
                params = self.augment.rescale(params, (height, width), (image.size[1], image.size[0]))
        return Decoded(F.pil_to_tensor(to_mode(image, self.mode)), params, seed)

    def sample(self, source: SampleCheck, seed: Optional[int]) -> torch.Tensor:
        decoded = source.image
        if not isinstance(decoded, Decoded) or decoded.seed != seed or decoded.params is None:
            # Fed at another position than it was inspected for (it stands in for a bad sample): again.
            decoded = self.decode(Image.open(io.BytesIO(source.data)), source.data, source.ext, seed)
        return self.augment.apply(decoded.image, decoded.params)

    def batch(self, images: list[torch.Tensor]) -> torch.Tensor:
        if self.normalize is None:
            return default_collate(images)  # uint8, in shared memory
        out = _empty_batch((len(images), *images[0].shape), torch.float32)
        for index, image in enumerate(images):
            self.normalize(image, out=out[index])
        return out


def _empty_batch(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised batch; in a DataLoader worker, in shared memory (as default_collate allocates it),
    so sending it to the main process costs no copy."""
    return torch.empty(shape, dtype=dtype) if get_worker_info() is None else shared_empty(shape, dtype)


class EncodedBatch:
    """Read each sample's bytes and draw its parameters; decoding is left to `DeviceDecode`.

    The workers do not decode, so an image whose header reads but whose data is broken is not caught
    by the stream's inspection; `DeviceDecode` replaces (training) or drops (evaluation) it and counts it.
    """

    def __init__(self, augment: SampleAugment):
        self.augment = augment

    def decode(self, image: Image.Image, data: bytes, key: str, seed: Optional[int]) -> tuple[int, int]:
        return image.size[1], image.size[0]  # the header has been read: (height, width)

    def sample(self, source: SampleCheck, seed: Optional[int]) -> tuple[bytes, bool, list, tuple[str, str]]:
        if isinstance(source.image, tuple):
            height, width = source.image
        else:  # a PIL image (inspected elsewhere)
            width, height = source.image.size
        params = _draw(self.augment, seed, height, width)
        return source.data, source.ext in JPEG_KEYS, params, (source.key, source.url)

    def batch(self, items: list[tuple[bytes, bool, list, tuple[str, str]]]) -> "EncodedImages":
        datas = [data for data, _, _, _ in items]
        offsets = torch.tensor([0, *(len(d) for d in datas)], dtype=torch.long).cumsum(0)
        joined = torch.frombuffer(bytearray(b"".join(datas)), dtype=torch.uint8)
        return EncodedImages(joined, offsets, [i[1] for i in items], [i[2] for i in items], [i[3] for i in items])


class EncodedImages(NamedTuple):
    """A batch's encoded images: all bytes in one uint8 tensor, offsets, is-JPEG flags, parameters, and each
    sample's (key, shard url)."""

    data: torch.Tensor
    offsets: torch.Tensor
    is_jpeg: list
    params: list
    names: list


class DeviceNormalize:
    """Main process: a uint8 batch from the workers -> normalised floats on the device (non-blocking copy)."""

    def __init__(self, normalize: BatchNormalize, device: torch.device):
        self.normalize, self.device = normalize, device

    def __call__(self, images: torch.Tensor, labels: torch.Tensor,
                 counts: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        images = images.to(self.device, non_blocking=True)
        return self.normalize(images), labels.to(self.device, non_blocking=True)


class HostNormalize:
    """Main process, CPU training: a uint8 batch from the workers -> normalised floats in recycled memory.

    Writing a fresh 38 MB float batch (64 x 3 x 224 x 224) costs ~0.3 ms per image in page faults alone,
    more than normalising it. So the batches are written into a few buffers that are reused once nothing
    else holds them: a buffer is reused only when its storage has no user besides this ring (the batch
    handed out, views of it, tensors autograd saved from it all count), else a new one is made.
    """

    SLOTS = 3

    def __init__(self, normalize: BatchNormalize):
        self.normalize = normalize
        self._ring: list[tuple[torch.Tensor, int]] = []  # (buffer, its storage's use count when idle)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor,
                 counts: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        out = self._buffer(tuple(images.shape))
        # One thread, a few images at a time (each pass stays in the cache): the loader workers hold the other
        # cores, and torch's thread pool spinning against them made this 3-4x slower on a busy 2-core machine.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for start in range(0, len(images), 4):
                self.normalize(images[start:start + 4], out=out[start:start + 4])
        finally:
            torch.set_num_threads(threads)
        return out, labels

    def _buffer(self, shape: tuple[int, ...]) -> torch.Tensor:
        for buffer, idle in self._ring:
            if buffer.shape == shape and idle >= 0 and storage_users(buffer) == idle:
                return buffer.view(shape)  # a new tensor on the same memory: holding it marks the buffer busy
        buffer = torch.empty(shape, dtype=torch.float32)
        self._ring = [(buffer, storage_users(buffer)), *self._ring][:self.SLOTS]
        return buffer.view(shape)


class DeviceDecode:
    """Main process: decode a batch of encoded images on `decode_device`, augment and normalise it there.

    An image that does not decode is counted as undecodable in the batch's fault counts and warned
    about (first few); in training its place takes the next good image of the batch (with that image's
    crop and label, so the batch keeps its size and every rank its step count), in evaluation it is left
    out. A training batch with no image that decodes stops the run with one line.
    """

    def __init__(self, augment: SampleAugment, normalize: BatchNormalize, channels: int,
                 decode_device: torch.device, output_device: torch.device, train: bool = True,
                 warnings: Optional[FaultWarnings] = None):
        self.augment, self.normalize, self.train = augment, normalize, train
        self.read_mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
        self.decode_device, self.output_device = decode_device, output_device
        self.warnings = warnings or FaultWarnings()

    def __call__(self, batch: EncodedImages, labels: torch.Tensor,
                 counts: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        joined, offsets, is_jpeg, params, sources = batch
        bounds = offsets.tolist()
        encoded = [joined[start:stop] for start, stop in zip(bounds[:-1], bounds[1:])]
        images = self._decode_all(encoded, is_jpeg)
        keep = self._resolve_failures(images, sources, counts)
        augmented = [self.augment.apply(images[i], params[i]) for i in keep]
        if keep != list(range(len(labels))):
            labels = labels[keep]
        if not augmented:  # evaluation, nothing decoded: only the counts go on
            return torch.empty(0), labels[:0]
        images_out = self.normalize(torch.stack(augmented)).to(self.output_device, non_blocking=True)
        return images_out, labels.to(self.output_device, non_blocking=True)

    def _decode_all(self, encoded: list[torch.Tensor], is_jpeg: list) -> list[torch.Tensor | str]:
        """Each image decoded, or the error (one line) that decoding it raised."""
        images: list[torch.Tensor | str] = [""] * len(encoded)
        jpegs = [i for i, flag in enumerate(is_jpeg) if flag]
        if jpegs:  # one batched call: nvJPEG decodes the whole list on a GPU
            try:
                decoded = decode_jpeg([encoded[i] for i in jpegs], mode=self.read_mode, device=self.decode_device)
            except RuntimeError:  # one bad image fails the call; one by one (a CMYK JPEG then goes to the CPU)
                decoded = [self._decode_one(encoded[i], jpeg=True) for i in jpegs]
            for index, image in zip(jpegs, decoded):
                images[index] = image
        for index, flag in enumerate(is_jpeg):
            if not flag:
                images[index] = self._decode_one(encoded[index])
        return images

    def _decode_one(self, data: torch.Tensor, jpeg: bool = False) -> torch.Tensor | str:
        if jpeg:
            try:
                return decode_jpeg(data, mode=self.read_mode, device=self.decode_device)
            except RuntimeError:
                pass
        try:
            image = decode_image(data, mode=self.read_mode)
        except RuntimeError as exc:
            return short_error(exc)
        if image.dtype == torch.uint16:  # a 16-bit PNG: scaled to 8 bits like the workers' path, never clipped
            image = torch.from_numpy(to_uint8(image.numpy()))
        return image.to(self.decode_device)

    def _resolve_failures(self, images: list, sources: list, counts: Optional[torch.Tensor]) -> list[int]:
        """Indices of the images that make the batch: failed ones counted, warned about, replaced or left out."""
        good = [i for i, image in enumerate(images) if isinstance(image, torch.Tensor)]
        if len(good) == len(images):
            return good
        action = "replaced by another sample of the same batch" if self.train else "left out of evaluation"
        for index, image in enumerate(images):
            if isinstance(image, str):
                key, url = sources[index]
                self.warnings(SampleCheck(key, url, reason="undecodable", detail=image), action)
                if counts is not None:
                    counts[FIELDS.index("undecodable")] += 1
        if not self.train:
            return good
        if not good:
            key, url = sources[0]
            raise UndecodableBatch(f"no image of a training batch decodes ({SampleCheck(key, url).where()}: "
                                   f"{images[0]}; and {len(images) - 1} more); check the shards with "
                                   "`pipeline data verify`") from None
        # Each failed image takes the next good one of the batch, else its first (the stream's rule, `replace_bad`:
        # deterministic, so a resumed run builds the same batch).
        return [fill for _, fill in replace_bad(range(len(images)), lambda i: isinstance(images[i], torch.Tensor),
                                                  lambda: good[0])]


def build_decoding(cfg: DataConfig, train: bool, device: Optional[torch.device] = None,
                   warn_prefix: str = "") -> tuple[object, object]:
    """(what the workers do per sample/batch, what the main process does per batch) for `device`.

    `device` is where batches must end up (the training device; None: the CPU). The main-process step
    is called as `finish(images, labels, fault_counts)` and may add to the batch's fault counts.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    augment, normalize = SampleAugment(cfg, train), BatchNormalize(cfg)
    if cfg.decode_device == "workers":
        finish = HostNormalize(normalize) if device.type == "cpu" else DeviceNormalize(normalize, device)
        return WorkerDecode(augment, cfg.channels, None, cfg.jpeg_draft), finish
    if cfg.decode_device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("data.decode_device=cuda but no CUDA GPU is available here; use workers or cpu")
        decode_device = device if device.type == "cuda" else torch.device("cuda")
    else:
        decode_device = torch.device("cpu")
    warnings = FaultWarnings(prefix=warn_prefix, who="the main process")
    return EncodedBatch(augment), DeviceDecode(augment, normalize, cfg.channels, decode_device, device, train, warnings)
