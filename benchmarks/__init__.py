"""Measurements that are not part of the installed package: the evidence report
(`pagedserve bench report` from a source checkout, or `python -m benchmarks.report`) and
one-off timing scripts (`python -m benchmarks.forward_timing`, `python -m benchmarks.decode_timing`).

pyproject.toml installs only pagedserve*; the load generators these build on (workload,
throughput, serve, the transformers baseline) stay in pagedserve.bench.
"""
