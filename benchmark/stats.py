"""Statistics for `detdeploy bench`: latency summaries, throughput, paired ratios, the schedule.

Pure numpy and the standard library; knows nothing about models or backends.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class LatencyStats:
    """Summary of one series of latencies, in milliseconds (percentiles interpolate linearly
    between order statistics, numpy's default)."""
    count: int
    mean: float
    min: float
    p50: float
    p90: float
    p99: float
    max: float

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(samples_ms: list[float] | np.ndarray) -> LatencyStats:
    values = np.asarray(samples_ms, dtype=np.float64)
    if values.size == 0:
        raise ValueError('no samples to summarize')
    p50, p90, p99 = np.percentile(values, PERCENTILES)
    return LatencyStats(int(values.size), float(values.mean()), float(values.min()), float(p50),
                        float(p90), float(p99), float(values.max()))


def throughput_ips(samples_ms: list[float] | np.ndarray, batch: int) -> float:
    """Images per second over the whole series: images processed / total time."""
    values = np.asarray(samples_ms, dtype=np.float64)
    return float(batch * values.size / (values.sum() / 1e3))


def paired_ratios(samples_ms: list[float], batch: int, baseline_ms: list[float],
                  baseline_batch: int) -> np.ndarray:
    """Per round, this series' time per image over the baseline's time per image in the same
    round (so drift between rounds cancels). For equal batch sizes it is the latency ratio."""
    if len(samples_ms) != len(baseline_ms):
        raise ValueError('paired series must have one sample per round each')
    per_image = np.asarray(samples_ms, dtype=np.float64) / batch
    baseline_per_image = np.asarray(baseline_ms, dtype=np.float64) / baseline_batch
    return per_image / baseline_per_image


def alternating_schedule(config_count: int, rounds: int | None = None,
                         seconds: float | None = None,
                         clock: Callable[[], float] = time.perf_counter
                         ) -> Iterator[tuple[int, int]]:
    """(round, config index) pairs: 0 1 2 ... 0 1 2 ..., complete rounds only.

    Stops after `rounds` rounds, or with `seconds` at the first round boundary once that much
    time has passed since the first pair was handed out (at least one round). Every
    configuration thus has the same number of samples, one per round, so they pair up.
    """
    if (rounds is None) == (seconds is None):
        raise ValueError('give exactly one of rounds and seconds')
    started = clock()
    round_index = 0
    while True:
        if rounds is not None and round_index >= rounds:
            return
        if seconds is not None and round_index > 0 and clock() - started >= seconds:
            return
        for config_index in range(config_count):
            yield round_index, config_index
        round_index += 1
