"""ncbench: a benchmark suite for noisy-correspondence learning in image-text retrieval."""
from ncbench.method import Batch, Context, Method
from ncbench.records_frame import load_records

__all__ = ["Batch", "Context", "Method", "load_records"]
__version__ = "0.1.0"
