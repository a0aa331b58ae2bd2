"""Mesh construction and the logical-axis rules table."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from automem_jax.parallel import mesh as pmesh


def test_minus_one_takes_the_remaining_devices():
    m = pmesh.make_mesh("tensor=2")
    assert dict(m.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    m = pmesh.make_mesh({"data": -1, "fsdp": 2, "tensor": 1})
    assert dict(m.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    assert pmesh.MeshConfig(data=2, fsdp=-1, tensor=2).axis_sizes(64) == {"data": 2, "fsdp": 16, "tensor": 2}


@pytest.mark.parametrize("spec,msg", [
    ("data=-1,fsdp=3", "not divisible"),
    ("fsdp=3", "use 3 devices but 8"),
    ("data=-1,fsdp=-1", "at most one axis"),
    ("data=2,fsdp=2,tensor=4", "use 16 devices but 8"),
    ("model=2", "expected comma-separated axis=size"),
    ("fsdp=two", "must be an integer"),
])
def test_bad_mesh_specs_are_explained(spec, msg):
    with pytest.raises(ValueError, match=msg):
        pmesh.make_mesh(spec)


def test_unknown_mesh_field():
    with pytest.raises(ValueError, match="unknown field"):
        pmesh.MeshConfig.from_any({"fsdp": 2, "pipeline": 2})


def test_rules_map_logical_names():
    shape = {"data": 2, "fsdp": 4, "tensor": 2}
    assert pmesh.logical_to_spec(("embed", "heads", "head_dim"), (64, 4, 16), shape) == P("fsdp", "tensor")
    assert pmesh.logical_to_spec(("batch", "length", "act_embed"), (16, 8, 64), shape) == P(("data", "fsdp"))
    # A dimension the mesh does not divide is replicated, not an error (2 KV heads on tensor=4).
    assert pmesh.logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 2, 16),
                                 {"data": 1, "fsdp": 2, "tensor": 4}) == P("fsdp")
    # A mesh axis is used once per array: vocab takes tensor, embed takes fsdp.
    assert pmesh.logical_to_spec(("vocab", "embed"), (512, 64), shape) == P("tensor", "fsdp")
    with pmesh.use_rules([("embed", "tensor"), ("vocab", None)]):
        assert pmesh.logical_to_spec(("vocab", "embed"), (512, 64), shape) == P(None, "tensor")
    with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
        pmesh.normalize_rules([("embed", "model")])


def test_bytes_per_device_from_shapes_only():
    # 1024 x 512 bf16 sharded 8-way on embed: 1024*512*2/8 bytes.
    assert pmesh.bytes_per_device((1024, 512), 2, ("embed", "mlp"), {"fsdp": 8}) == 1024 * 512 * 2 // 8


def test_constrain_is_noop_without_mesh():
    x = jax.numpy.ones((4, 4))
    assert pmesh.constrain(x, ("batch", "act_embed")) is x
