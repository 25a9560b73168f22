"""The packed dense weights (jaxmoe/engine/weights.py) against the module's own arrays."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxmoe.checkpoint.random_model import TINY_OLMOE
from jaxmoe.config import from_hf_dict
from jaxmoe.engine import weights
from jaxmoe.engine.executor import Executor, Piece, pack_module
from jaxmoe.model import MoEDecoder

CFG = from_hf_dict(TINY_OLMOE)


def _model() -> MoEDecoder:
    return MoEDecoder(CFG, nnx.Rngs(0))


def _leaves(module) -> list[np.ndarray]:
    return [np.asarray(a) for a in jax.tree.leaves(nnx.state(module))]


def test_a_packed_module_merges_to_its_own_weights(monkeypatch):
    model = _model()
    want = _leaves(model)
    largest = max(a.size for a in want)  # the embedding and the head: arguments of their own
    monkeypatch.setattr(weights, "LOOSE_ELEMENTS", largest - 1)
    pack = pack_module(model)
    assert sum(a.size == largest for a in want) == len([s for s in pack.slots if s.row < 0]) >= 1
    assert len(pack.arguments) < len(want) // 4
    piece = Piece(model, pack)
    got = _leaves(jax.jit(piece.merge)(piece.leaves))
    assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))


def test_layers_of_one_kind_share_a_program_and_each_reads_its_own_weights():
    model = _model()
    x = jax.random.normal(jax.random.key(1), (1, 3, CFG.hidden_size), jnp.float32).astype(CFG.dtype)
    positions = jnp.arange(3)[None]
    kv = _kv()
    attend = lambda m, x, p, kv: m.attend(x, p, kv)[0]  # noqa: E731
    plain = Executor()  # the reference: each layer's own arrays, a program each
    want = [np.asarray(plain.run("attend", attend, {}, (), Piece(layer), x, positions, kv)) for layer in model.layers]
    pack = pack_module(model)
    executor = Executor()
    got = [np.asarray(executor.run("attend", attend, {}, (), Piece(layer, pack), x, positions, kv))
           for layer in model.layers]  # fmt: skip
    assert len(executor.programs) == 1  # one compiled program for every layer
    for g, w in zip(got, want):  # a sliced operand may round differently from a parameter (CPU: an ulp)
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    assert not np.allclose(got[0], got[1], rtol=1e-3)


def _kv():
    from jaxmoe.model import LayerSlot, init_kv_cache

    return LayerSlot(init_kv_cache(CFG, 1, 8)[0], jnp.int32(0))


def test_consuming_the_model_frees_its_arrays_and_keeps_the_values():
    model = _model()
    want = _leaves(model)
    arrays = jax.tree.leaves(nnx.state(model))
    pack = pack_module(model, consume=True)
    assert all(a.is_deleted() for a in arrays if a.size <= weights.LOOSE_ELEMENTS)
    piece = Piece(model, pack)
    got = _leaves(piece.merge(piece.leaves))
    assert all(np.array_equal(a, b) for a, b in zip(got, want))


def test_an_array_outside_the_pack_is_refused():
    pack = pack_module(_model())
    with pytest.raises(ValueError, match="not among the packed weights"):
        Piece(_model(), pack)
