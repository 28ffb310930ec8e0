"""sparsedial: serve one elastic sparse LLM at many sparsity tiers."""

__version__ = "0.1.0"
