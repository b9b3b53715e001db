"""graftlm: graft reasoning and memory mechanisms onto frozen pretrained causal LMs."""

__version__ = "0.1.0"
