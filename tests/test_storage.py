"""Storage encodings refuse what they cannot hold, in one line, before anything is written."""

from __future__ import annotations

import re

import pytest
import torch

from vitscope.cache_spec.storage import ENCODINGS, StorageRangeError


@pytest.mark.parametrize(
    ("storage", "value", "message"),
    [
        ("float16", float("nan"), "NaN or infinite"),
        ("int8", float("inf"), "NaN or infinite"),
        ("float16", 70000.0, "activations reach 7e+04, beyond float16's 65504; cache with"),
    ],
)
def test_unstorable_activations_are_refused(storage: str, value: float, message: str):
    acts = torch.randn(2, 3, 4)
    acts[1, 2, 3] = value
    with pytest.raises(StorageRangeError, match=re.escape(message)):
        ENCODINGS[storage].encode(acts)


def test_float32_storage_keeps_large_values():
    acts = torch.randn(2, 3, 4) * 1e5
    stored, scale = ENCODINGS["float32"].encode(acts)
    assert scale is None and torch.equal(ENCODINGS["float32"].decode(stored, None), acts)
