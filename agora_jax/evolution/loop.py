"""The single-multi evolution loop (docs/method.md §1; §2 when the strategy is `agora`):

    round 0: evaluate every model alone on test; evaluate the collaboration on test
    for r in 1..R:
        collaborate on dev -> distillation data -> distill every model -> evaluate on test

Every unit (collaboration, the members' distillation: each member's, or all of them when they train
stacked, evaluation) is stored when it completes and each generation is checkpointed, so re-running
the same command after a kill continues from the last completed unit. Each unit draws its randomness from (seed, round, unit) alone, so a resumed run
ends with the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import zlib
from typing import Any

import jax
import ml_collections
import tqdm

from agora_jax.evolution import report
from agora_jax.evolution.config import make_task
from agora_jax.evolution.control import compute_matched_control
from agora_jax.evolution.pool_builder import build_pool, member_items, replay_examples
from agora_jax.evolution.distillation import (distill_member, distill_members, distill_pool_logits, distillation_data,
                                              one_architecture, strategy_teachers, student_examples)
from agora_jax.evolution.settings import DistillSettings, EvalSettings, PoolSettings, settings_of
from agora_jax.evolution.store import RunStore
from agora_jax.evolution.validate import validate
from agora_jax.sampling import SamplingParams
from agora_jax.strategies import (DistillExample, Result, Role, Strategy, Turn, make_strategy, read_transcript,
                                  write_transcript)
from agora_jax.pool import Pool
from agora_jax.tasks import Task, evaluate

log = logging.getLogger(__name__)


def unit_rng(seed: int, round_: int, unit: str) -> jax.Array:
    """The randomness of one unit of work, independent of what ran before it."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), round_), zlib.crc32(unit.encode()))


def evolve(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
    """Run (or resume) the evolution described by `config` in `workdir`; returns the results dict.
    `config` is read here only: every layer below gets its typed settings (`settings.settings_of`), the
    task and the strategy their own ConfigDict sections."""
    validate(config)  # every setting, before any model is built or trained
    run = settings_of(config)
    store = RunStore(workdir, run.checkpoint.max_to_keep)
    store.check_config(config)
    task = make_task(config.task)
    pool = build_pool(run.pool, task, store.workdir, seed=run.seed, distill=run.distill, evaluation=run.evaluation,
                      engine=run.engine, mesh=run.mesh, strategy=config.strategy)
    strategy = make_strategy(config.strategy, store.workdir)
    results = {"task": task.name, "strategy": config.strategy.name, "single": {n: [] for n in pool.names},
               "multi": [], "dev_multi": []}

    start = 0
    latest = store.latest_generation()
    if latest is not None:
        params, meta = store.restore_generation(latest, {name: pool.params(name) for name in pool.names})
        for name in pool.names:
            pool.update(name, params[name])
        results = meta["results"]
        _report(store, results)  # a kill may have come between that checkpoint and its reports
        start = latest + 1
        log.info("resuming after generation %d", latest)

    board = report.Board(store.workdir)
    for r in tqdm.tqdm(range(start, run.rounds + 1), desc="rounds", initial=start, total=run.rounds + 1,
                       dynamic_ncols=True):
        pool.generation = r
        examples: list[dict] = []
        if r > 0:
            collab = collaborate(strategy, pool, task, run.seed, store, r)
            examples = [dataclasses.asdict(e) for e in distillation_data(collab, task, run.distill)]
            distill_pool(pool, task, examples, store, r, board, strategy, collab.info, distill=run.distill,
                         evaluation=run.evaluation, slices=run.pool, seed=run.seed)
            results["dev_multi"].append(evaluate(collab.answers, task, "dev").accuracy)
        singles, multi, control = evaluate_round(strategy, pool, task, run.evaluation, run.seed, store, r)
        for name, acc in singles.items():
            results["single"][name].append(acc)
        # None for the rounds of a run begun before the control was part of every evaluation
        results.setdefault("control", [None] * len(results["multi"])).append(control)
        results["multi"].append(multi)
        log.info("round %d: singles %s | collaboration %.3f", r,
                 " ".join(f"{n}={a:.3f}" for n, a in singles.items()), multi)
        store.save_generation(r, {name: pool.params(name) for name in pool.names},
                              {"round": r, "results": results, "seed": run.seed, "distill_data": examples})
        _report(store, results)
        board.round(r, results)
    board.close()
    store.close()
    return report.load_results(store.workdir)


def _report(store: RunStore, results: dict[str, Any]) -> None:
    """`results.json` and the report rendered from it."""
    report.write_results(store.workdir, results)
    report.render(store.workdir)


def collaborate(strategy, pool: Pool, task: Task, seed: int, store: RunStore, r: int) -> Result:
    """The strategy on the dev split (inputs only) in a run of `seed`, stored as a unit: the transcript as
    JSONL, then the answers, info and examples, whose file marks the unit done. A fresh and a resumed
    round both go on with the collaboration read back from the store, so both distill the same one."""
    transcript = _transcripts(store) / f"round{r}_dev.jsonl"
    if store.load_unit(r, "collaboration") is None:
        log.info("round %d: collaborating on dev (%d items)", r, len(task.dev))
        result = strategy.run(pool, task, "dev", unit_rng(seed, r, "collaborate"))
        write_transcript(result.transcript, transcript)
        store.save_unit(r, "collaboration", {"answers": result.answers, "info": result.info,
                                             "examples": [dataclasses.asdict(e) for e in result.examples]})
    saved = store.load_unit(r, "collaboration")
    return Result(answers=saved["answers"], transcript=read_transcript(transcript), info=saved["info"],
                  examples=[DistillExample(**{**e, "targets": None if e["targets"] is None else tuple(e["targets"])})
                            for e in saved["examples"]])


def distill_pool(pool: Pool, task: Task, examples: list[dict], store: RunStore, r: int, board: report.Board,
                 strategy: Strategy, info: dict[str, Any], *, distill: DistillSettings, evaluation: EvalSettings,
                 slices: PoolSettings, seed: int) -> None:
    """Distill every member with `distill.method`, continuing from its round r-1 weights (logit KD's
    teachers may be models `strategy` built for the collaboration, described by its `info`; multi-student
    KD's own outputs are decoded as `evaluation` says; replay draws from the members' `slices` of a
    scratch pool) in a run of `seed`."""
    if distill.method == "logit":
        _distill_logits(pool, [DistillExample(**e) for e in examples], distill, evaluation.max_new_tokens, seed,
                        store, r, board, strategy, info)
        return
    mine = [[DistillExample(**e) for e in examples if e["targets"] is None or member.name in e["targets"]]
            for member in pool.members]
    if distill.method == "multi_student":
        own, scores = dev_singles(pool, task, evaluation, seed, store, r)
        mine = student_examples(mine, own, scores, task.dev, seed=seed + r)
    if distill.replay:  # rehearsal: a share of each member's own training data
        mine = [m + replay_examples(member_items(slices, task, i, seed), round(distill.replay * len(m)),
                                    _unit_seed(seed, r, f"replay/{i}"))
                for i, m in enumerate(mine)]
    seeds = [_unit_seed(seed, r, f"distill/{i}") for i in range(len(pool))]
    done = [store.load_member(r, name, pool.params(name)) for name in pool.names]
    members = pool.members
    if (distill.stack_students and len(pool) > 1 and any(d is None for d in done)
            and one_architecture([m.model for m in members], [m.tokenizer for m in members])):
        # one stacked program trains every member (a resumed round retrains the whole stack, which
        # gives the saved members' very weights again, so the others come out as uninterrupted)
        log.info("round %d: distilling %d members stacked on %s examples", r, len(pool),
                 "/".join(str(len(m)) for m in mine))
        trained, losses = distill_members([m.model for m in members], members[0].tokenizer, mine, distill,
                                          seeds, progress=f"round {r}: distill {len(pool)} stacked", mesh=pool.mesh)
        for i, member in enumerate(members):
            board.losses(f"distill_loss/round{r}/{member.name}", losses[i])
            if done[i] is None:
                store.save_member(r, member.name, trained[i])
                done[i] = trained[i]
    for i, member in enumerate(members):
        if done[i] is None:
            log.info("round %d: distilling %s on %d examples", r, member.name, len(mine[i]))
            done[i], losses = distill_member(member.model, member.tokenizer, mine[i], distill, seed=seeds[i],
                                             progress=f"round {r}: distill {member.name}", mesh=pool.mesh)
            board.losses(f"distill_loss/round{r}/{member.name}", losses)
            store.save_member(r, member.name, done[i])
        pool.update(member.name, done[i])


def _distill_logits(pool: Pool, examples: list[DistillExample], distill: DistillSettings, max_new_tokens: int,
                    seed: int, store: RunStore, r: int, board: report.Board, strategy: Strategy,
                    info: dict[str, Any]) -> None:
    """Logit KD: every member toward the teachers of the examples addressed to it, all in one stacked
    program, so they are stored together after it (sampled sequences: up to `max_new_tokens`)."""
    done = [store.load_member(r, name, pool.params(name)) for name in pool.names]
    if any(d is None for d in done):
        log.info("round %d: logit distillation of %d members on %d examples", r, len(pool), len(examples))
        mine = [[e for e in examples if e.targets is None or m.name in e.targets] for m in pool.members]
        done, losses = distill_pool_logits(pool.members, mine, strategy_teachers(strategy, pool, info, examples),
                                           distill, _unit_seed(seed, r, "distill"), max_new_tokens,
                                           progress=f"round {r}: logit KD")
        for name, member_losses in zip(pool.names, losses):
            board.losses(f"distill_loss/round{r}/{name}", member_losses)
        for name, params in zip(pool.names, done):
            store.save_member(r, name, params)
    for name, params in zip(pool.names, done):
        pool.update(name, params)


def dev_singles(pool: Pool, task: Task, evaluation: EvalSettings, seed: int, store: RunStore,
                r: int) -> tuple[list[list[str]], list[float]]:
    """Every member's own answers on dev (greedy, as evaluated) and its dev accuracy: the inputs of
    multi-student KD. Stored as a unit, so a resumed round uses the same outputs."""
    saved = store.load_unit(r, "dev_singles")
    if saved is not None:
        return saved["outputs"], saved["scores"]
    texts = _singles(pool, task.dev, evaluation, seed)
    scores = [evaluate(t, task, "dev").accuracy for t in texts]
    store.save_unit(r, "dev_singles", {"outputs": texts, "scores": scores})
    return texts, scores


def _singles(pool: Pool, items, evaluation: EvalSettings, seed: int) -> list[list[str]]:
    """Each member's answer to each item alone, in one batched call (evaluation decoding); greedy, a
    member with the same weights as an earlier one (a pool of copies before distillation) gives that
    one's answers."""
    params = SamplingParams(temperature=evaluation.temperature, max_new_tokens=evaluation.max_new_tokens, seed=seed)
    outs = pool.each_model(items, lambda rows: pool.generate([(m, ex.messages) for m, ex in rows], params),
                           distinct=params.temperature == 0)
    return [[o[0].text for o in member_outs] for member_outs in outs]


def _unit_seed(seed: int, r: int, unit: str) -> int:
    return int(jax.random.randint(unit_rng(seed, r, unit), (), 0, 2**31 - 1))


def evaluate_round(strategy, pool: Pool, task: Task, evaluation: EvalSettings, seed: int, store: RunStore,
                   r: int) -> tuple[dict[str, float], float, dict[str, Any] | None]:
    """Every member alone (decoded as `evaluation` says: greedy, one batched call), the collaboration, and
    the compute-matched control (each member's majority over as many samples per item as the
    collaboration generated), on test, in a run of `seed`."""
    saved = store.load_unit(r, "evaluation")
    if saved is not None:
        return saved["single"], saved["multi"], saved.get("control")
    test = task.test
    singles = {}
    turns = []
    for name, texts in zip(pool.names, _singles(pool, test, evaluation, seed)):
        singles[name] = evaluate(texts, task, "test").accuracy
        turns += [Turn(ex.id, name, 0, Role.SINGLE, ex.messages, t) for ex, t in zip(test, texts)]
    collab = strategy.run(pool, task, "test", unit_rng(seed, r, "evaluate"))
    multi = evaluate(collab.answers, task, "test").accuracy
    control, control_turns = compute_matched_control(pool, task, collab.transcript, strategy.config.sampling,
                                                     unit_rng(seed, r, "control"))
    write_transcript(turns + collab.transcript + control_turns, _transcripts(store) / f"round{r}_test.jsonl")
    store.save_unit(r, "evaluation", {"single": singles, "multi": multi, "control": control})
    return singles, multi, control


def _transcripts(store: RunStore) -> pathlib.Path:
    path = store.workdir / "transcripts"
    path.mkdir(exist_ok=True)
    return path

