"""Side-by-side benchmarks of the decoding engines and their peers."""

from .memory import Bandwidth, measure_bandwidth
from .runner import BenchReport, EngineSummary, run_benchmark

__all__ = ["Bandwidth", "BenchReport", "EngineSummary", "measure_bandwidth", "run_benchmark"]
