"""Export the members of a run's generation in the ecosystem's formats (vLLM, lm-eval-harness, PEFT):

    python launch/export.py WORKDIR [--generation R] [--out DIR]

writes every member of generation R (default: the latest) as a Hugging Face directory `DIR/<member>/`
(config.json, model.safetensors, the tokenizer files with its chat template) that
`transformers.AutoModelForCausalLM.from_pretrained` loads; DIR defaults to WORKDIR/export/generation<R>.
When the run distilled with LoRA (`config.distill.lora_rank > 0`) and R > 0, round R's adapter also
leaves as a PEFT adapter directory `DIR/<member>-lora/` whose base is generation R-1, written as
`DIR/<member>-generation<R-1>/`:

    base = AutoModelForCausalLM.from_pretrained("DIR/m0-generation1")
    member = peft.PeftModel.from_pretrained(base, "DIR/m0-lora")      # the same logits as DIR/m0

The trainer merges each round's adapter into the weights the generation checkpoint keeps, so the
adapter is recovered from the two generations: the rank-r factors of their difference
(`agora_jax.distill.lora.factor`), checked to reproduce generation R up to the weights' rounding.
Without generation R-1 (`checkpoint.max_to_keep`) the members are exported with a warning, no adapter.
A workdir that is not a run, or a missing or damaged generation, is one `error:` line and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without install

import jax.numpy as jnp  # noqa: E402  (after the path insert)
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from flax import traverse_util  # noqa: E402

from agora_jax.distill.lora import LoRAConfig, factor  # noqa: E402
from agora_jax.evolution.config import make_task  # noqa: E402
from agora_jax.evolution.distillation import trainer_config  # noqa: E402
from agora_jax.evolution.errors import USER_ERRORS  # noqa: E402
from agora_jax.evolution.pool_builder import build_pool  # noqa: E402
from agora_jax.evolution.settings import settings_of  # noqa: E402
from agora_jax.evolution.store import RunStore  # noqa: E402
from agora_jax.pool import Member, load_params_into, params_of  # noqa: E402
from agora_jax.models import save_hf  # noqa: E402
from agora_jax.models.export import save_peft_adapter  # noqa: E402


class ExportError(ValueError):
    """What makes a workdir's generation impossible to export (not a run, no such generation, ...)."""


def run_config(workdir: pathlib.Path) -> ml_collections.ConfigDict:
    """The config the run in `workdir` recorded (`RunStore.check_config`)."""
    path = workdir / "config.json"
    if not path.is_file():
        raise ExportError(f"{workdir} is not a run: it has no config.json")
    try:
        return ml_collections.ConfigDict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise ExportError(f"{path}: corrupt ({e})") from None


def export(workdir: str | pathlib.Path, generation: int | None = None,
           out: str | pathlib.Path | None = None) -> list[pathlib.Path]:
    """Write generation `generation` (default: the latest) of the run in `workdir` to `out` (default
    WORKDIR/export/generation<R>): each member's HF directory, and with LoRA its adapter and the
    adapter's base (generation R-1). Everything is restored and checked before anything is written.
    Returns the directories written."""
    workdir = pathlib.Path(workdir)
    config = run_config(workdir)  # before RunStore, which would make a non-run directory look like one
    store = RunStore(workdir)
    try:
        latest = store.latest_generation()
        if latest is None:
            raise ExportError(f"{workdir}: no generation is checkpointed yet")
        r = latest if generation is None else generation
        if not 0 <= r <= latest:
            raise ExportError(f"--generation={r}: {workdir} has generations 0..{latest}")
        run = settings_of(config)
        pool = build_pool(run.pool, make_task(config.task), store.workdir, seed=run.seed, distill=run.distill,
                          evaluation=run.evaluation, engine=run.engine, mesh=run.mesh, strategy=config.strategy)
        like = {m.name: params_of(m.model) for m in pool.members}
        params, _ = store.restore_generation(r, like)
        lora = trainer_config(run.distill, seed=0).lora
        previous = _adapter_base(store, r, like) if lora is not None and r > 0 else None
        adapters = {m.name: round_adapters(previous[m.name], params[m.name], lora, f"member {m.name}")
                    for m in pool.members} if previous is not None else {}
    finally:
        store.close()
    out = pathlib.Path(out) if out is not None else workdir / "export" / f"generation{r}"
    written = [_save(m, params[m.name], out / m.name) for m in pool.members]
    for m in pool.members:
        if m.name in adapters:
            base = _save(m, previous[m.name], out / f"{m.name}-generation{r - 1}")
            written += [base, save_peft_adapter(m.model.config, adapters[m.name], lora.alpha, out / f"{m.name}-lora",
                                                str(base.absolute()), lora.dropout)]
    return written


def _adapter_base(store: RunStore, r: int, like: dict) -> dict | None:
    """Generation r-1, the base of round r's adapter; None, with a warning, when it cannot be restored
    (`checkpoint.max_to_keep` dropped it): the members still leave, merged."""
    try:
        return store.restore_generation(r - 1, like)[0]
    except IOError as e:
        print(f"warning: no PEFT adapter for generation {r}: its base, generation {r - 1}, is not restorable "
              f"({' '.join(str(e).split())})", file=sys.stderr)
        return None


def _save(member: Member, params: dict, directory: pathlib.Path) -> pathlib.Path:
    load_params_into(member.model, params)
    return save_hf(member.model, directory, member.tokenizer)


def round_adapters(before: dict, after: dict, lora: LoRAConfig, what: str) -> dict[str, dict[str, np.ndarray]]:
    """The LoRA adapter a round merged into a member (`before` -> `after`, pure param dicts): the
    rank-`lora.rank` factors of each target's update. Refused unless it is one: every other weight
    unchanged, and each target's factors reproducing `after` within 2 eps ||after|| (Frobenius; the
    merge rounded every weight once, by at most eps/2 of it, so a true rank-r update is well inside)."""
    flat_before, flat_after = traverse_util.flatten_dict(before), traverse_util.flatten_dict(after)
    targets = {("layers", t) for t in lora.targets}
    changed = [".".join(k) for k in flat_before
               if k not in targets and not np.array_equal(flat_before[k], flat_after[k])]
    if changed:
        raise ExportError(f"{what}: {', '.join(changed)} changed in the round, which LoRA on "
                          f"{', '.join(lora.targets)} never does: not a LoRA generation")
    adapters = {}
    for key in sorted(targets):
        old, new = np.asarray(flat_before[key], np.float64), np.asarray(flat_after[key], np.float64)
        adapters[key[1]] = ab = factor(new - old, lora.rank, lora.scale)
        residual = np.linalg.norm(new - old - lora.scale * ab["a"].astype(np.float64) @ ab["b"])
        tolerance = 2 * float(jnp.finfo(flat_after[key].dtype).eps) * np.linalg.norm(new)
        if residual > tolerance:
            raise ExportError(f"{what}: the round's update of {key[1]} is not of rank {lora.rank} (residual "
                              f"{residual:.3g} > {tolerance:.3g}): not a LoRA generation")
    return adapters


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=pathlib.Path, help="the run's --workdir")
    parser.add_argument("--generation", type=int, default=None, help="R (default: the latest)")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="default: WORKDIR/export/generation<R>")
    args = parser.parse_args(argv)
    try:
        written = export(args.workdir, args.generation, args.out)
    except (ExportError, *USER_ERRORS) as e:  # USER_ERRORS: what launch/main.py reports as one line too
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, however orbax words it
        return 1
    print("\n".join(map(str, written)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
