"""Batch memory (pipeline.data.samples.memory): the private torch calls are there, and each fallback is correct."""

from __future__ import annotations

import pytest
import torch

from pipeline.data.samples import memory


def test_installed_torch_offers_both_fast_paths() -> None:
    # A torch upgrade that drops either would slow batches down without a word: fail here instead.
    assert memory.FAST_PATHS == {"shared_empty": True, "storage_users": True}, torch.__version__


@pytest.mark.parametrize("fast", [True, False])
def test_shared_empty_is_in_shared_memory(monkeypatch: pytest.MonkeyPatch, fast: bool) -> None:
    monkeypatch.setattr(memory, "_NEW_SHARED", fast)
    tensor = memory.shared_empty((2, 3, 5), torch.float32)
    assert tensor.shape == (2, 3, 5) and tensor.dtype == torch.float32 and tensor.is_shared()
    tensor.fill_(1.5)
    assert tensor.sum().item() == 45.0


def test_storage_users_counts_views_and_saved_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    buffer = torch.zeros(4, 3)
    alone = memory.storage_users(buffer)
    assert alone >= 1
    view = buffer[1:]
    assert memory.storage_users(buffer) == alone + 1
    del view
    assert memory.storage_users(buffer) == alone
    weight = torch.ones(1, requires_grad=True)
    graph = (buffer.view(12) * weight).sum()  # autograd keeps the view for the weight's gradient
    assert memory.storage_users(buffer) > alone
    del graph
    assert memory.storage_users(buffer) == alone
    monkeypatch.setattr(memory, "_USE_COUNT", None)
    assert memory.storage_users(buffer) == -1  # cannot say: HostNormalize then never reuses a buffer
