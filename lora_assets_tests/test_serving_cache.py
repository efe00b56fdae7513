"""The adapter cache's contract (``lora_assets.serving.cache``) on the real per-row LoRA slots."""

from __future__ import annotations

import pytest

MODE = "mail_reply"


def test_a_request_keeps_its_version_while_current_moves_and_the_old_one_then_leaves_memory(tiny_base):
    """The cache's contract, on the real slots: a lease pins one version; new requests get the new
    one; the old one's tensors are zeroed once its last lease ends; LRU eviction skips leased ones."""
    import torch

    from lora_assets.serving.adapters import Pointer
    from lora_assets.serving.cache import AdapterCache, SlotsBusy
    from lora_assets.serving.slots import AdapterSlots, AdapterWeights

    import copy

    slots = AdapterSlots(copy.deepcopy(tiny_base.model), {"q_proj"}, slots=3, rank=4)
    names = list(slots.layers)
    current = {"u1": "v1", "u2": "w1", "u3": "x1"}

    def weights(seed: int) -> AdapterWeights:
        g = torch.Generator().manual_seed(seed)
        layer = slots.layers[names[0]]
        shape_a, shape_b = (4, layer.a.shape[1]), (layer.b.shape[2], 4)
        return AdapterWeights({n: (torch.randn(shape_a, generator=g), torch.randn(shape_b, generator=g)) for n in names},
                              2.0, 4)

    cache = AdapterCache(slots, lambda u, m: Pointer(current[u], {}), lambda u, m, p: weights(len(cache.resident_keys())),
                         refresh_s=0.0, wait_s=0.2)
    old = cache.lease("u1", MODE)
    current["u1"] = "v2"
    new = cache.lease("u1", MODE)
    assert (old.version, new.version) == ("v1", "v2") and old.slot != new.slot
    assert slots.layers[names[0]].a[old.slot].abs().sum() > 0, "the old version stays while a request uses it"
    with pytest.raises(SlotsBusy):  # two slots, both leased: a third adapter waits, then 429
        cache.lease("u2", MODE)
    cache.release(old)
    assert slots.layers[names[0]].a[old.slot].abs().sum() == 0, "released and no longer current: zeroed"
    u2 = cache.lease("u2", MODE)
    cache.release(u2)
    cache.release(new)
    cache.lease("u3", MODE)  # evicts the least recently used unleased adapter (u1's v2)
    assert cache.evictions == 1 and {k[0] for k in cache.resident_keys()} == {"u2", "u3"}
