"""Checkpoints of the CPU driver in Megatron's layout, written so that a kill never harms the last one.

Layout (that of megatron.training's `torch_dist` checkpoints):

    <save>/latest_checkpointed_iteration.txt     the newest complete checkpoint's iteration
    <save>/iter_XXXXXXX/                         megatron-core dist_checkpointing files of
        {"model" (or "model0", "model1", ... with virtual stages), "optimizer", "opt_param_scheduler",
         "iteration", "checkpoint_version", "args", "rng_state", "nvfp4_run", "nvfp4_history"}
        and each rank's OsciReset state (nvfp4_oscireset_rankNNNNN.pt, optimizer_hooks.py)

The model and optimizer go in as their sharded state dicts (Megatron's metadata: `dp_reshardable`
distributed-optimizer state), the scheduler, iteration and run description as common state, the random
generators as Megatron's `rng_state` object, and each rank's run history (losses, validation points,
stabilizer events) as one sharded object per rank. The plugin's own random streams need nothing
saved: their keys are a pure function of (seed, iteration, layer, call, DP rank) (state.py), and the
resumed loop declares the iteration again.

Atomic saves: every rank writes into `<save>/.iter_XXXXXXX.partial/`; after a barrier rank 0 renames
it to `iter_XXXXXXX` (one rename: the directory is absent or complete) and only then replaces the
tracker file (written to a temporary name, flushed, `os.replace`d). A kill at any point leaves the
previous checkpoint and the tracker naming it untouched; leftovers are removed at the next start.

`MEGATRON_FP4_TEST_SAVE_PAUSE=ITERATION:STAGE` (tests only; stages partial, written, renamed, tracked)
makes rank 0 print `nvfp4 test: save stage STAGE (iteration N)` and wait there, so that a test can
kill the run at a known point of a save.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..errors import UsageError
from ..patches.megatron_dist_checkpointing import in_process_write_results

TRACKER = "latest_checkpointed_iteration.txt"
PARTIAL_SUFFIX = ".partial"
REPLACED_SUFFIX = ".replaced"
_ITER_DIR = re.compile(r"^iter_(\d{7})$")
_LEFTOVER = re.compile(r"^(\.iter_\d{7}\.(partial|replaced)|\.latest_checkpointed_iteration\.txt\.saving)$")
PAUSE_ENV = "MEGATRON_FP4_TEST_SAVE_PAUSE"


class CheckpointError(UsageError):
    """A checkpoint folder that cannot be used as asked (one-line message naming the flag and fix)."""


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def tracker_file(root: str) -> str:
    return os.path.join(root, TRACKER)


def read_tracker(root: str) -> Optional[int]:
    """The iteration named by `root`'s tracker file (None when there is none)."""
    path = tracker_file(root)
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        text = fh.read().strip()
    if not text.isdigit():
        raise CheckpointError(f"{path}: expected an iteration number, found {text[:40]!r}; "
                              "repair or delete the file (or start fresh with --overwrite)")
    return int(text)


def iteration_dirs(root: str) -> list:
    """Iterations of the complete checkpoint directories under root (sorted)."""
    if not os.path.isdir(root):
        return []
    return sorted(int(m.group(1)) for m in map(_ITER_DIR.match, os.listdir(root)) if m)


def latest_checkpoint(root: str) -> Optional[int]:
    """The iteration to resume from: the tracker's, after checking its directory exists."""
    iteration = read_tracker(root)
    if iteration is not None and not os.path.isdir(iteration_dir(root, iteration)):
        raise CheckpointError(f"{tracker_file(root)} names iteration {iteration}, but "
                              f"{iteration_dir(root, iteration)} is missing; restore it or start fresh with "
                              "--overwrite")
    return iteration


# -- the save folder at start -------------------------------------------------------------------------

def check_save_folder(save: str, load: Optional[str], overwrite: bool) -> None:
    """Refuse to start a run whose --save folder holds an earlier run's checkpoints, unless the run
    resumes them (--load SAVE) or --overwrite asks to start fresh. Read-only: every rank may call it."""
    save = os.path.abspath(save)
    same = load is not None and os.path.abspath(load) == save
    if overwrite and same:
        raise CheckpointError(f"--load {load} and --overwrite contradict each other: --load resumes the "
                              "checkpoint in that folder, --overwrite deletes it; pass one of them")
    if overwrite or same:
        return
    tracked = read_tracker(save)
    dirs = iteration_dirs(save)
    if tracked is None and not dirs:
        return
    found = f"a complete checkpoint at iteration {tracked}" if tracked is not None else \
        f"checkpoint directories {', '.join(f'iter_{i:07d}' for i in dirs[-3:])}"
    raise CheckpointError(f"--save {save} already holds {found} of an earlier run: pass --load {save} to "
                          "resume it, --overwrite to start fresh (deletes it), or another --save folder")


def clear_save_folder(save: str) -> list:
    """--overwrite: delete an earlier run's checkpoints (tracker first, so that a kill half-way never
    leaves a tracker naming a deleted checkpoint), summary and plot. Returns what was removed."""
    removed = []
    path = tracker_file(save)
    if os.path.exists(path):
        os.remove(path)
        removed.append(TRACKER)
    for iteration in iteration_dirs(save):
        shutil.rmtree(iteration_dir(save, iteration))
        removed.append(f"iter_{iteration:07d}")
    for name in ("summary.json", "loss.png"):
        if os.path.exists(os.path.join(save, name)):
            os.remove(os.path.join(save, name))
            removed.append(name)
    return removed


def remove_leftovers(save: str) -> list:
    """Partial saves of a killed run (never renamed into place, so never loadable): delete them."""
    if not os.path.isdir(save):
        return []
    names = [n for n in os.listdir(save) if _LEFTOVER.match(n)]
    for name in names:
        path = os.path.join(save, name)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)
    return names


# -- atomic files -------------------------------------------------------------------------------------

def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_file(path: str, write) -> None:
    """Write a file atomically: `write(tmp_path)` writes a temporary file beside it, which is flushed
    to disk and renamed over `path` (readers see the old file or the new one, never a part)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(directory)


def replace_text(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as fh:
            fh.write(text)
    replace_file(path, write)


# -- state dicts --------------------------------------------------------------------------------------

def _sharding_metadata(use_distributed_optimizer: bool) -> dict:
    """What megatron.training passes to sharded_state_dict (checkpointing._build_sharded_state_dict_metadata)."""
    from megatron.core import parallel_state as ps
    metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    if use_distributed_optimizer:
        metadata["distrib_optim_sharding_type"] = "dp_reshardable"
    metadata["dp_cp_group"] = ps.get_data_parallel_group(with_context_parallel=True)
    return metadata


def _rng_state():
    """Megatron's rng_state object: the Python, NumPy, torch (and CUDA-tracker) generators of this
    (PP, TP) rank, saved by DP rank 0."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    state = {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
             "torch_rng_state": torch.get_rng_state()}
    if _cuda_rng_available():
        state["cuda_rng_state"] = torch.cuda.get_rng_state()
        state["rng_tracker_states"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return ShardedObject("rng_state", [state],
                         (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()),
                         (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
                         replica_id=ps.get_data_parallel_rank(with_context_parallel=True))


def _cuda_rng_available() -> bool:
    from ..patches import torch_cpu
    return torch.cuda.is_available() or torch_cpu.is_installed()


def _restore_rng(states) -> None:
    from megatron.core import tensor_parallel
    state = states[0]
    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if "cuda_rng_state" in state and _cuda_rng_available():
        torch.cuda.set_rng_state(state["cuda_rng_state"])
        tensor_parallel.get_cuda_rng_tracker().set_states(state["rng_tracker_states"])


def _history_object(history: dict):
    """This rank's run history (losses, validation points, stabilizer events), one object per rank."""
    import torch.distributed as dist
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    return ShardedObject("nvfp4_history", history, (dist.get_world_size(),), (dist.get_rank(),), replica_id=0)


def _state_dict(chunks, optimizer, scheduler, iteration: int, run: dict, history: dict, metadata: dict,
                is_loading: bool = False) -> dict:
    import argparse

    from megatron.core.utils import unwrap_model
    models = unwrap_model(list(chunks))
    state = {"checkpoint_version": 3.0, "iteration": iteration,
             "args": argparse.Namespace(**run["args"]), "nvfp4_run": run,
             "opt_param_scheduler": scheduler.state_dict(), "rng_state": _rng_state(),
             "nvfp4_history": _history_object(history)}
    for i, model in enumerate(models):
        state["model" if len(models) == 1 else f"model{i}"] = model.sharded_state_dict(metadata=metadata)
    state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=metadata)
    return state


# -- save ---------------------------------------------------------------------------------------------

def partial_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f".iter_{iteration:07d}{PARTIAL_SUFFIX}")


def _replaced_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f".iter_{iteration:07d}{REPLACED_SUFFIX}")


def start_partial(root: str, iteration: int) -> str:
    """Rank 0: a fresh, empty partial folder for `iteration` (the caller barriers after). Returns it."""
    partial = partial_dir(root, iteration)
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    return partial


def rename_into_place(root: str, iteration: int) -> str:
    """Rank 0, once every rank has written the partial folder: rename it to iter_XXXXXXX (one rename).
    A complete checkpoint there that no tracker names (a run killed between its rename and its tracker
    update, then resumed from the one before) is moved aside first; `finish_tracked` deletes it."""
    final, replaced = iteration_dir(root, iteration), _replaced_dir(root, iteration)
    if os.path.exists(final):
        shutil.rmtree(replaced, ignore_errors=True)
        os.rename(final, replaced)
    os.rename(partial_dir(root, iteration), final)
    _fsync_dir(root)
    _pause("renamed", iteration)
    return final


def finish_tracked(root: str, iteration: int) -> None:
    """Rank 0, after the tracker names `iteration`: drop what rename_into_place moved aside."""
    shutil.rmtree(_replaced_dir(root, iteration), ignore_errors=True)
    _pause("tracked", iteration)


def _pause(stage: str, iteration: int) -> None:
    """Test hook: MEGATRON_FP4_TEST_SAVE_PAUSE=ITERATION:STAGE stops rank 0 at that stage of that save
    (after printing a line saying so) until the test kills the run."""
    wanted = os.environ.get(PAUSE_ENV)
    if not wanted or wanted != f"{iteration}:{stage}":
        return
    import torch.distributed as dist
    if dist.get_rank() == 0:
        print(f"nvfp4 test: save stage {stage} (iteration {iteration})", flush=True)
        time.sleep(600)


def save(root: str, iteration: int, chunks, optimizer, scheduler, run: dict, history: dict,
         use_distributed_optimizer: bool) -> str:
    """Write the checkpoint of `iteration` atomically (collective: every rank calls it)."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.utils import _clean_metadata_for_serialization

    from .optimizer_hooks import save_oscireset_state
    root = os.path.abspath(root)
    final = iteration_dir(root, iteration)
    partial = partial_dir(root, iteration)
    rank = dist.get_rank()
    if rank == 0:
        if read_tracker(root) == iteration:
            raise CheckpointError(f"{final} is the checkpoint being resumed; it is never written again")
        start_partial(root, iteration)
    dist.barrier()
    _pause("partial", iteration)
    in_process_write_results()
    metadata = _sharding_metadata(use_distributed_optimizer)
    state = _state_dict(chunks, optimizer, scheduler, iteration, run, history, metadata)
    dist_checkpointing.save(state, partial, content_metadata=_clean_metadata_for_serialization(metadata))
    save_oscireset_state(optimizer, partial)
    dist.barrier()
    _pause("written", iteration)
    if rank == 0:
        rename_into_place(root, iteration)
        replace_text(tracker_file(root), f"{iteration}\n")
        finish_tracked(root, iteration)
    dist.barrier()
    return final


# -- load ---------------------------------------------------------------------------------------------

@dataclass
class Resumed:
    iteration: int
    directory: str
    run: dict
    history: dict


def _allocate_optimizer_state(optimizer) -> None:
    """A DistributedOptimizer that has not stepped yet has no Adam state, and without Apex / Transformer
    Engine megatron-core's state_dict() then fails (`assert len(steps) == 1`) while building the
    sharded state dict to load into. Its own helper allocates the state (one zero-gradient step of
    the inner optimizer at the scheduler's initial learning rate); the load then overwrites
    parameters, masters and state."""
    for member in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        inner = getattr(member, "optimizer", None)
        if hasattr(member, "_init_optimizer_states_with_dummy_values") and inner is not None and not inner.state:
            member._init_optimizer_states_with_dummy_values()


def _restore_adam_steps(optimizer) -> None:
    """Without Apex / Transformer Engine, megatron-core's DistributedOptimizer keeps the Adam step in
    its param groups (`step`), but its load gives every parameter's torch Adam state one shared
    `step` tensor and then overwrites it with the step of the state it allocated for loading (here
    the allocation step: 1) instead of the checkpoint's: the bias correction of every resumed update
    is wrong. Each parameter gets its own step tensor holding the checkpoint's step."""
    for member in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        inner = getattr(member, "optimizer", None)
        if not hasattr(member, "_init_optimizer_states_with_dummy_values") or inner is None:
            continue
        for group in inner.param_groups:
            if "step" not in group:
                continue
            for param in group["params"]:
                param_state = inner.state.get(param)
                if param_state and isinstance(param_state.get("step"), torch.Tensor):
                    param_state["step"] = torch.tensor(float(group["step"]), dtype=param_state["step"].dtype,
                                                       device=param_state["step"].device)


def check_compatible(saved: dict, now: dict, directory: str) -> None:
    """The settings a bit-identical continuation needs must match the checkpoint's."""
    diffs = [f"{key} {saved.get(key)!r} in the checkpoint, {value!r} now"
             for key, value in now.items() if saved.get(key) != value]
    if diffs:
        raise CheckpointError(f"--load {os.path.dirname(directory)}: {directory} was saved by a run with other "
                              f"settings ({'; '.join(diffs)}); resume with the flags it was saved with, or "
                              "start fresh with --overwrite or another --save folder")


def load(root: str, chunks, optimizer, scheduler, settings: dict, use_distributed_optimizer: bool
         ) -> Optional[Resumed]:
    """Restore the newest complete checkpoint under root (collective). None when root has none."""
    from megatron.core import dist_checkpointing
    from megatron.core.utils import unwrap_model

    from .optimizer_hooks import load_oscireset_state
    root = os.path.abspath(root)
    iteration = latest_checkpoint(root)
    if iteration is None:
        return None
    directory = iteration_dir(root, iteration)
    common = dist_checkpointing.load_common_state_dict(directory)
    if "nvfp4_run" not in common:
        raise CheckpointError(f"--load {root}: {directory} is not a checkpoint of this launcher's CPU route "
                              "(no nvfp4_run entry); start fresh with --overwrite or another --save folder")
    check_compatible(common["nvfp4_run"]["settings"], settings, directory)
    metadata = dist_checkpointing.load_content_metadata(preloaded_state_dict=common) or {}
    metadata = dict(_sharding_metadata(use_distributed_optimizer), **metadata)
    metadata["dp_cp_group"] = _sharding_metadata(use_distributed_optimizer)["dp_cp_group"]
    with torch.no_grad():
        _allocate_optimizer_state(optimizer)
    sharded = _state_dict(chunks, optimizer, scheduler, iteration, common["nvfp4_run"], {}, metadata,
                          is_loading=True)
    state = dist_checkpointing.load(sharded, directory)
    models = unwrap_model(list(chunks))
    with torch.no_grad():   # FP32 params under the distributed optimizer: its masters are views of them
        for i, model in enumerate(models):
            model.load_state_dict(state["model" if len(models) == 1 else f"model{i}"])
        optimizer.load_state_dict(state["optimizer"])
        _restore_adam_steps(optimizer)
    scheduler.load_state_dict(state["opt_param_scheduler"])
    _restore_rng(state["rng_state"])
    load_oscireset_state(optimizer, directory, iteration)
    return Resumed(iteration, directory, common["nvfp4_run"], state["nvfp4_history"])
