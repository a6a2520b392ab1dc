"""The ZeRO stage rule of ``engine.zero_stage=auto`` (medloc/engine_plan.py), worked by hand.

Bytes per parameter, bf16 (module docstring): weights 2 (all N), gradients 2 and optimizer side 16
(fp32 master 4 + Adam m, v 8 + fp32 gradient copy 4) per trainable parameter T; a reference of 2 N.
Stage 2 divides gradients and optimizer side by W, stage 3 also the weights and the reference, and
under stage 3 generation gathers the full policy (2 N) on every GPU. Offloading the optimizer
removes gradients and optimizer side from the GPU; offloading the parameters removes the weights
and the reference. A candidate fits when peak + headroom <= device memory.

Parameter counts: the random-weight Qwen2.5-VL shapes of medloc.models.shapes (the released
configs): 3B 3,754,622,976 (vision 668,684,288), 7B 8,291,249,152; 32B 33.5e9 (model card).
Cards: 80 GiB (torch reports ~79.2 GiB for an H100 80GB; every verdict below holds for both) and
140 GiB (H200, ~139.8 GiB reported). Headroom 12 GiB (engine.auto_headroom_gib, ASSUMED).
"""

from __future__ import annotations

import pytest

from medloc.engine_plan import (
    CANDIDATES,
    GIB,
    BytesPerParam,
    ZeroPlan,
    bytes_per_param,
    choose_zero_plan,
    model_state_bytes,
)

N3B, VISION3B = 3_754_622_976, 668_684_288
N7B = 8_291_249_152
N32B = 33_500_000_000
BF16 = bytes_per_param("bf16")
HEADROOM = 12 * GIB


def _choose(n: int, world: int, gib: float | None, *, trainable: int | None = None,
            reference: bool = True):
    return choose_zero_plan(
        n_params=n, n_trainable=n if trainable is None else trainable, bpp=BF16, world_size=world,
        device_bytes=None if gib is None else int(gib * GIB), headroom_bytes=HEADROOM,
        with_reference=reference,
    )


def test_bytes_per_param_by_precision():
    assert BF16 == BytesPerParam(weights=2, grads=2, optimizer=16)  # 4 master + 8 moments + 4 cast
    assert bytes_per_param("fp32") == BytesPerParam(weights=4, grads=4, optimizer=8)  # moments only
    with pytest.raises(ValueError, match="precision"):
        bytes_per_param("fp16")


@pytest.mark.parametrize(
    "plan,expected",
    [
        # N = 1000, T = 800, W = 4, bf16, with reference:
        # (weights, grads, optimizer, reference, gathered for generation)
        (ZeroPlan(0), (2000, 1600, 12800, 2000, 0)),  # nothing partitioned
        (ZeroPlan(1), (2000, 1600, 3200, 2000, 0)),  # optimizer side / 4
        (ZeroPlan(2), (2000, 400, 3200, 2000, 0)),  # + gradients / 4
        (ZeroPlan(2, offload_optimizer=True), (2000, 0, 0, 2000, 0)),  # gradients+optimizer on CPU
        (ZeroPlan(3), (500, 400, 3200, 500, 2000)),  # + weights, reference / 4; 2N gathered
        (ZeroPlan(3, offload_optimizer=True), (500, 0, 0, 500, 2000)),
        (ZeroPlan(3, offload_optimizer=True, offload_params=True), (0, 0, 0, 0, 2000)),
    ],
)
def test_what_each_stage_partitions(plan, expected):
    e = model_state_bytes(plan, n_params=1000, n_trainable=800, bpp=BF16, world_size=4,
                          with_reference=True)
    assert (e.weights, e.grads, e.optimizer, e.reference, e.generation_extra) == expected


def test_update_generation_and_peak():
    # ZeRO-3, N = T = 1000, W = 4: update 500 + 500 + 4000 + 500 = 5500;
    # generation 500 + 4000 + 500 + 2000 (gathered policy) = 7000 -> peak 7000.
    e = model_state_bytes(ZeroPlan(3), n_params=1000, n_trainable=1000, bpp=BF16, world_size=4,
                          with_reference=True)
    assert (e.update, e.generation, e.peak) == (5500, 7000, 7000)
    # Without a reference and at ZeRO-0, fp32 (the tiny model on CPU): 4 + 4 + 8 = 16 bytes/param.
    e = model_state_bytes(ZeroPlan(0), n_params=1000, n_trainable=1000,
                          bpp=bytes_per_param("fp32"), world_size=1, with_reference=False)
    assert (e.update, e.peak) == (16000, 16000)


def test_3b_on_one_h200_is_zero0():
    # ZeRO-0: 2N + 2N + 16N + 2N (reference) = 22N = 82,601,705,472 B = 76.93 GiB;
    # + 12 = 88.93 <= 140 -> the cheapest candidate fits.
    c = _choose(N3B, 1, 140)
    assert c.plan == ZeroPlan(0) and c.fits
    assert c.estimate.peak == 22 * N3B
    assert round(c.estimate.peak / GIB, 2) == 76.93


def test_3b_on_one_80gb_gpu_needs_the_optimizer_offloaded():
    # ZeRO-0: 76.93 + 12 = 88.93 GiB > 80. ZeRO-2 over one GPU partitions nothing: the same 88.93.
    # ZeRO-2 + optimizer offload: 2N weights + 2N reference = 4N = 13.99 GiB; + 12 = 25.99 <= 80.
    # (Measured: ZeRO-3 without offload ran out of memory at 76.5 GiB on one H100; README.)
    c = _choose(N3B, 1, 80)
    assert c.plan == ZeroPlan(2, offload_optimizer=True) and c.fits
    assert c.estimate.peak == 4 * N3B


def test_3b_with_a_frozen_vision_tower_fits_zero0_on_80gb():
    # T = N - 668,684,288 = 3,085,938,688. ZeRO-0: 4N + 18T = 15,018,491,904 + 55,546,896,384
    # = 70,565,388,288 B = 65.72 GiB; + 12 = 77.72 <= 80 (and <= 79.2).
    c = _choose(N3B, 1, 80, trainable=N3B - VISION3B)
    assert c.plan == ZeroPlan(0)
    assert c.estimate.peak == 4 * N3B + 18 * (N3B - VISION3B)


def test_3b_on_two_80gb_gpus_is_zero2():
    # ZeRO-0 does not fit (88.93 GiB). ZeRO-2: 2N + 2N/2 + 16N/2 + 2N = 13N = 45.46 GiB; + 12 fits.
    c = _choose(N3B, 2, 80)
    assert c.plan == ZeroPlan(2)
    assert c.estimate.peak == 13 * N3B


def test_7b_on_one_80gb_gpu_offloads_the_optimizer():
    # ZeRO-0: 22N = 182.4e9 B = 169.9 GiB: no. ZeRO-2 over one GPU: the same. ZeRO-2 + optimizer
    # offload: 4N = 33,164,996,608 B = 30.89 GiB; + 12 = 42.89 <= 80.
    c = _choose(N7B, 1, 80)
    assert c.plan == ZeroPlan(2, offload_optimizer=True)
    assert round(c.estimate.peak / GIB, 2) == 30.89
    assert _choose(N7B, 1, 140).plan == ZeroPlan(2, offload_optimizer=True)  # 169.9 > 140 too


def test_7b_on_four_80gb_gpus_is_zero2():
    # ZeRO-2: 2N + 18N/4 + 2N = 8.5N = 70,475,617,792 B = 65.64 GiB; + 12 = 77.64 <= 80 (and 79.2).
    c = _choose(N7B, 4, 80)
    assert c.plan == ZeroPlan(2)
    assert c.estimate.peak == 2 * N7B + 18 * N7B // 4 + 2 * N7B


def test_32b_on_four_80gb_gpus_offloads_optimizer_and_parameters():
    # ZeRO-0 22N = 686 GiB; ZeRO-2 8.5N = 265 GiB; ZeRO-2 + offload 4N = 124.8 GiB;
    # ZeRO-3: update 22N/4 = 171.6 GiB; ZeRO-3 + optimizer offload: generation gathers 2N beside
    # the partitions 2N/4 + 2N/4 -> 3N = 93.6 GiB: none fits 80 - 12 = 68.
    # ZeRO-3 + both offloads: the gathered policy 2N = 62.40 GiB; + 12 = 74.40 <= 80.
    c = _choose(N32B, 4, 80)
    assert c.plan == ZeroPlan(3, offload_optimizer=True, offload_params=True) and c.fits
    assert round(c.estimate.peak / GIB, 2) == 62.40


def test_plain_zero3_when_many_gpus_partition_what_offload_cannot():
    # 20e9 parameters on 32 x 80 GiB (budget 68): ZeRO-2 4N + 18N/32 = 85.0 GiB and ZeRO-2 +
    # offload 4N = 74.5 GiB do not fit; ZeRO-3: update 22N/32 = 12.8 GiB, generation
    # 2N + 2N/32 + 16N/32 + 2N/32 = 2.625N = 48.9 GiB -> fits.
    c = _choose(20_000_000_000, 32, 80)
    assert c.plan == ZeroPlan(3)
    assert c.estimate.peak == 2.625 * 20_000_000_000


def test_no_gpu_means_zero0():
    # CPU (the tiny model): one pool of host memory, nothing to fit; stage 0 for any world size.
    for world in (1, 2):
        c = _choose(1_000_000, world, None)
        assert c.plan == ZeroPlan(0) and c.fits


def test_nothing_fits_returns_the_most_frugal_and_says_so():
    # 72e9 on one 80 GiB GPU: even the gathered policy alone is 2N = 134.1 GiB.
    c = _choose(72_000_000_000, 1, 80)
    assert c.plan == CANDIDATES[-1] and not c.fits


def test_a_model_that_fits_never_gets_partitioned_on_one_gpu():
    # On one GPU ZeRO-2/3 without offload save nothing: whatever fits is ZeRO-0, and where ZeRO-0
    # does not fit the next choice offloads.
    for n in (10**8, 10**9, N3B, N7B):
        for gib in (24, 40, 80, 140):
            plan = _choose(n, 1, gib).plan
            assert plan == ZeroPlan(0) or plan.offload_optimizer, (n, gib, plan)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="n_trainable"):
        model_state_bytes(ZeroPlan(0), n_params=10, n_trainable=11, bpp=BF16, world_size=1,
                          with_reference=False)
    with pytest.raises(ValueError, match="world_size"):
        model_state_bytes(ZeroPlan(0), n_params=10, n_trainable=10, bpp=BF16, world_size=0,
                          with_reference=False)
