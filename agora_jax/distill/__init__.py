"""Distillation: collaborative outputs back into every model (docs/method.md §1 methods 1-3, §2 step 4-5).

    ds = distill_dataset(examples, tokenizer, cfg.data)            # grain, bucketed, host-sharded
    trainer = Trainer(model, cfg, num_steps=len(ds))               # or StackedTrainer(models, ...)
    trainer.fit(ds, checkpointer=Checkpointer(workdir), save_every=50)
    student = trainer.export()                                     # LoRA merged

Training examples are `agora_jax.records.DistillExample` (`records.pair` for a bare prompt and completion).
Modules: data (examples -> batches), losses (chunked CE / KL / JSD), lora (adapters on stacked
layer weights), trainer (config, pure train step, Trainer), stacked (N students in one program),
onpolicy (sample + distil in one jit), mixing (per-student datasets of multi-student KD),
checkpoint (Orbax: state + data iterator + metadata).
"""

from agora_jax.distill.checkpoint import Checkpointer
from agora_jax.distill.data import DataConfig, distill_dataset
from agora_jax.distill.lora import LoRAConfig
from agora_jax.distill.mixing import multi_student_datasets
from agora_jax.distill.onpolicy import OnPolicyTrainer, SamplingConfig, prompt_batch
from agora_jax.distill.stacked import StackedTrainer, teacher_pool
from agora_jax.distill.trainer import DistillConfig, Teacher, Trainer, TrainState

__all__ = [
    "Checkpointer", "DataConfig", "DistillConfig", "LoRAConfig", "OnPolicyTrainer", "SamplingConfig",
    "StackedTrainer", "Teacher", "TrainState", "Trainer", "distill_dataset", "multi_student_datasets", "prompt_batch",
    "teacher_pool",
]
