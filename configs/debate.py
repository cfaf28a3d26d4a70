"""Multi-agent debate (Du et al. 2023): N agents, R rounds seeing each other's answers, majority vote.

Variants: default (tiny models trained here, synthetic task, CPU minutes), smollm2, qwen2.5-1.5b,
qwen2.5-7b, llama3.1-8b (see agora_jax/evolution/config.py). Usage:
    python launch/main.py --config=configs/debate.py[:variant] [--config.rounds=1 ...]
"""

from agora_jax.evolution.config import base_config
from agora_jax.strategies.debate import defaults


def get_config(variant=None):
    config = base_config(variant, defaults())
    if config.variant == "default":
        # The tiny models trained here know arithmetic, not how to read a discussion: one answer
        # round of 9 agents (3 samples per member). Each member knows its own letters' values; the vote
        # weighted by each answer's probability under its writer follows the member that is sure of an
        # item (an unweighted vote follows the two that guess). Real models debate 2 rounds, majority vote.
        config.strategy.rounds = 1
        config.strategy.num_agents = 9
        config.strategy.select = "confidence"
        # That vote is right on ~90% of dev, so every member learns from it alone (+ replay of its own
        # data); distilling also a member's own answers (multi_student) made members sure of their
        # guesses, which the confidence-weighted vote then follows.
        config.distill.method = "supervised"
        # Room for the evolved collaboration (effect 3): 30% of the problems name two letters, in test and
        # dev two different experts' ("c+x+4="), so at round 0 no member knows both and the collaboration
        # errs on them; letters stand anywhere in a problem, so that a fact passed on by distillation can
        # be recalled wherever it is named. A member that did not fit its own problems trains further.
        config.task.synthetic.pairs = 0.3
        config.task.synthetic.anywhere = True
        config.evaluation.max_new_tokens = 24  # "c=3,x=5,3+5=8,8+4=2" + end of turn
        config.pool.pretrain_check = 0.8
        # Pretraining sized for a run under 6 minutes on 2 CPU cores: 600 steps at 2e-3 (was 800 at 3e-3),
        # members one after another (14% faster than stacked on a CPU, BENCHMARKS.md). Whether a member
        # learns the sums or stalls depends on its slice and start more than on the learning rate (seed 3's
        # m0 stalled at 1e-3, 2e-3 and 3e-3); the check trains a stalled one further. The three effects
        # over five seeds with these settings: docs/experiments.md, session 16.
        config.pool.pretrain_steps = 600
        config.pool.pretrain_learning_rate = 2e-3
        config.distill.stack_students = False
    elif config.variant == "smollm2":
        # one answer round of 6 agents (2 samples per copy) and the majority: round-2 prompts holding
        # three ~70-token answers would double a CPU run
        config.strategy.rounds = 1
        config.strategy.num_agents = 6
        # what the copies learn, label-free: only items where at least 3 of the 6 answers agree, each as
        # the majority's most probable reply (the first sampled chain holding it rambled, and copies
        # distilled on such chains answered worse greedily: docs/experiments.md, session 12)
        config.strategy.target = "likeliest"
        config.distill.filter = "agreement"
        config.distill.min_agreement = 0.5
    return config
