"""Reproducer 1: inputs outside [0, 1]. The input encoding's scale comes from the data's
real range (and the model's input transform), so a model trained on the raw 0..16 digit
values keeps its accuracy in fixed point and stays spike-exact in Lava; evaluation values
beyond the encodable range are counted and reported, never silently clipped."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from tests.fuzz_cases import run_cli


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """An MLP trained on raw digits (values 0..16) and its npz train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    folder = tmp_path_factory.mktemp("wide")
    digits = load_digits()
    x = digits.images.astype(np.float32)[:, None]
    x_tr, x_te, y_tr, y_te = train_test_split(x, digits.target, test_size=0.2, random_state=0,
                                              stratify=digits.target)
    np.savez(folder / "train.npz", x=x_tr, y=y_tr)
    np.savez(folder / "test.npz", x=x_te, y=y_te)
    np.savez(folder / "test_x2.npz", x=x_te * 2, y=y_te)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    torch.jit.save(torch.jit.script(model.eval()), str(folder / "wide.pt"))
    return folder, x_te


ARGS = ["--timesteps", "4", "--eval-samples", "360", "--calib-batches", "1",
        "--calib-batch-size", "64", "--iterations", "1", "--no-progress"]


@pytest.mark.lava
def test_wide_input_range_fixed_point_close_to_float_and_lava_exact(wide):
    folder, _ = wide
    out = folder / "out"
    code, stdout, err = run_cli([str(folder / "wide.pt"), "--out", str(out), *ARGS,
                                 "--data", f"npz:{folder / 'train.npz'},{folder / 'test.npz'}",
                                 "--verify-samples", "3", "--verify-workers", "1"])
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    encoding = report["quantization"]["input"]
    assert encoding["range"] == [0.0, 16.0]
    assert encoding["scale_exp"] == 2          # 16 * 2**2 = 64 <= 127 < 16 * 2**3
    assert report["input_clipped"]["values"] == 0 and "clipped" not in stdout
    float_acc, fixed_acc = report["snn_accuracy"]["ftbc"][-1], report["fixed_accuracy"][-1]
    assert report["ann_accuracy"] > 90.0
    assert abs(fixed_acc - float_acc) <= 3.0, (fixed_acc, float_acc)  # was 76.67 vs 96.94
    lava = report["lava"]
    assert lava["spike_mismatches"] == 0 and lava["readout_mismatches"] == 0


def test_values_beyond_the_encoding_are_counted_and_reported(wide):
    """Test data at twice the training range: x' * 2**2 > 127.5 only where x = 32."""
    folder, x_te = wide
    out = folder / "out_x2"
    code, stdout, err = run_cli([str(folder / "wide.pt"), "--out", str(out), *ARGS,
                                 "--target", "loihi2", "--data",
                                 f"npz:{folder / 'train.npz'},{folder / 'test_x2.npz'}"])
    assert code == 0, err
    expected = int(np.count_nonzero(x_te * 2 == 32.0))
    assert expected > 0
    clipped = json.loads((out / "report.json").read_text())["input_clipped"]
    assert clipped == {"values": expected, "of": x_te.size, "range": [0.0, 16.0]}
    assert f"input: {expected} of {x_te.size} evaluation values exceed" in stdout
