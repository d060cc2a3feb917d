"""`mmcl bench`: performance and fidelity measured side by side, never asserted by timed tests.

    mmcl bench perf [--quick] [--out DIR]      -> DIR/perf.json and DIR/perf.md
    mmcl bench fidelity [--quick] [--out DIR]  -> DIR/fidelity.json and DIR/fidelity.md
    mmcl bench sampleopt [--grid] [--compare]  -> does sample optimization beat the defaults
                                                  and random search?

Every figure is a ratio of two things measured in the same run (interleaved, so that load
from other processes hits both sides alike), and every result carries the machine (cores, GPU,
load average before and after), the versions and the settings it was taken with.

Modules: `env` (machine and versions), `timing` (interleaved timing, CPU peak memory from the
torch profiler), `reencode` (the reference code's TupleInfoNCE step, kept here as the baseline
only), `plane` (the Ray Train worker loop whose epochs cycle through batch sources: Ray Data
readers and in-memory tensors), `startup` (the README demo, timed phase by phase),
`encoders_perf` (the Hugging Face encoders' step), `ingest` (`mmcl data import` throughput),
`perf` (the sections, JSON and markdown), `fidelity` (what each objective learns), `sampleopt`
(sample optimization against the defaults and random search). See docs/performance.md and
docs/fidelity.md for the figures.
"""
