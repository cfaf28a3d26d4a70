"""On an 8-device CPU mesh (data=2, fsdp=2, tensor=2) the engine gives the tokens of one device.

Runs in a subprocess: the host device count must be set before jax is imported.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

SCRIPT = """
import json
import jax
from agora_jax.models import make_mesh, shard_model
from agora_jax.sampling import Engine, PoolEngine
from test_sampling import GREEDY, PROMPTS, SAMPLED, TOK, make_model

assert jax.device_count() == 8
mesh = make_mesh(data=2, fsdp=2, tensor=2)

def run(mesh):
    place = (lambda m: shard_model(m, mesh)) if mesh is not None else (lambda m: m)
    model, other = place(make_model(0)), place(make_model(1))
    engine = Engine(model, TOK, mesh=mesh)
    pool = PoolEngine([model, other], [TOK, TOK], mesh=mesh)
    outs = {
        "greedy": engine.generate(PROMPTS, GREEDY),
        "sampled": engine.generate(PROMPTS, SAMPLED),
        "stacked": [c for member in pool.generate([PROMPTS, PROMPTS[1:]], GREEDY) for c in member],
        "fused": pool.fused_generate(PROMPTS, GREEDY, weights=[2, 1]),
    }
    sharded = len(model.layers["q"][...].sharding.device_set) if mesh is not None else 1
    return sharded, {k: [[c.tokens, c.logprobs] for cs in v for c in cs] for k, v in outs.items()}

print(json.dumps({"one": run(None), "mesh": run(mesh)}))
"""


@pytest.mark.slow  # ~16 programs compiled, 8 of them for 8 devices
def test_mesh_matches_one_device():
    repo = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(repo), str(repo / "tests")]))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    (one_devices, one), (mesh_devices, meshed) = result["one"], result["mesh"]
    assert one_devices == 1 and mesh_devices == 8
    for case in one:
        for (tokens, logprobs), (mesh_tokens, mesh_logprobs) in zip(one[case], meshed[case]):
            assert tokens == mesh_tokens, case
            np.testing.assert_allclose(logprobs, mesh_logprobs, atol=1e-4, err_msg=case)
