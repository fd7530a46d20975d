"""crossrec: LLM-enhanced cross-domain recommendation. The core library; framework-free (no Ray here)."""

__version__ = "0.1.0"
__all__ = ["__version__"]
