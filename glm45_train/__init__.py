"""glm45-train: GLM-4.5 / GLM-4.5-Air training on Megatron-Core."""

__version__ = "0.1.0"
