"""One file per registered evaluator (see :mod:`fusionbench.evaluation`)."""
