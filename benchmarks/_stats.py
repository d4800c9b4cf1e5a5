"""Small-sample statistics for the quality benchmark (no scipy): Student-t quantiles and paired
confidence intervals over seeds.

The t distribution's two-sided probability A(t | n) = P(|T| <= t) for integer degrees of freedom n
has a closed form (Abramowitz & Stegun 26.7.3-4), with theta = atan(t / sqrt(n)):
    n odd:  A = (2 / pi) (theta + sin(theta) cos(theta) (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ... up to cos^(n-3)))
            (n = 1: A = 2 theta / pi)
    n even: A = sin(theta) (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ... up to cos^(n-2))
Quantiles invert it by bisection (A is increasing in t).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence


def t_two_sided(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer df >= 1."""
    if df < 1 or int(df) != df:
        raise ValueError(f"degrees of freedom must be a positive integer, got {df}")
    if t <= 0:
        return 0.0
    if math.isinf(t):
        return 1.0
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2 == 1:
        if df == 1:
            return 2 * theta / math.pi
        term, total = 1.0, 1.0
        for k in range(1, (df - 3) // 2 + 1):       # (2*4*...*2k) / (3*5*...*(2k+1)) cos^(2k)
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        return (2 / math.pi) * (theta + math.sin(theta) * math.cos(theta) * total)
    term, total = 1.0, 1.0
    for k in range(1, (df - 2) // 2 + 1):           # (1*3*...*(2k-1)) / (2*4*...*2k) cos^(2k)
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return math.sin(theta) * total


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t (p in (0.5, 1)), e.g. t_quantile(0.975, 2) = 4.3027."""
    if not 0.5 < p < 1.0:
        raise ValueError(f"quantile level must be in (0.5, 1), got {p}")
    target = 2 * p - 1
    lo, hi = 0.0, 1.0
    while t_two_sided(hi, df) < target:
        hi *= 2
    for _ in range(200):                             # to the last bit of a double
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if t_two_sided(mid, df) < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def mean_ci(values: Sequence[float], level: float = 0.95) -> dict:
    """Mean, sample standard deviation and the t interval mean +- t_{(1+level)/2, n-1} sd / sqrt(n);
    with one value the interval is unknown (half-width None)."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "half": None, "lo": None, "hi": None}
    mean = sum(xs) / n
    if n == 1:
        return {"n": 1, "mean": mean, "sd": None, "half": None, "lo": None, "hi": None}
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "half": half, "lo": mean - half, "hi": mean + half}


def paired_ci(a: dict, b: dict, level: float = 0.95) -> dict:
    """The interval of mean(a[s] - b[s]) over the seeds s both have (a, b: seed -> value); the seeds
    used are listed under "seeds"."""
    seeds = sorted(set(a) & set(b))
    out = mean_ci([a[s] - b[s] for s in seeds], level)
    out["seeds"] = seeds
    return out


def verdict(ci: dict, reference_gap: Optional[float], negligible: float = 0.3) -> str:
    """How a difference's interval reads: 'below 0' / 'above 0' when it excludes zero, 'no difference
    at this scale' when it holds zero and is narrower than `negligible` x the reference gap (NVIDIA's
    mean gap to BF16), else 'unresolved'."""
    if ci.get("half") is None:
        return "unresolved (fewer than 2 seeds)"
    if ci["hi"] < 0:
        return "below 0"
    if ci["lo"] > 0:
        return "above 0"
    if reference_gap is not None and reference_gap > 0 and ci["hi"] - ci["lo"] < negligible * reference_gap:
        return "no difference at this scale"
    return "unresolved"
