"""smolthink: teach small language models to think before they answer (SFT + GRPO from verifiable rewards)."""
__version__ = "0.1.0"
