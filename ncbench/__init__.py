"""ncbench: a benchmark suite for noisy-correspondence learning in image-text retrieval."""
from ncbench.method import Batch, Context, Method

__all__ = ["Batch", "Context", "Method"]
__version__ = "0.1.0"
