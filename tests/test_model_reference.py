"""The released-checkpoint contract: every reference case loads strictly and reproduces its outputs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bgmatte.model.build import load_weights
from bgmatte.model.matting import MattingBase, MattingRefine

from conftest import REFERENCE_DIR

CASES = sorted(p.stem for p in (REFERENCE_DIR / "vectors").glob("*.json")) or ["<missing>"]


def build_from_meta(meta: dict) -> torch.nn.Module:
    settings = meta["model"]
    if settings["class"] == "MattingBase":
        return MattingBase(settings["backbone"])
    return MattingRefine(settings["backbone"], settings["backbone_scale"], settings["refine_mode"],
                         settings["refine_sample_pixels"], settings["refine_threshold"],
                         settings["refine_kernel_size"])


@pytest.mark.parametrize("case", CASES)
def test_reference_case_matches_within_tolerance(reference, case):
    meta, weights, arrays = reference.load_case(case)
    model = build_from_meta(meta)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
    model.eval()
    with torch.no_grad():
        outputs = model(torch.from_numpy(arrays["src"]), torch.from_numpy(arrays["bgr"]))
    tolerance = meta["tolerance"]["max_abs"]
    assert len(outputs) == len(meta["outputs"])
    for name, output in zip(meta["outputs"], outputs):
        expected = arrays[name]
        assert tuple(output.shape) == expected.shape, name
        if name == "ref_sm":
            np.testing.assert_array_equal(output.numpy(), expected, err_msg=name)
        else:
            np.testing.assert_allclose(output.numpy(), expected, rtol=0, atol=tolerance, err_msg=name)


@pytest.mark.parametrize("case", CASES)
def test_state_dict_layout_is_the_released_one(reference, case):
    meta = json.loads((REFERENCE_DIR / "vectors" / f"{case}.json").read_text())
    model = build_from_meta(meta)
    layout = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert layout == [(e["key"], e["shape"]) for e in meta["state_dict"]]


def test_refine_case_loads_through_load_weights(reference):
    meta, weights, _ = reference.load_case("resnet50_refine_sampling")
    model = MattingRefine("resnet50")
    load_weights(model, {k: torch.from_numpy(v) for k, v in weights.items()}, "vectors")
    assert torch.equal(model.refiner.conv4.bias, torch.from_numpy(weights["refiner.conv4.bias"]))
