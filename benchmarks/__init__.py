"""The benchmark suite (`python -m benchmarks.run`): figures of merit as ratios measured in one run."""
