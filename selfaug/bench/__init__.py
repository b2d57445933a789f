"""`selfaug bench` (docs/design.md, "Benchmarks"): the performance figures of the README, measured on the
product's own code. Nothing in the product imports this package; the command line reaches it lazily.

  command.py   the command: runs the sections, prints ratios measured in one run, writes JSON
  worker.py    one measurement in a fresh process (peak memory, saved-for-backward bytes, step time)
  scale.py     ZeRO-3 against ZeRO-2 at real shapes with random weights, on 2 ranks
  cluster.py   a large store opened by many ranks; the reader's throughput
"""
