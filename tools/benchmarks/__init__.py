"""The measurements of `tools/bench.py`, which runs them: what they share (`measure`), and the
benchmarks too long to sit in it (`digests`, `distributed`, `training`)."""
