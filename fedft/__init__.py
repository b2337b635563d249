"""fedft: federated QLoRA fine-tuning of causal language models.

The library is pure Python over torch / transformers / peft and never imports flwr:
the Flower apps in ``clients/`` and ``server/`` are thin shells around it.
"""

__version__ = "0.1.0"
