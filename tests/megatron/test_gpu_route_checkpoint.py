"""The GPU route's checkpoint saves (megatron.training's save_checkpoint, patched by
patches/megatron_checkpoint.py) are atomic: run on CPU through Megatron's own save and load functions
(gpu_save_worker.py, one real process per run), SIGKILLed at each stage of a save."""
import hashlib
import os
import shutil
import signal
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(600)

WORKER = os.path.join(os.path.dirname(__file__), "gpu_save_worker.py")
ENV = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
TRACKER = "latest_checkpointed_iteration.txt"


def _worker(save, *argv, env=None):
    return subprocess.Popen([sys.executable, WORKER, str(save), *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env or ENV, start_new_session=True)


def _result(proc, word):
    """(iteration, parameter sum) of the worker's `saved` / `loaded` lines."""
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    lines = [l.split() for l in out.splitlines() if l.startswith(word + " ")]
    return [(int(it), float(total)) for _, it, total in lines]


def _digest(folder) -> str:
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(folder)):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            h.update(os.path.relpath(path, folder).encode())
            with open(path, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


def _kill_at(save, stage):
    proc = _worker(save, "save", 4, env=dict(ENV, MEGATRON_FP4_TEST_SAVE_PAUSE=f"4:{stage}"))
    marker = f"nvfp4 test: save stage {stage} (iteration 4)"
    out = []
    for line in proc.stdout:
        out.append(line)
        if marker in line:
            # the whole process group: megatron-core's save starts a multiprocessing Manager server
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(out)[-3000:]
    return [float(l.split()[2]) for l in out if l.startswith("saving 4 ")][0]


def test_uninterrupted_saves_then_megatron_loads_the_newest(tmp_path):
    save = tmp_path / "run"
    saved = _result(_worker(save, "save", 2, 4), "saved")
    assert [it for it, _ in saved] == [2, 4]
    assert sorted(os.listdir(save)) == ["iter_0000002", "iter_0000004", TRACKER]      # no partial, no temp tracker
    assert (save / TRACKER).read_text().strip() == "4"
    assert _result(_worker(save, "load"), "loaded") == [saved[1]]


# the default run kills after every rank has written (the stage that harmed checkpoints before); the
# other three stages are slow tests (each case: three processes, ~50 s on a loaded 2-core machine)
@pytest.mark.parametrize("stage, resumes", [pytest.param("partial", 2, marks=pytest.mark.slow), ("written", 2),
                                            pytest.param("renamed", 2, marks=pytest.mark.slow),
                                            pytest.param("tracked", 4, marks=pytest.mark.slow)])
def test_a_kill_during_a_save_never_harms_the_previous_checkpoint(tmp_path, stage, resumes):
    """Killed while iteration 4 is saved: iteration 2's folder is byte-identical, the tracker names a
    complete checkpoint (2 until the new one is renamed into place and tracked), Megatron's load restores
    it, and the next launch removes the unfinished save."""
    save = tmp_path / "run"
    (it2, sum2), = _result(_worker(save, "save", 2), "saved")
    before = _digest(save / "iter_0000002")
    sum4 = _kill_at(save, stage)
    assert _digest(save / "iter_0000002") == before
    tracked = int((save / TRACKER).read_text())
    assert tracked == resumes and (save / f"iter_{tracked:07d}").is_dir()
    names = set(os.listdir(save))
    assert ("iter_0000004" in names) == (stage in ("renamed", "tracked"))
    assert (".iter_0000004.partial" in names) == (stage in ("partial", "written"))
    assert _result(_worker(save, "load"), "loaded") == [(resumes, sum2 if resumes == 2 else sum4)]

    from types import SimpleNamespace

    from megatron_fp4.pretrain_support import prepare_gpu_save_folder
    prepare_gpu_save_folder(SimpleNamespace(save=str(save), load=str(save), nvfp4_overwrite=False))
    assert not [n for n in os.listdir(save) if n.startswith(".")]


def test_async_saves_are_left_to_megatron():
    """--async-save finishes after save_checkpoint returns: the patch leaves it (and non-persistent,
    release saves) exactly as Megatron does them."""
    from types import SimpleNamespace

    from megatron_fp4.patches.megatron_checkpoint import _covered
    args = SimpleNamespace(save="run", async_save=False)
    assert _covered(args, False, False)
    assert not _covered(SimpleNamespace(save="run", async_save=True), False, False)
    assert not _covered(args, True, False) and not _covered(args, False, True)
    assert not _covered(SimpleNamespace(save=None, async_save=False), False, False)
