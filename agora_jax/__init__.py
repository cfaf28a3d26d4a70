"""agora_jax: several language models collaborate, the collaboration is distilled back into each
model, and the improved models collaborate again (single-multi evolution, AGORA group distillation).

Packages, with one-way dependencies:
  models -> sampling -> {tasks, distill} -> strategies -> evolution
"""

__version__ = "0.1.0"
