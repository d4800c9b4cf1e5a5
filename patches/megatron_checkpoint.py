"""Checkpoint save of megatron.training (the launcher's GPU route): atomic, as on the CPU route.

megatron-core 0.19's `checkpointing.save_checkpoint` writes straight into `<save>/iter_XXXXXXX/` and then
rewrites `latest_checkpointed_iteration.txt` in place. A kill during a save leaves a half-written
iteration folder that looks like a checkpoint, and a kill during the tracker rewrite leaves an empty
tracker (the next `--load` fails). With this patch a synchronous save of `--save` goes through the
same steps as the CPU route's (megatron_fp4/megatron/checkpoint.py):

1. rank 0 creates `<save>/.iter_XXXXXXX.partial/` (a barrier follows);
2. Megatron writes every rank's files there: while the save runs, `checkpointing.get_checkpoint_name`
   maps `<save>/iter_XXXXXXX` to the partial folder;
3. after Megatron's own barrier (every rank has written) rank 0 asks for the tracker's name: at that
   moment it renames the partial folder to `iter_XXXXXXX` (one rename: absent or complete) and hands
   Megatron a temporary tracker (a copy of the old one, so `--save-retain-interval` still reads the
   previous iteration); after the save the temporary tracker replaces the real one (`os.replace`).

A kill at any point leaves the previous checkpoint and the tracker naming it untouched; leftovers are
removed when the next run starts (pretrain_support.prepare_gpu_save_folder). Saves this does not
cover, left exactly as Megatron does them: `--async-save` (Megatron finishes those after the call
returns; it also writes the tracker only once the files are complete), non-persistent and local
checkpoints (other folders), and `release` checkpoints.

Each rank's OsciReset state (update counter, in-window buffers; megatron/optimizer_hooks.py) is written
into the partial folder before Megatron's files, so it is renamed into place with them (for the saves
left to Megatron: into `iter_XXXXXXX` after the save returns).

The test hook MEGATRON_FP4_TEST_SAVE_PAUSE=ITERATION:STAGE (stages partial, written, renamed, tracked)
stops rank 0 at that point, as on the CPU route. Written for megatron-core 0.19 (the names patched:
`megatron.training.checkpointing.save_checkpoint`, `get_checkpoint_name`,
`get_checkpoint_tracker_filename`, and `megatron.training.training.save_checkpoint`).
"""
from __future__ import annotations

import contextlib
import os
import shutil

_applied = False


def _covered(args, non_persistent: bool, release: bool) -> bool:
    return bool(getattr(args, "save", None)) and not non_persistent and not release and \
        not getattr(args, "async_save", False)


@contextlib.contextmanager
def atomic_save(root: str, iteration: int, write_extra=None):
    """While the body runs Megatron's save of `iteration` into `root`: steps 1-3 of the docstring.
    `write_extra(folder)` (every rank, after step 1) writes the plugin's own files into the partial folder."""
    import torch.distributed as dist
    from megatron.training import checkpointing

    from megatron_fp4.megatron import checkpoint as ck

    root = os.path.abspath(root)
    final = ck.iteration_dir(root, iteration)
    partial = ck.partial_dir(root, iteration)
    tracker = ck.tracker_file(root)
    temp_tracker = os.path.join(root, f".{ck.TRACKER}.saving")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        ck.start_partial(root, iteration)
        if os.path.exists(temp_tracker):
            os.remove(temp_tracker)
    if dist.is_initialized():
        dist.barrier()
    ck._pause("partial", iteration)
    if write_extra is not None:
        write_extra(partial)

    original_name = checkpointing.get_checkpoint_name
    original_tracker = checkpointing.get_checkpoint_tracker_filename
    renamed = {"done": False}

    def get_checkpoint_name(checkpoints_path, it, *args, **kwargs):
        name = original_name(checkpoints_path, it, *args, **kwargs)
        release = kwargs.get("release", args[0] if args else False)
        if not release and int(it) == iteration and os.path.abspath(checkpoints_path) == root:
            rest = os.path.relpath(os.path.abspath(name), final)
            name = partial if rest == "." else os.path.join(partial, rest)
        return name

    def get_checkpoint_tracker_filename(checkpoints_path):
        if os.path.abspath(checkpoints_path) != root or rank != 0:
            return original_tracker(checkpoints_path)
        if not renamed["done"]:
            # Megatron asks for the tracker on rank 0 after its barrier: every rank's files are written
            ck._pause("written", iteration)
            ck.rename_into_place(root, iteration)
            if os.path.exists(tracker):
                shutil.copyfile(tracker, temp_tracker)
            renamed["done"] = True
        return temp_tracker

    checkpointing.get_checkpoint_name = get_checkpoint_name
    checkpointing.get_checkpoint_tracker_filename = get_checkpoint_tracker_filename
    try:
        yield
    finally:
        checkpointing.get_checkpoint_name = original_name
        checkpointing.get_checkpoint_tracker_filename = original_tracker
    if rank == 0:
        if not renamed["done"] or not os.path.exists(temp_tracker):
            raise RuntimeError(f"megatron_fp4: Megatron's save of iteration {iteration} did not write its tracker "
                               f"file (megatron-core's save_checkpoint changed?); the checkpoint is in {final}")
        with open(temp_tracker, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(temp_tracker, tracker)
        ck._fsync_dir(root)
        ck.finish_tracked(root, iteration)
    if dist.is_initialized():
        dist.barrier()


def apply() -> None:
    global _applied
    if _applied:
        return
    from megatron.training import checkpointing, training
    from megatron.training.global_vars import get_args

    original = checkpointing.save_checkpoint

    def save_checkpoint(iteration, model, optimizer, opt_param_scheduler, num_floating_point_operations_so_far,
                        *args, **kwargs):
        from megatron_fp4.megatron.optimizer_hooks import save_oscireset_state
        margs = get_args()
        non_persistent = kwargs.get("non_persistent_ckpt", False)
        if not _covered(margs, non_persistent, kwargs.get("release", False)):
            result = original(iteration, model, optimizer, opt_param_scheduler, num_floating_point_operations_so_far,
                              *args, **kwargs)
            if optimizer is not None and margs.save and not non_persistent:
                from megatron_fp4.megatron.checkpoint import iteration_dir
                save_oscireset_state(optimizer, iteration_dir(margs.save, int(iteration)))
            return result
        # each rank's OsciReset state goes into the partial folder with Megatron's files
        extra = (lambda folder: save_oscireset_state(optimizer, folder)) if optimizer is not None else None
        with atomic_save(margs.save, int(iteration), extra):
            return original(iteration, model, optimizer, opt_param_scheduler, num_floating_point_operations_so_far,
                            *args, **kwargs)

    save_checkpoint.__wrapped__ = original
    checkpointing.save_checkpoint = save_checkpoint
    training.save_checkpoint = save_checkpoint
    _applied = True
