"""benchmarks/_runs.py: jobs get GPUs of their own, never more at once than there are, and a job past
its time limit is killed and reported as such (the commands only print their CUDA_VISIBLE_DEVICES)."""
import os
import sys

from benchmarks import _runs

PRINT_GPUS = [sys.executable, "-c", "import os, time; print('GPUS', os.environ['CUDA_VISIBLE_DEVICES']); "
              "time.sleep(1.0)"]


def _gpus_of(out, name):
    line = [l for l in open(os.path.join(out, name, "log.txt")).read().splitlines() if l.startswith("GPUS")][0]
    return line.split()[1].split(",")


def test_jobs_share_the_gpus_without_overlap(tmp_path):
    out, ends = str(tmp_path), {}
    jobs = [_runs.Job("two", PRINT_GPUS, gpus=2), _runs.Job("a", PRINT_GPUS, gpus=1), _runs.Job("b", PRINT_GPUS, gpus=1)]
    _runs.run_jobs(jobs, out, timeout=60, slots=3, gpus=2,
                   on_done=lambda job, rc, seconds: ends.setdefault(job.name, rc))
    assert ends == {"two": 0, "a": 0, "b": 0}
    assert sorted(_gpus_of(out, "two")) == ["0", "1"]
    assert {_gpus_of(out, "a")[0], _gpus_of(out, "b")[0]} == {"0", "1"}     # side by side, one GPU each


def test_a_job_past_its_limit_is_killed(tmp_path):
    ends = {}
    _runs.run_jobs([_runs.Job("hang", [sys.executable, "-c", "import time; time.sleep(60)"])], str(tmp_path),
                   timeout=1.0, slots=1, on_done=lambda job, rc, seconds: ends.update({job.name: (rc, seconds)}))
    rc, seconds = ends["hang"]
    assert rc == "timeout" and seconds < 10


def test_a_deadline_stops_running_jobs_and_leaves_the_rest(tmp_path):
    """A campaign call ends in time: at the deadline the running job is killed ("deadline") and the
    job never started is returned, for the next command."""
    import time
    ends, t0 = {}, time.time()
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    left = _runs.run_jobs([_runs.Job("first", sleeper), _runs.Job("second", sleeper)], str(tmp_path), timeout=120,
                          slots=1, deadline=time.time() + 2.0,
                          on_done=lambda job, rc, seconds: ends.update({job.name: rc}))
    assert ends == {"first": "deadline"} and [j.name for j in left] == ["second"]
    assert time.time() - t0 < 15 and not os.path.exists(os.path.join(str(tmp_path), "second"))
