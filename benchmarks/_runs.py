"""What the benchmarks share: reading a run's summary, running launcher commands side by side under a
time limit, each logging to <out>/<name>/log.txt (quality.py, multi_gpu.py), and putting a table into
docs/RESULTS.md between markers (multi_gpu.py, bench_kernels.py)."""
from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Optional


def load_summary(out: str, name: str) -> Optional[dict]:
    """<out>/<name>/summary.json (megatron_fp4/summary.py: the schema both launcher routes write; losses
    as [iteration, loss] pairs); None when the run has no summary yet."""
    from megatron_fp4 import summary
    path = os.path.join(out, name, "summary.json")
    if not os.path.exists(path):
        return None
    return summary.load(path)


@dataclass
class Job:
    name: str
    cmd: list
    env: Optional[dict] = None
    gpus: int = 0            # GPUs of its own (CUDA_VISIBLE_DEVICES), when run_jobs hands GPUs out
    note: str = ""           # shown in the "started" line


def run_jobs(jobs: list, out: str, *, timeout: float, slots: int, gpus: int = 0, cwd: Optional[str] = None,
             on_done: Callable[[Job, object, float], None] = lambda job, rc, seconds: None,
             deadline: Optional[float] = None) -> list:
    """Run the jobs in order, at most `slots` at a time and, with `gpus` > 0, each on GPUs of its own
    (a job that needs more than are free waits; a later one that fits may go first). A job running
    longer than `timeout` seconds is killed; on_done(job, returncode or "timeout", seconds) follows
    every end. At `deadline` (a time.time() value) the jobs still running are killed (returncode
    "deadline") and those not started stay so: they are returned."""
    pending, running, left = list(jobs), {}, []
    free = list(range(gpus))
    while pending or running:
        if deadline is not None and time.time() >= deadline and pending:
            left, pending = left + pending, []
        i = 0
        while i < len(pending) and len(running) < slots:
            job = pending[i]
            if gpus and job.gpus > len(free):
                i += 1
                continue
            pending.pop(i)
            taken = [free.pop(0) for _ in range(job.gpus)] if gpus else []
            env = dict(job.env if job.env is not None else os.environ)
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, taken))
            os.makedirs(os.path.join(out, job.name), exist_ok=True)
            log = open(os.path.join(out, job.name, "log.txt"), "w")
            log.write(" ".join(job.cmd) + "\n")
            log.flush()
            proc = subprocess.Popen(job.cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
            running[job.name] = (job, proc, log, time.time(), taken)
            where = f"GPU {','.join(map(str, taken))}" if gpus else ""
            detail = ", ".join(d for d in (job.note, where) if d)
            print(f"{job.name}: started" + (f" ({detail})" if detail else ""), flush=True)
        time.sleep(0.5)
        for name, (job, proc, log, start, taken) in list(running.items()):
            rc = proc.poll()
            if rc is None and time.time() - start > timeout:
                proc.kill()
                proc.wait()
                rc = "timeout"
            elif rc is None and deadline is not None and time.time() >= deadline:
                proc.kill()
                proc.wait()
                rc = "deadline"
            if rc is None:
                continue
            log.close()
            free.extend(taken)
            del running[name]
            on_done(job, rc, time.time() - start)
    return left


def put_marked_block(path: str, key: str, body: str, heading: str) -> None:
    """Write `body` into the markdown file `path` between `<!-- key:begin -->` and `<!-- key:end -->`,
    replacing what was there; when the markers are missing, append them under `heading` (a '## ...'
    line). The rest of the file is left as it was."""
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    text = open(path).read() if os.path.exists(path) else ""
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text and text.index(begin) < text.index(end):
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + f"\n\n{heading}\n\n" + block + "\n"
    with open(path, "w") as fh:
        fh.write(text)
