"""agora_jax: several language models collaborate, the collaboration is distilled back into each
model, and the improved models collaborate again (single-multi evolution, AGORA group distillation).

Packages, with one-way dependencies:
  models -> sampling -> {tasks, distill, pool} -> strategies -> evolution -> compile
below them all: records (transcript turns, results, training examples), errors, atomic (file writes)
"""

__version__ = "0.1.0"
