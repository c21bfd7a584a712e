"""Batch memory: the only place the package uses torch's private storage calls, each with a public fallback.

- `shared_empty`: an uninitialised tensor allocated in shared memory, as `default_collate` allocates a batch
  in a DataLoader worker, so sending it to the main process costs no copy. The public way,
  `torch.empty(...).share_memory_()`, allocates, then copies into shared memory: measured 16 against 25 ms
  for a 64 x 3 x 224 x 224 float batch (fill included) on the 2-core CI machine. Used as the fallback.
- `storage_users`: how many tensors (views, autograd's saved tensors, storage objects) hold a tensor's
  memory, so `HostNormalize` rewrites a buffer only when nothing else holds it. torch has no public way to
  ask; without it the answer is -1 and no buffer is ever reused, which is correct but pays the page faults
  of fresh memory on every batch.

`tests/test_memory.py` fails when an installed torch no longer offers either, so the fast path is not
lost silently.
"""

from __future__ import annotations

import math

import torch

_NEW_SHARED = hasattr(torch.empty(0)._typed_storage(), "_new_shared") if hasattr(torch.Tensor, "_typed_storage") \
    else False
_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)
FAST_PATHS = {"shared_empty": _NEW_SHARED, "storage_users": _USE_COUNT is not None}
"""Which of the two private torch calls the installed torch offers (both, on the torch this is tested with)."""


def shared_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor of `shape` and `dtype` in shared memory."""
    if not _NEW_SHARED:
        return torch.empty(shape, dtype=dtype).share_memory_()
    elem = torch.empty(0, dtype=dtype)
    return elem.new(elem._typed_storage()._new_shared(math.prod(shape))).view(shape)


def storage_users(tensor: torch.Tensor) -> int:
    """How many tensors and storage objects hold `tensor`'s memory; -1 if torch cannot say."""
    return _USE_COUNT(tensor.untyped_storage()._cdata) if _USE_COUNT is not None else -1
