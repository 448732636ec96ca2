"""The sharding rules table: logical -> mesh axes, dropped axes, unsharded fraction, the printed table."""


import jax
import pytest
from jax.sharding import PartitionSpec as P

from flexattn_jax import sharding as S
from flexattn_jax.config import FlexConfig, ModelConfig
from flexattn_jax.params import abstract_params


@pytest.fixture(scope="module")
def mesh181():
    return S.make_mesh("data=1,fsdp=8,tensor=1")


@pytest.fixture(scope="module")
def mesh222():
    return S.make_mesh("data=2,fsdp=2,tensor=2")


def test_parse_mesh_spec():
    assert S.parse_mesh_spec("data=2,fsdp=4", 8) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert S.parse_mesh_spec("2,-1,2", 8) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert S.parse_mesh_spec(None, 8) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert S.parse_mesh_spec("fsdp=4", 8)["fsdp"] == 4  # a smaller mesh uses the first devices
    for bad in ("data=3", "pipe=2", "data=-1,fsdp=-1", "data=x"):
        with pytest.raises(S.ShardingError):
            S.parse_mesh_spec(bad, 8)
    mesh = S.make_mesh("data=2,fsdp=4,tensor=1")
    assert mesh.axis_names == S.MESH_AXES and dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert S.make_mesh("fsdp=4").size == 4


def test_rules_and_dropped_axes(mesh181, mesh222):
    assert S.logical_axes("text/layers/attn/q/kernel", 3) == ("layers", "embed", "heads")
    assert S.logical_axes("text/layers/attn/k_hr/kernel", 3) == ("layers", "embed", "kv_heads")
    assert S.logical_axes("unknown/thing", 2) == (None, None)
    assert S.logical_to_spec(("layers", "embed", "heads"), (3, 32, 32), mesh222) == P(None, "fsdp", "tensor")
    # 577 positions do not divide anything, 30 is not a multiple of fsdp=8: dropped for that tensor only
    assert S.logical_to_spec(("positions", "embed"), (577, 1024), mesh181) == P(None, "fsdp")
    assert S.logical_to_spec(("embed", "mlp"), (30, 64), mesh181) == P()
    # batch -> (data, fsdp): a batch of 2 keeps only what divides it
    assert S.logical_to_spec(("batch", None), (8, 5), mesh222) == P(("data", "fsdp"))
    assert S.logical_to_spec(("batch", None), (2, 5), mesh222) == P("data")
    # the same mesh axis is never used twice in one tensor
    assert S.logical_to_spec(("embed", "embed"), (8, 8), mesh181) == P("fsdp")
    assert S.batch_spec(mesh222, (4, 8, 16), batch_dim=1) == P(None, ("data", "fsdp"))


def test_param_shardings_of_tiny_tree(mesh222):
    from tests.fixtures import tiny_config

    abstract = abstract_params(tiny_config())
    shardings = S.param_shardings(abstract, mesh222)
    assert jax.tree.structure(shardings) == jax.tree.structure(abstract)
    q = shardings["text"]["layers"]["attn"]["q"]["kernel"]
    assert q.spec == P(None, "fsdp", "tensor")


def test_7b_unsharded_fraction_and_table(mesh181):
    abstract = abstract_params(ModelConfig(flex=FlexConfig(enabled=True)))
    rows, frac = S.sharding_table(abstract, mesh181)
    assert frac < 0.001  # only norms / biases stay replicated
    by_path = {r["path"]: r for r in rows}
    assert by_path["text/layers/mlp/gate/kernel"]["spec"] == P(None, "fsdp")
    assert by_path["text/embed/embedding"]["shards"] == 8
    out, printed_frac = S.format_sharding_table(abstract, mesh181)
    assert printed_frac == pytest.approx(frac)
    assert "text/layers/attn/q/kernel" in out and "(layers, embed, heads)" in out and "(-, fsdp)" in out
    assert "unsharded (replicated on every device)" in out



def test_constrain_batch_pins_the_batch_under_a_mesh_only():
    """Under a mesh the residual stream is batch-sharded over (data, fsdp) whatever XLA would pick; without
    one (single-device inference) the function is the identity."""
    import jax.numpy as jnp

    x = jnp.ones((8, 4, 2))
    assert S.constrain_batch(x) is x
    mesh = S.make_mesh("data=2,fsdp=4")
    with jax.set_mesh(mesh):
        y = jax.jit(lambda a: S.constrain_batch(a * 2))(x)
        odd = jax.jit(lambda a: S.constrain_batch(a))(jnp.ones((3, 4)))  # 3 rows: no axis divides, left alone
    assert y.sharding.spec[0] == ("data", "fsdp") and float(y.sum()) == 128.0
    assert all(s is None for s in odd.sharding.spec)


@pytest.mark.slow
def test_train_step_memory_does_not_grow_with_the_mesh():
    """One sample per device: per-device temporaries on fsdp=8 stay near those of one device (the activations
    are batch-sharded, :func:`sharding.constrain_batch`): 2.81 against 2.31 MB. Without the constraints XLA
    replicated them (5.65 MB here; 110 GB per chip for the 7B FlexAttention step on a 256-chip v5e slice)."""
    from flexattn_jax.app import aot
    from tests.fixtures import tiny_config

    cfg = tiny_config()
    temps = {}
    for spec in ("fsdp=1", "fsdp=8"):
        mesh = S.make_mesh(spec)
        with jax.set_mesh(mesh):
            low = aot.lower_program(cfg, mesh, "train", batch=mesh.shape["fsdp"], seq_len=64, rows=16)
            temps[spec] = low.compile().memory_analysis().temp_size_in_bytes
    assert temps["fsdp=8"] < 1.5 * temps["fsdp=1"], temps
