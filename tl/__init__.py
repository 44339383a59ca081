"""tl: transfer learning for few-shot image classification, run as a distributed workflow on Ray.

The library never parses arguments and never calls ``ray.init``: workflows and tests do that.
"""

from tl.errors import ConfigError, DataError, TLError, WeightsError

__all__ = ["TLError", "ConfigError", "DataError", "WeightsError"]
__version__ = "0.1.0"
