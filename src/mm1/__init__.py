"""mm1: pre-train, fine-tune and evaluate multimodal LLMs the way Apple's MM1 paper does."""

__version__ = "0.1.0"
