"""The unbiased pass@k estimator (Chen et al., 2021)."""

from __future__ import annotations


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k) / C(n, k): the chance that k of n samples, c of them correct, hold a correct one.

    Computed as 1 - prod_{i=n-c+1..n} (1 - k/i), which never forms the large binomials.
    """
    if not 0 <= c <= n or k < 1 or k > n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    missing = 1.0
    for i in range(n - c + 1, n + 1):
        missing *= 1.0 - k / i
    return 1.0 - missing


def mean_pass_at_k(counts: list[tuple[int, int]], k: int) -> float:
    """Mean over problems of pass@k from (samples, correct) pairs."""
    return sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)
