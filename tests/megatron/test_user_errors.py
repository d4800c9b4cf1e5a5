"""User mistakes on the launcher's two routes come back as one line naming the flag or file and the
fix (no traceback), exit status 2, from global rank 0 only, before any model is built and (GPU route)
before Megatron prints its argument table; --nvfp4-debug-errors / MEGATRON_FP4_DEBUG=1 give the
traceback back. Nothing here trains: every argv fails in validation."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from megatron_fp4 import pretrain_gpt
from megatron_fp4.errors import UsageError
from megatron_fp4.registry import RecipeError

pytestmark = pytest.mark.timeout(240)

ENV = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
ARG_TABLE = "------------------------ arguments ------------------------"   # Megatron's argument dump


def _error_lines(stderr: str) -> list:
    """stderr lines that are not the environment's import-time noise (torch's CUDA-runtime notice)."""
    return [l for l in stderr.splitlines() if l.strip() and "No CUDA runtime is found" not in l]


def _small_corpus(root, files=3, lines=5):
    src = root / "src"
    src.mkdir()
    for i in range(files):
        (src / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" * lines)
    return src


def _cpu_cli(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        pretrain_gpt.cli(["--nvfp4-cpu", *argv])
    captured = capsys.readouterr()
    return exc.value.code, captured


# (argv, words the one line must contain). Every case fails before a process group or model exists.
CPU_CASES = [
    (["--seq-length", "0"], ["--seq-length", ">= 1"]),
    (["--hidden-size", "100", "--num-attention-heads", "3"], ["--hidden-size 100", "--num-attention-heads 3"]),
    (["--hidden-size", "200", "--num-attention-heads", "4"], ["decoder.layers.0.self_attention.linear_qkv",
                                                               "multiple of 16", "--nvfp4-bf16-modules"]),
    (["--data-path", "/nonexistent/corpus/train"], ["--data-path /nonexistent/corpus/train", ".idx not found"]),
    (["--mock-data", "--data-path", "x"], ["--mock-data cannot be combined with --data-path"]),
    (["--nvfp4-override", "eden_group=[16"], ["--nvfp4-override 'eden_group=[16'", "not valid YAML"]),
    (["--nvfp4-override", "eden_group=7"], ["--nvfp4-override eden_group=7", "knob 'eden_group'", "recipe 'quartet2'"]),
    (["--nvfp4-recipe", "nope"], ["--nvfp4-recipe nope", "unknown recipe", "tetrajet2-full"]),
    (["--fp8-format", "e4m3"], ["--fp8-format e4m3", "drop --fp8-format"]),
    (["--num-experts", "8"], ["--num-experts 8", "MoE"]),
    (["--transformer-impl", "transformer_engine"], ["--transformer-impl transformer_engine", "--transformer-impl local"]),
    (["--lr-decay-style", "linear"], ["--lr-decay-style", "CPU driver", "GPU"]),
    (["--overlap-moe-expert-parallel-comm"], ["--overlap-moe-expert-parallel-comm", "Megatron flag the CPU driver"]),
    (["--seq-lenght", "64"], ["unrecognized argument --seq-lenght", "did you mean --seq-length"]),
    (["--seq-length", "abc"], ["--seq-length", "invalid int value"]),
    (["--nvfp4-bf16-modules", "decoder.layer.0.*"], ["'decoder.layer.0.*' matches no linear",
                                                    "decoder.layers.{0..3}.{self_attention.linear_qkv"]),
    (["--num-layers", "6", "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "2"],
     ["--num-layers 6", "multiple of 4"]),
    (["--bf16", "--nvfp4-fp32"], ["--bf16 and --nvfp4-fp32"]),
    (["--nvfp4-corpus-src", "/nonexistent/src"], ["--nvfp4-corpus-src /nonexistent/src", "not found"]),
    (["--" + "mfp4-recipe=nvidia"], ["--" + "mfp4-recipe was renamed to --nvfp4-recipe"]),   # the earlier prefix
]


@pytest.mark.parametrize("argv, words", CPU_CASES, ids=[" ".join(a) for a, _ in CPU_CASES])
def test_cpu_route_user_errors_are_one_line(argv, words, capsys, tmp_path):
    code, captured = _cpu_cli(["--save", str(tmp_path / "run"), *argv], capsys)
    lines = _error_lines(captured.err)
    assert code == 2 and len(lines) == 1, captured.err
    assert lines[0].startswith("megatron_fp4: error: ") and "Traceback" not in captured.err
    for word in words:
        assert word in lines[0], lines[0]
    assert not (tmp_path / "run").exists()        # nothing started


def test_sequence_parallel_length_and_one_file_corpus(capsys, tmp_path, monkeypatch):
    # under torchrun's environment (world 2) the SP split is checked before the rendezvous
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    code, captured = _cpu_cli(["--mock-data", "--tensor-model-parallel-size", "2", "--sequence-parallel",
                               "--seq-length", "101"], capsys)
    assert code == 2 and "--seq-length 101 must be divisible by --tensor-model-parallel-size 2" in captured.err
    monkeypatch.delenv("WORLD_SIZE")
    one = tmp_path / "one"
    one.mkdir()
    (one / "only.py").write_text("x = 1\n" * 50)
    code, captured = _cpu_cli(["--nvfp4-corpus-src", str(one), "--save", str(tmp_path / "run")], capsys)
    line, = _error_lines(captured.err)
    assert code == 2 and f"--nvfp4-corpus-src {one}: only one text file (only.py)" in line and "--data-path" in line


def test_debug_switch_gives_the_traceback_back(monkeypatch, capsys):
    with pytest.raises(RecipeError, match="--nvfp4-recipe nope"):
        pretrain_gpt.cli(["--nvfp4-cpu", "--nvfp4-recipe", "nope", "--nvfp4-debug-errors"])
    monkeypatch.setenv("MEGATRON_FP4_DEBUG", "1")
    with pytest.raises(UsageError, match="--seq-length must be >= 1"):
        pretrain_gpt.cli(["--nvfp4-cpu", "--seq-length", "0"])
    assert "megatron_fp4: error" not in capsys.readouterr().err


def test_sequence_longer_than_the_corpus_split(tmp_path):
    """A real run: the corpus is built, then the validation split is found shorter than one sequence
    (it used to fail as numpy's `ValueError: high <= 0`)."""
    src = _small_corpus(tmp_path, files=3, lines=2)
    proc = subprocess.run([sys.executable, "-m", "megatron_fp4.pretrain_gpt", "--nvfp4-cpu", "--nvfp4-corpus-src",
                           str(src), "--save", str(tmp_path / "run"), "--seq-length", "512",
                           "--max-position-embeddings", "512", "--threads", "1"],
                          capture_output=True, text=True, timeout=200, env=ENV)
    lines = _error_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("megatron_fp4: error: --seq-length 512: the ") and "lower --seq-length" in lines[0]


def test_one_rank_reports_under_torchrun_environment(tmp_path):
    """Two real processes with torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR): both exit 2 before
    the rendezvous, only global rank 0 prints the line."""
    base = dict(ENV, WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29555")
    cmd = [sys.executable, "-m", "megatron_fp4.pretrain_gpt", "--nvfp4-cpu", "--mock-data",
           "--save", str(tmp_path / "run"), "--nvfp4-bf16-modules", "layers.9.*"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(base, RANK=str(r), LOCAL_RANK=str(r))) for r in (0, 1)]
    outs = [p.communicate(timeout=200) for p in procs]
    assert [p.returncode for p in procs] == [2, 2], outs
    rank0, rank1 = (_error_lines(err) for _, err in outs)
    assert len(rank0) == 1 and "--nvfp4-bf16-modules: pattern 'layers.9.*' matches no linear" in rank0[0], outs[0]
    assert rank1 == [], outs[1]


_GPU_ROUTE = textwrap.dedent("""
    # the launcher's GPU route (megatron.training) on a CPU machine: every case fails in argument
    # validation, before pretrain() would need CUDA
    import contextlib, io, json, sys
    from megatron_fp4 import pretrain_gpt
    pretrain_gpt.use_gpu_route = lambda argv: True
    results = []
    for argv in json.loads(sys.argv[1]):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                pretrain_gpt.cli(argv)
                code = 0
            except SystemExit as exc:
                code = exc.code
        results.append({"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
    print("RESULTS " + json.dumps(results))
""")

GPU_CASES = [
    (["--nvfp4-recipe", "nope"], ["--nvfp4-recipe nope", "unknown recipe"]),
    (["--nvfp4-bf16-modules", "decoder.layer.0.*"], ["matches no linear", "decoder.layers.{0..3}"]),
    (["--hidden-size", "100", "--num-attention-heads", "3"], ["--hidden-size 100 is not divisible"]),
    (["--transformer-impl", "transformer_engine"], ["--transformer-impl local"]),
    (["--spec", "megatron_fp4.spec", "gpt_layer_spec"], ["--spec", "drop --spec"]),
    (["--seq-lenght", "64"], ["unrecognized arguments: --seq-lenght", "Megatron's argument parser"]),
    (["--nvfp4-override", "eden_group=7"], ["--nvfp4-override eden_group=7"]),
    (["--data-path", "/nonexistent/p"], ["--data-path /nonexistent/p", "not found"]),
    (["--seq-length", "0"], ["--seq-length must be >= 1"]),
    (["--cuda-graph-impl", "full_iteration"], ["--cuda-graph-impl full_iteration", "pass --cuda-graph-impl local"]),
    (["--cuda-graph-impl", "local", "--nvfp4-recipe", "tetrajet2-full"], ["OutControl", "tetrajet2-full"]),
    (["--cuda-graph-impl", "transformer_engine"], ["Transformer Engine's CUDA graphs"]),
]


def test_gpu_route_user_errors_come_before_megatrons_argument_table(tmp_path):
    argvs = [["--mock-data", "--save", str(tmp_path / "run"), *a] for a, _ in GPU_CASES]
    argvs[7].remove("--mock-data")                    # the data-path case
    proc = subprocess.run([sys.executable, "-c", _GPU_ROUTE, json.dumps(argvs)], capture_output=True, text=True,
                          timeout=200, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.split("RESULTS ", 1)[1])
    for (argv, words), r in zip(GPU_CASES, results):
        lines = _error_lines(r["stderr"])
        assert r["code"] == 2 and len(lines) == 1, (argv, r)
        assert lines[0].startswith("megatron_fp4: error: ") and ARG_TABLE not in r["stdout"], (argv, r)
        for word in words:
            assert word in lines[0], (argv, lines[0])
