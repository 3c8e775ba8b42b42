"""Training (Lightning), evaluation and learning-rate finding on catalog datasets.

``train(cfg) -> RunResult`` is the library function the CLI wraps.
"""

from handlens.train.config import RunConfig, load_config

__all__ = ["RunConfig", "load_config"]
