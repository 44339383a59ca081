"""The unsupervised domain-adaptation benchmark (``tl.adapt.experiment``). Its building blocks are
in ``tl.nn``, its strategies in ``tl.strategies.adapt``, each run in ``tl.runs``."""
