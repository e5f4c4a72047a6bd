"""Targets as data: registry, lookup errors, and the numbers checked against Lava's code."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from core.errors import InputError
from hw_targets import TARGETS, Target, get_target, register


def test_registry_has_the_three_targets():
    assert {"loihi2", "loihi2-sim", "float"} <= set(TARGETS)
    assert get_target("loihi2-sim").simulated and not get_target("loihi2").simulated
    assert not get_target("float").quantized and get_target("loihi2").quantized


def test_unknown_target_lists_valid_names():
    with pytest.raises(InputError) as err:
        get_target("loihi3")
    assert err.value.exit_code == 2
    for name in ("loihi2", "loihi2-sim", "float"):
        assert name in str(err.value)


def test_duplicate_registration_refused():
    with pytest.raises(ValueError):
        register(Target(name="loihi2", description="again"))


def test_sim_and_hardware_share_every_limit():
    hw, sim = get_target("loihi2"), get_target("loihi2-sim")
    differ = {f.name for f in dataclasses.fields(Target) if getattr(hw, f.name) != getattr(sim, f.name)}
    # Both have Loihi 2's 6-bit synaptic delays (Lava runs them as DelaySparse); only Lava's
    # Conv lacks a weight exponent.
    assert differ == {"name", "description", "simulated", "conv_weight_exp"}
    assert (hw.max_synaptic_delay, sim.max_synaptic_delay) == (63, 63)
    assert (hw.conv_weight_exp, sim.conv_weight_exp) == (True, False)


def test_target_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_target("loihi2").vth_max = 1


def test_derived_limits():
    t = get_target("loihi2")
    assert (t.state_min, t.state_max) == (-(1 << 23), (1 << 23) - 1)
    assert (t.mantissa_min, t.mantissa_max) == (-128, 127)
    assert t.payload_max == 128 and t.vth_max < 1 << 23


def test_weight_range_matches_lava_dense_storage():
    """Lava's Dense fixed-point model: clip_weights(num_bits=8) + truncate_weights(MIXED, 8)."""
    from lava.utils.weightutils import SignMode, clip_weights, truncate_weights
    t = get_target("loihi2")
    raw = np.arange(-400, 400)
    stored = truncate_weights(clip_weights(raw, SignMode.MIXED, num_bits=8), SignMode.MIXED, 8)
    assert set(np.unique(stored)) == set(range(t.weight_min, t.weight_max + 1, t.weight_step))


def _lava_source(relative: str) -> str:
    """Text of a Lava source file (read, not imported: importing Lava's runtime sets the
    multiprocessing start method, which clashes with other tests in the same process)."""
    import importlib.util
    from pathlib import Path
    root = Path(importlib.util.find_spec("lava").submodule_search_locations[0])
    return (root / relative).read_text()


def test_state_shift_and_bias_match_lava_lif():
    src = _lava_source("proc/lif/models.py")
    t = get_target("loihi2")
    assert f"self.uv_bitwidth = {t.state_bits}" in src
    assert f"self.act_shift = {t.act_shift}" in src
    assert f"signed 13-bit integer ({t.bias_mant_min} to {t.bias_mant_max})" in src
    assert f"unsigned 3-bit integer ({t.bias_exp_min} to {t.bias_exp_max})" in src


def test_conv_clamp_matches_lava_conv():
    t = get_target("loihi2")
    assert f"signed_clamp(x, bits={t.synapse_acc_bits})" in _lava_source("proc/conv/models.py")
