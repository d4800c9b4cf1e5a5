"""OsciReset core: schedule, detection, reset, memeff sampling, and exact Q_D on DistributedOptimizer
shards (real gloo process groups, DP = 2, 3, 4, shard boundaries inside blocks, outer blocks and tiles)."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_fp4.oscireset import (MasterQuantizer, OsciResetConfig, ShardedMasterQuantizer,
                                    WeightTracker, edge_score)
from megatron_fp4.registry import load_recipe
from megatron_fp4.testing.dist import free_port

RECIPES = ["quartet2", "quartet2-no46", "nvidia", "nvidia-46", "tetrajet2"]


def test_schedule_matches_the_spec_example():
    """S = 10, P = 7, T = 3: the first window starts at 14, resets at 18, 25, 32, ..."""
    cfg = OsciResetConfig(start=10, period=7, window=3)
    phases = {it: cfg.phase(it) for it in range(40)}
    assert [it for it, p in phases.items() if p == "start"] == [14, 21, 28, 35]
    assert [it for it, p in phases.items() if p == "reset"] == [18, 25, 32, 39]
    assert [it for it, p in phases.items() if p == "accumulate"][:3] == [15, 16, 17]
    assert all(p == "idle" for it, p in phases.items() if it < 14)


@pytest.mark.parametrize("kwargs", [dict(variant="other"), dict(window=0), dict(window=6, period=7),
                                    dict(threshold=0), dict(sample_percent=0), dict(start=-1)])
def test_bad_config(kwargs):
    with pytest.raises(ValueError):
        OsciResetConfig(**{"start": 0, **kwargs}).validate()


def oscillating_weight(recipe_name, seed=0):
    """A 128x128 weight; three chosen elements: one parked on a rounding edge (will oscillate), one
    drifting steadily, one frozen."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(128, 128, generator=g) * 0.02
    qd, scale = MasterQuantizer(load_recipe(recipe_name))(w)
    return w, qd, scale


def run_tracker(recipe_name, master, updates, cfg):
    quantizer = MasterQuantizer(load_recipe(recipe_name))
    tracker = WeightTracker("w", lambda: master, quantizer, cfg)
    results = {}
    for it, delta in enumerate(updates):
        master += delta
        stats = tracker.on_update(it)
        if stats:
            results[it] = stats
    return tracker, results


@pytest.mark.parametrize("recipe_name", ["tetrajet2", "quartet2", "nvidia"])
def test_edge_element_is_flagged_and_reset_drifting_and_frozen_are_not(recipe_name):
    w, qd, scale = oscillating_weight(recipe_name)
    # place element (5, 3) exactly on a rounding edge between two grid points of its block, away
    # from the block maximum so its scale does not depend on it
    s = scale[5, 3].item()
    w[5, 3] = 1.25 * s  # midpoint between 1.0 and 1.5 (in units of the element's scale)
    frozen = (7, 9)
    drifting = (11, 20)
    steps = 12
    updates = []
    for t in range(steps):
        d = torch.zeros_like(w)
        d[5, 3] = (1e-3 if t % 2 == 0 else -1e-3) * s        # alternating, tiny: crosses the edge
        d[drifting] = 0.05 * scale[drifting].item()            # steady: moves 0.6 of a bin over the window
        updates.append(d)
    master = w.clone()
    cfg = OsciResetConfig(start=0, period=20, window=10, threshold=8)
    _, results = run_tracker(recipe_name, master, updates, cfg)
    assert list(results) == [11]
    qd_now, _ = MasterQuantizer(load_recipe(recipe_name))(master)
    assert master[5, 3] == qd_now[5, 3]                        # reset to its bin value
    assert results[11]["reset"] >= 1
    # the steady and frozen elements keep their (non-grid) master values
    untouched = w.clone()
    for u in updates:
        untouched += u
    assert master[drifting] == untouched[drifting]
    assert master[frozen] == w[frozen]
    assert results[11]["reset"] < 0.01 * w.numel()  # random elements are hardly ever flagged


def test_ratio_matches_brute_force():
    """Flags equal a brute-force recomputation of Dist_FP / Dist_Q over the stored history."""
    recipe = load_recipe("tetrajet2")
    quantizer = MasterQuantizer(recipe)
    g = torch.Generator().manual_seed(3)
    master = torch.randn(128, 256, generator=g) * 0.02
    history = [master.clone()]
    cfg = OsciResetConfig(start=0, period=10, window=6, threshold=2.0)
    tracker = WeightTracker("w", lambda: master, quantizer, cfg)
    tracker.on_update(0)
    for it in range(1, 7):
        master += torch.randn(master.shape, generator=g) * 3e-4 * (-1) ** it
        history.append(master.clone())
        tracker.on_update(it)
    before_reset = master.clone()
    stats = tracker.on_update(7)
    dist_fp = sum((history[i] - history[i - 1]).abs().double() for i in range(1, 7))
    dist_q = sum((quantizer(history[i])[0] - quantizer(history[i - 1])[0]).abs().double() for i in range(1, 7))
    flagged = (dist_fp > 0) & (dist_q >= 2.0 * dist_fp)
    assert stats["reset"] == int(flagged.sum()) > 0
    qd = quantizer(before_reset)[0]
    assert torch.equal(master[flagged], qd[flagged])
    assert torch.equal(master[~flagged], before_reset[~flagged])


def test_reset_leaves_adam_state_untouched():
    recipe = load_recipe("quartet2")
    g = torch.Generator().manual_seed(4)
    param = torch.nn.Parameter(torch.randn(128, 128, generator=g) * 0.02)
    opt = torch.optim.Adam([param], lr=1e-4)
    cfg = OsciResetConfig(start=0, period=8, window=4, threshold=1.0)
    tracker = WeightTracker("p", lambda: param.data, MasterQuantizer(recipe), cfg)
    for it in range(6):
        param.grad = torch.randn(param.shape, generator=g) * (-1) ** it
        opt.step()
        if it == 5:
            state = {k: v.clone() for k, v in opt.state[param].items()}
        stats = tracker.on_update(it)
    assert stats is not None and stats["reset"] > 0
    for k, v in opt.state[param].items():
        assert torch.equal(v, state[k]), k


def test_resume_inside_a_window_skips_it():
    recipe = load_recipe("tetrajet2")
    master = torch.randn(128, 128) * 0.02
    cfg = OsciResetConfig(start=0, period=10, window=4)
    tracker = WeightTracker("w", lambda: master, MasterQuantizer(recipe), cfg)
    # a fresh tracker (as after a resume) first sees update 12: no start copy for the window at 10
    assert all(tracker.on_update(it) is None for it in range(12, 20))
    assert tracker.window_start is None
    tracker.on_update(20)
    assert tracker.window_start == 20


def test_memeff_tracks_the_elements_closest_to_an_edge():
    recipe = load_recipe("tetrajet2")
    g = torch.Generator().manual_seed(5)
    master = torch.randn(128, 128, generator=g) * 0.02
    quantizer = MasterQuantizer(recipe)
    cfg = OsciResetConfig(start=0, period=10, window=3, variant="memeff", sample_percent=10)
    tracker = WeightTracker("w", lambda: master, quantizer, cfg)
    tracker.on_update(0)
    qd, scale = quantizer(master)
    score = edge_score(master, qd, scale).reshape(-1)
    assert tracker.index.numel() == round(0.1 * master.numel())
    threshold = score.sort(descending=True).values[tracker.index.numel() - 1]
    assert (score[tracker.index.long()] >= threshold).all()
    # brute-force score for one element: |w/s - q| / binwidth(q)
    i = int(tracker.index[0])
    w_i, s_i = master.reshape(-1)[i].item(), scale.reshape(-1)[i].item()
    q_i = qd.reshape(-1)[i].item() / s_i
    width = {0: .5, .5: .5, 1: .5, 1.5: .5, 2: .75, 3: 1, 4: 1.5, 6: 2}[abs(q_i)]
    assert score[i].item() == pytest.approx(abs(w_i / s_i - q_i) / width, rel=1e-5)
    # bins are asymmetric at 2 and 4 ([1.75, 2.5], [3.5, 5]): the score peaks at 2/3 there, unless
    # the element is clipped above 6 by a rounded-down inner scale
    unclipped = (master / scale).abs().reshape(-1) <= 6
    assert score.min() >= 0 and (score[unclipped] <= 2 / 3 + 1e-6).all()


# --- DistributedOptimizer shards: exact Q_D with gloo ------------------------------------------------

def _shard_worker(rank, world, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(11)
        shape = (256, 384)
        w = torch.randn(shape, generator=g) * torch.exp2(torch.randn(shape, generator=g))
        numel = w.numel()
        # uneven boundaries that cut 1x16 blocks, 128-blocks and 16x16 tiles
        cuts = [0] + sorted(torch.randint(1, numel, (world - 1,), generator=g).tolist()) + [numel]
        start, end = cuts[rank], cuts[rank + 1]
        mismatches = {}
        for name in RECIPES:
            recipe = load_recipe(name)
            full_qd, full_scale = MasterQuantizer(recipe)(w)
            qd, scale = ShardedMasterQuantizer(recipe, shape, start, end, group=dist.group.WORLD)(
                w.reshape(-1)[start:end])
            mismatches[name] = (int((qd != full_qd.reshape(-1)[start:end]).sum()),
                                int((scale != full_scale.reshape(-1)[start:end]).sum()))
        results[rank] = mismatches
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3, 4])
def test_sharded_qd_is_bitwise_equal_to_unsharded(world):
    ctx = mp.get_context("spawn")
    manager = ctx.Manager()
    results = manager.dict()
    mp.start_processes(_shard_worker, args=(world, free_port(), results), nprocs=world, start_method="spawn")
    for rank in range(world):
        for name, (value_mismatch, scale_mismatch) in results[rank].items():
            assert value_mismatch == 0 and scale_mismatch == 0, (rank, name)
