"""CPU route of the launcher: checkpoint / resume, atomic saves, no silent overwrite, failures that
fail. Every test runs the real launcher (`python -m megatron_fp4.pretrain_gpt`, under torchrun for 2
ranks) as separate processes and kills them with real signals; checkpoints are read back with
torch.distributed.checkpoint's own reader (`dcp_to_torch_save`), independently of the code under test."""
import hashlib
import json
import math
import os
import random
import signal
import subprocess
import sys

import pytest
import torch

from megatron_fp4.testing.dist import free_port

pytestmark = pytest.mark.timeout(900)

TINY = ["--num-layers", "2", "--hidden-size", "128", "--ffn-hidden-size", "256", "--num-attention-heads", "2",
        "--seq-length", "32", "--micro-batch-size", "2", "--log-interval", "1", "--eval-interval", "4",
        "--eval-iters", "1", "--threads", "1"]
# stabilizers active inside 8 iterations: OutControl records iterations 1-3 (selects at 4), OsciReset
# windows of 2 updates end at updates 3 and 6, so resuming at 2, 4 or 6 lands mid-recording / mid-window
STABILIZERS = ["--nvfp4-override", "outcontrol_record_start=1", "--nvfp4-override", "outcontrol_record_iters=3",
               "--nvfp4-override", "oscireset_start=1", "--nvfp4-override", "oscireset_period=3",
               "--nvfp4-override", "oscireset_window=2", "--nvfp4-override", "oscireset_threshold=1.5"]
ENV = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")


def _argv(save, *extra, ranks=1):
    prog = ["-m", "megatron_fp4.pretrain_gpt", "--nvfp4-cpu", "--save", str(save), *TINY, *map(str, extra)]
    if ranks == 1:
        return [sys.executable, *prog]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-addr",
            "127.0.0.1", "--master-port", str(free_port()), *prog]


def _start(argv, env=None):
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env or ENV, start_new_session=True)


def _finish(proc, timeout=600):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _run(argv, env=None, timeout=600):
    return _finish(_start(argv, env), timeout)


def _signal_tree(pid: int, sig) -> None:
    """`sig` to a process and all its descendants (torchrun starts its ranks in sessions of their own,
    so the process group alone would miss them); the ranks first, so that nothing goes on training."""
    import psutil
    root = psutil.Process(pid)
    for proc in root.children(recursive=True) + [root]:
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def _kill_when(proc, marker: str, sig=signal.SIGKILL, on_line=None):
    """Read the run's output until a line containing `marker`, then send `sig` to its process group."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if on_line is not None:
            on_line(line)
        if marker in line:
            _signal_tree(proc.pid, sig)
            break
    rest, _ = proc.communicate(timeout=600)
    return proc.returncode, "".join(lines) + rest


def _tensors(checkpoint_dir, tmp_path):
    """Every tensor of a checkpoint (model and optimizer state), read by torch's DCP reader."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    out = tmp_path / f"read_{abs(hash(str(checkpoint_dir)))}.pt"
    dcp_to_torch_save(str(checkpoint_dir), str(out))
    return {k: v for k, v in torch.load(out, weights_only=False).items() if isinstance(v, torch.Tensor)}


def _strict_json(path, schema=True):
    """The file as strict JSON (no NaN / Infinity tokens); a summary is also checked against the one
    schema both routes write (megatron_fp4/summary.py)."""
    from megatron_fp4 import summary

    def refuse(token):
        raise AssertionError(f"{path}: {token} is not JSON")
    with open(path) as fh:
        value = json.load(fh, parse_constant=refuse)
    return summary.check(value) if schema else value


def _digest(directory):
    """SHA-256 of every file under directory, by relative path."""
    out = {}
    for parent, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(parent, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, directory)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from megatron_fp4.data import corpus as corpus_mod
    root = tmp_path_factory.mktemp("corpus")
    src = root / "src"
    src.mkdir()
    for i in range(30):
        (src / f"m{i}.py").write_text("def f(x):\n    return x * %d\n" % i * 40)
    info = corpus_mod.build(str(src), str(root / "out"), valid_fraction=0.2)
    return ["--data-path", info["prefixes"]["train"], "--valid-data-path", info["prefixes"]["valid"]]


def _kill_and_resume(tmp_path, flags, ranks, seed):
    """An uninterrupted run against one SIGKILLed at a random iteration and resumed with --load: the
    losses of every iteration and every model / optimizer tensor of the final checkpoint must be
    bit-identical."""
    iters = 8
    kill_after = random.Random(seed).randint(3, iters - 2)
    common = [*flags, "--train-iters", iters, "--save-interval", 2]
    straight = _start(_argv(tmp_path / "straight", *common, ranks=ranks))
    killed = _start(_argv(tmp_path / "killed", *common, ranks=ranks))
    rc, killed_out = _kill_when(killed, f" iteration {kill_after:6d}/")
    assert rc == -signal.SIGKILL, killed_out[-3000:]
    rc, straight_out = _finish(straight)
    assert rc == 0, straight_out[-3000:]
    tracked = int((tmp_path / "killed" / "latest_checkpointed_iteration.txt").read_text())
    assert 2 <= tracked <= kill_after and tracked % 2 == 0, (tracked, kill_after)
    rc, resumed_out = _run(_argv(tmp_path / "killed", *common, "--load", tmp_path / "killed", ranks=ranks))
    assert rc == 0, resumed_out[-3000:]
    assert f"resumed from {tmp_path / 'killed'}/iter_{tracked:07d}: iteration {tracked} of {iters}" in resumed_out
    a, b = _strict_json(tmp_path / "straight" / "summary.json"), _strict_json(tmp_path / "killed" / "summary.json")
    assert b["resumed_from"] == tracked and a["finished"] and b["finished"]
    assert len(a["losses"]) == iters and a["losses"] == b["losses"], (a["losses"], b["losses"])
    assert a["valid"] == b["valid"]
    # the resumed segment's own progress lines (not the history it loaded) carry the same losses
    for i in range(tracked + 1, iters + 1):
        line = next(ln for ln in resumed_out.splitlines() if f" iteration {i:6d}/" in ln)
        assert a["losses"][i - 1][0] == i and f"lm loss: {a['losses'][i - 1][1]:.6E}" in line, (i, line)
    ta = _tensors(tmp_path / "straight" / f"iter_{iters:07d}", tmp_path)
    tb = _tensors(tmp_path / "killed" / f"iter_{iters:07d}", tmp_path)
    assert ta.keys() == tb.keys() and any(k.startswith("optimizer.") for k in ta)
    assert [k for k in ta if not torch.equal(ta[k], tb[k])] == []
    for run in ("straight", "killed"):          # nothing but the run's files: no .pg_* rendezvous files
        names = set(os.listdir(tmp_path / run))
        assert names == {"latest_checkpointed_iteration.txt", "summary.json", "loss.png", "precision.json"} | {
            f"iter_{i:07d}" for i in range(2, iters + 1, 2)}, names
    return a, b


def test_sigkill_and_resume_is_bit_identical_stabilizers_one_rank(tmp_path, corpus):
    """quartet2-plus: stochastic rounding (MS-EDEN) and both stabilizers, on the corpus data path."""
    a, b = _kill_and_resume(tmp_path, [*corpus, "--nvfp4-recipe", "quartet2-plus", *STABILIZERS], 1, seed=1)
    assert a["oscireset_events"] and a["oscireset_events"] == b["oscireset_events"]
    assert len(a["outcontrol"]) == 8 and a["outcontrol"] == b["outcontrol"]


@pytest.mark.slow
def test_sigkill_and_resume_is_bit_identical_quartet2_bf16_one_rank(tmp_path):
    _kill_and_resume(tmp_path, ["--mock-data", "--nvfp4-recipe", "quartet2", "--bf16"], 1, seed=2)


def test_sigkill_and_resume_is_bit_identical_two_ranks(tmp_path, corpus):
    """DP=2 with the distributed optimizer (sharded optimizer state, OsciReset state per rank) and
    tetrajet2-full (SR after RHT-16, both stabilizers), through torchrun."""
    a, b = _kill_and_resume(tmp_path, [*corpus, "--nvfp4-recipe", "tetrajet2-full", *STABILIZERS,
                                       "--use-distributed-optimizer"], 2, seed=3)
    assert a["world_size"] == 2 and a["layout"]["dp"] == 2 and a["oscireset_events"]
    assert sorted(n for n in os.listdir(tmp_path / "killed" / "iter_0000008") if "oscireset" in n) == [
        "nvfp4_oscireset_rank00000.pt", "nvfp4_oscireset_rank00001.pt"]


SAVE_STAGES = ["partial", "written", "renamed", "tracked"]


@pytest.mark.parametrize("stage", [pytest.param(s, marks=() if s == "written" else pytest.mark.slow)
                                   for s in SAVE_STAGES])
def test_sigkill_during_a_save_never_harms_the_previous_checkpoint(tmp_path, stage):
    """Killed (SIGKILL) at a stage of the save of iteration 4: the checkpoint of iteration 2 stays
    byte for byte what it was, the tracker names the newest complete checkpoint, and a resumed run
    loads it, cleans the unfinished save away and trains on as the killed run did."""
    save = tmp_path / "run"
    flags = ["--mock-data", "--nvfp4-recipe", "quartet2", "--train-iters", 6, "--save-interval", 2]
    env = dict(ENV, MEGATRON_FP4_TEST_SAVE_PAUSE=f"4:{stage}")
    before = {}

    def snapshot(line):
        if "saved checkpoint at iteration 2 " in line:
            before.update(_digest(save / "iter_0000002"))

    rc, out = _kill_when(_start(_argv(save, *flags), env), f"nvfp4 test: save stage {stage} (iteration 4)",
                         on_line=snapshot)
    assert rc == -signal.SIGKILL, out[-3000:]
    assert before and _digest(save / "iter_0000002") == before
    expected = 4 if stage == "tracked" else 2
    assert int((save / "latest_checkpointed_iteration.txt").read_text()) == expected
    assert (save / "iter_0000004").is_dir() == (stage in ("renamed", "tracked"))
    leftovers = sorted(n for n in os.listdir(save) if n.startswith("."))
    assert leftovers == ([".iter_0000004.partial"] if stage in ("partial", "written") else []), leftovers
    # without --load the folder is refused; with it the run resumes from the tracker's checkpoint
    rc, refused = _run(_argv(save, *flags))
    assert rc == 2 and "--load" in refused and "--overwrite" in refused, refused[-2000:]
    rc, resumed = _run(_argv(save, *flags, "--load", save))
    assert rc == 0, resumed[-3000:]
    assert f"iteration {expected} of 6" in resumed
    assert not [n for n in os.listdir(save) if n.startswith(".")]
    killed_losses = {int(ln.split("/")[0].split()[-1]): ln.split("lm loss: ")[1].split(" ")[0]
                     for ln in out.splitlines() if ln.startswith(" iteration ")}
    for i in range(expected + 1, 5):     # iterations the killed run had already trained: the same losses
        assert f" iteration {i:6d}/     6 | " in resumed and f"lm loss: {killed_losses[i]}" in resumed
    summary = _strict_json(save / "summary.json")
    assert summary["finished"] and summary["iterations"] == 6 and summary["resumed_from"] == expected


def test_save_folder_with_a_checkpoint_is_refused_unless_resumed_or_overwritten(tmp_path):
    from megatron_fp4.errors import UsageError
    from megatron_fp4.megatron import checkpoint
    save = tmp_path / "run"
    checkpoint.check_save_folder(str(save), None, False)               # no folder yet: fine
    (save / "iter_0000003").mkdir(parents=True)
    with pytest.raises(UsageError, match=r"iter_0000003 .*--load .*--overwrite"):
        checkpoint.check_save_folder(str(save), None, False)
    (save / "latest_checkpointed_iteration.txt").write_text("3\n")
    with pytest.raises(UsageError, match="complete checkpoint at iteration 3"):
        checkpoint.check_save_folder(str(save), str(tmp_path / "other"), False)
    checkpoint.check_save_folder(str(save), str(save), False)           # resumes it
    checkpoint.check_save_folder(str(save), None, True)                 # --overwrite
    with pytest.raises(UsageError, match="contradict"):
        checkpoint.check_save_folder(str(save), str(save), True)
    (save / "summary.json").write_text("{}")
    (save / ".iter_0000004.partial").mkdir()
    assert checkpoint.clear_save_folder(str(save)) == ["latest_checkpointed_iteration.txt", "iter_0000003",
                                                      "summary.json"]
    assert checkpoint.remove_leftovers(str(save)) == [".iter_0000004.partial"]
    assert os.listdir(save) == []
    (save / "latest_checkpointed_iteration.txt").write_text("garbage")
    with pytest.raises(UsageError, match="expected an iteration number"):
        checkpoint.read_tracker(str(save))


def finite_before(out, iteration):
    """Every earlier iteration logged a finite loss and grad norm."""
    values = [[float(ln.split(f"{name}: ")[1].split(" ")[0]) for name in ("lm loss", "grad norm")]
              for ln in out.splitlines()
              if ln.startswith(" iteration ") and int(ln.split("/")[0].split()[-1]) < iteration]
    return len(values) == iteration - 1 and all(math.isfinite(x) for pair in values for x in pair)


def test_non_finite_loss_stops_the_run_unless_asked_to_continue(tmp_path):
    """A learning rate of 1e30 blows the weights up after the first update: the run stops at the first
    non-finite loss or grad norm with an error naming the iteration and exit status 1, saving nothing
    of that state; with --no-check-for-nan-in-loss-and-grad it trains on (the loss turns NaN too), and
    the summary is strict JSON."""
    flags = ["--mock-data", "--nvfp4-recipe", "quartet2", "--train-iters", 4, "--lr", 1e30, "--min-lr", 1e30,
             "--lr-warmup-iters", 0, "--clip-grad", 0]
    rc, out = _run(_argv(tmp_path / "stop", *flags))
    assert rc == 1, out[-3000:]
    error = next(ln for ln in out.splitlines() if ln.startswith("megatron_fp4: error: iteration "))
    iteration = int(error.split("iteration ")[1].split(" ")[0])
    logged = next(ln for ln in out.splitlines() if f" iteration {iteration:6d}/" in ln)
    values = {name: float(logged.split(f"{name}: ")[1].split(" ")[0]) for name in ("lm loss", "grad norm")}
    bad = [name for name, value in values.items() if not math.isfinite(value)]
    assert bad and all(f"non-finite {name}" in error or f", {name}" in error for name in bad), (logged, error)
    assert iteration > 1 and finite_before(out, iteration)      # the first non-finite one
    assert "--no-check-for-nan-in-loss-and-grad" in error and "no checkpoint was saved" in error
    assert not (tmp_path / "stop" / "latest_checkpointed_iteration.txt").exists()
    stopped = _strict_json(tmp_path / "stop" / "summary.json")
    assert not stopped["finished"] and stopped["iterations"] == iteration and stopped["error"] == error.split(
        "error: ", 1)[1]
    rc, out = _run(_argv(tmp_path / "on", *flags, "--no-check-for-nan-in-loss-and-grad"))
    assert rc == 0, out[-3000:]
    summary = _strict_json(tmp_path / "on" / "summary.json")
    assert summary["finished"] and summary["iterations"] == 4 and None in [v for _, v in summary["losses"]]  # NaN -> null


def test_time_budget_stop_saves_and_resumes_to_the_end(tmp_path):
    """--nvfp4-time-budget: the run stops after the iteration that crosses it, saves a checkpoint,
    says it did not finish and exits with status 3; the next command with --load finishes the run
    with the losses of an uninterrupted one. Without the flag there is no budget."""
    flags = ["--mock-data", "--nvfp4-recipe", "quartet2", "--train-iters", 4]
    straight = _start(_argv(tmp_path / "straight", *flags))
    rc, out = _run(_argv(tmp_path / "cut", *flags, "--nvfp4-time-budget", 1e-3))
    assert rc == 3, out[-3000:]
    assert ("stopped by time budget (0.001 s of training, --nvfp4-time-budget) at iteration 1 of 4: the run did "
            f"not finish; checkpoint saved to {tmp_path / 'cut'}/iter_0000001; resume with --load {tmp_path / 'cut'}"
            ) in out
    cut = _strict_json(tmp_path / "cut" / "summary.json")
    assert not cut["finished"] and cut["stopped_by"].startswith("time budget") and cut["iterations"] == 1
    rc, out = _run(_argv(tmp_path / "cut", *flags, "--load", tmp_path / "cut"))
    assert rc == 0, out[-3000:]
    rc, straight_out = _finish(straight)
    assert rc == 0, straight_out[-3000:]
    a, b = _strict_json(tmp_path / "straight" / "summary.json"), _strict_json(tmp_path / "cut" / "summary.json")
    assert b["finished"] and b["resumed_from"] == 1 and a["losses"] == b["losses"]
    assert [s["last_iteration"] for s in b["segments"]] == [1, 4]
    # a finished run resumed again has nothing left to do and leaves its files alone
    digest = _digest(tmp_path / "cut")
    rc, out = _run(_argv(tmp_path / "cut", *flags, "--load", tmp_path / "cut"))
    assert rc == 0 and "nothing to train" in out and _digest(tmp_path / "cut") == digest


@pytest.mark.slow
def test_sigterm_with_exit_signal_handler_saves_and_stops(tmp_path):
    flags = ["--mock-data", "--nvfp4-recipe", "quartet2", "--train-iters", 8, "--exit-signal-handler"]
    rc, out = _kill_when(_start(_argv(tmp_path / "run", *flags)), " iteration      2/", sig=signal.SIGTERM)
    assert rc == 3, out[-3000:]
    line = next(ln for ln in out.splitlines() if ln.startswith("stopped by SIGTERM"))
    done = int(line.split("at iteration ")[1].split(" ")[0])
    assert int((tmp_path / "run" / "latest_checkpointed_iteration.txt").read_text()) == done
    rc, out = _run(_argv(tmp_path / "run", *flags, "--load", tmp_path / "run"))
    assert rc == 0 and _strict_json(tmp_path / "run" / "summary.json")["finished"], out[-3000:]


def test_summary_files_are_strict_json_written_atomically(tmp_path):
    from megatron_fp4.pretrain_support import json_safe, write_json
    value = {"a": math.nan, "b": [1.0, math.inf, -math.inf, (2, 3)], "c": torch.tensor(float("nan")),
             "d": {"e": 1.5}}
    assert json_safe(value) == {"a": None, "b": [1.0, None, None, [2, 3]], "c": None, "d": {"e": 1.5}}
    path = tmp_path / "s.json"
    path.write_text("old")
    write_json(str(path), value)
    assert _strict_json(path, schema=False)["b"] == [1.0, None, None, [2, 3]]
    assert os.listdir(tmp_path) == ["s.json"]                           # no temporary file left behind


@pytest.fixture
def megatron_globals():
    from megatron.training.global_vars import unset_global_variables
    unset_global_variables()
    yield
    unset_global_variables()


def test_gpu_route_save_folder_budget_and_strict_summary(tmp_path, monkeypatch, megatron_globals):
    """The GPU route (checked on CPU up to pretrain()): --nvfp4-time-budget becomes Megatron's
    --exit-duration-in-mins (which saves before it exits), a --save folder holding a checkpoint is
    refused unless resumed or --overwrite, and the shared summary writer keeps it strict JSON."""
    from megatron.training import training

    from megatron_fp4.errors import UsageError
    from megatron_fp4.pretrain_support import TrainingHistory, build_config, prepare_gpu_save_folder, write_summary
    save = tmp_path / "run"
    (save / "iter_0000002").mkdir(parents=True)
    (save / "latest_checkpointed_iteration.txt").write_text("2\n")
    tiny = ["--num-layers", "2", "--hidden-size", "128", "--ffn-hidden-size", "256", "--num-attention-heads", "4",
            "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "3",
            "--mock-data", "--save", str(save)]
    args, _ = build_config(tiny + ["--nvfp4-time-budget", "90"])
    assert args.exit_duration_in_mins == 1.5 and not args.nvfp4_overwrite
    with pytest.raises(UsageError, match=r"--load .*--overwrite"):
        prepare_gpu_save_folder(args)
    args.load = str(save)
    prepare_gpu_save_folder(args)                                     # resumes: nothing touched
    assert (save / "iter_0000002").is_dir()
    args.load, args.nvfp4_overwrite = None, True
    prepare_gpu_save_folder(args)
    assert os.listdir(save) == []
    monkeypatch.setattr(training, "training_log", lambda *a, **k: 0)
    history = TrainingHistory(summary_path=None, every=0).install()
    for it, loss in ((1, 3.0), (2, float("nan"))):
        training.training_log({"lm loss": torch.tensor(loss)}, {}, 1e-3, it)
    path = tmp_path / "summary.json"
    write_summary(history, args, str(path), plot=False)
    summary = _strict_json(path)
    assert summary["route"] == "gpu" and summary["losses"] == [[1, 3.0], [2, None]] and summary["finished"] is False
    assert summary["train_iters"] == 3
