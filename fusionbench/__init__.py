"""fusionbench: how a vision encoder is fused into a pretrained LM, and what it costs the LM."""

__version__ = "0.1.0"
