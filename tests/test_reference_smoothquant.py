"""SmoothQuant's smoothing factors against an independent reference of the paper's formula (Xiao et al., 2023):
s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), with max|X_j| over every calibration token of every batch and
max|W_j| over the output dimension of every MatMul weight that reads the same activation. ONNX MatMul weights
are (in, out), so input channel j is weight row j; the activation is divided by s and row j multiplied by it.

The graph is built here by hand so the reference can compute its activations in numpy, without ONNX Runtime:
two MatMuls share the input x (one factor for both), and a third reads relu(x @ W1) (a factor of its own)."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressor.stages.quantize.onnx_static import _session, smooth_activations

CHANNELS, OUT1, OUT2, OUT3 = 16, 8, 12, 6
OUTLIERS = (3, 11)  # input channels carrying outliers, as LayerNorm outputs of transformers do


def tiny_graph(rng):
    weights = {"w1": rng.normal(size=(CHANNELS, OUT1)), "w2": rng.normal(size=(CHANNELS, OUT2)) * 0.5,
               "w3": rng.normal(size=(OUT1, OUT3))}
    weights = {k: v.astype(np.float32) for k, v in weights.items()}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"], name="mm1"),
             helper.make_node("MatMul", ["x", "w2"], ["b"], name="mm2"),
             helper.make_node("Relu", ["a"], ["h"], name="relu"),
             helper.make_node("MatMul", ["h", "w3"], ["c"], name="mm3")]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "tokens", CHANNELS])],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", "tokens", OUT2]),
         helper.make_tensor_value_info("c", TensorProto.FLOAT, ["batch", "tokens", OUT3])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, weights


def calibration_feeds(rng, batches=3):
    """Batches whose outlier channels peak in different batches, so the maximum must span all of them."""
    feeds = []
    for index in range(batches):
        x = rng.normal(size=(2, 5, CHANNELS)).astype(np.float32)
        x[..., OUTLIERS[index % 2]] *= 40.0
        feeds.append({"x": x})
    return feeds


def reference_factors(weights, feeds, alpha):
    """activation name -> s, from the formula in float64; activations from a numpy forward pass."""
    def channel_absmax(values):
        return np.max([np.abs(v).reshape(-1, v.shape[-1]).max(0) for v in values], axis=0).astype(np.float64)

    xs = [f["x"].astype(np.float64) for f in feeds]
    hs = [np.maximum(x @ weights["w1"], 0) for x in xs]
    groups = {"x": (channel_absmax(xs), [weights["w1"], weights["w2"]]), "h": (channel_absmax(hs), [weights["w3"]])}
    factors = {}
    for name, (act_max, group) in groups.items():
        weight_max = np.max([np.abs(w.astype(np.float64)).max(axis=1) for w in group], axis=0)
        # compress floors both maxima at 1e-5 and clips s to [1e-4, 1e4]; no channel here comes near either
        assert act_max.min() > 1e-3 and weight_max.min() > 1e-3
        factors[name] = act_max ** alpha / weight_max ** (1 - alpha)
    return factors


def smoothed_parts(path):
    """(activation name -> s read back from its inserted Mul, weight name -> smoothed weight)."""
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    muls = {n.input[0]: 1.0 / inits[n.input[1]].astype(np.float64) for n in model.graph.node if n.op_type == "Mul"}
    return muls, inits, model


@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_smoothing_factors_follow_the_formula(tmp_path, alpha):
    rng = np.random.default_rng(0)
    model, weights = tiny_graph(rng)
    source, target = tmp_path / "tiny.onnx", tmp_path / "smoothed.onnx"
    onnx.save(model, str(source))
    feeds = calibration_feeds(rng)
    assert smooth_activations(source, target, feeds, alpha=alpha, threads=1) == 2
    expected = reference_factors(weights, feeds, alpha)
    factors, inits, smoothed = smoothed_parts(target)
    assert set(factors) == {"x", "h"}
    for name in ("x", "h"):
        np.testing.assert_allclose(factors[name], expected[name], rtol=1e-5, err_msg=name)
    # the weights' input rows carry the same factor (the shared input's factor on both of its weights)
    for weight, activation in (("w1", "x"), ("w2", "x"), ("w3", "h")):
        np.testing.assert_allclose(inits[weight], weights[weight] * expected[activation][:, None], rtol=1e-5,
                                   err_msg=weight)
    readers = {n.name: n.input[0] for n in smoothed.graph.node if n.op_type == "MatMul"}
    assert readers["mm1"] == readers["mm2"] != "x" and readers["mm3"] != "h"  # every MatMul reads the smoothed copy
    before, after = _session(source, 1), _session(target, 1)
    for feed in feeds:
        for old, new in zip(before.run(None, feed), after.run(None, feed)):
            np.testing.assert_allclose(new, old, rtol=1e-4, atol=1e-4)


def test_smoothing_flattens_the_activation_outliers(tmp_path):
    """After smoothing, the per-channel peaks of the activation the MatMuls read are far more even: the
    ratio of the largest channel peak to the median falls from the outliers' ~40x to a few x."""
    rng = np.random.default_rng(1)
    model, _ = tiny_graph(rng)
    source, target = tmp_path / "tiny.onnx", tmp_path / "smoothed.onnx"
    onnx.save(model, str(source))
    feeds = calibration_feeds(rng, batches=4)
    smooth_activations(source, target, feeds, alpha=0.5, threads=1)
    smoothed = onnx.load(str(target))
    read = next(n.input[0] for n in smoothed.graph.node if n.name == "mm1")
    smoothed.graph.output.append(helper.make_tensor_value_info(read, TensorProto.FLOAT, None))
    session = _session(smoothed, 1)

    def spread(values):
        peaks = np.max([np.abs(v).reshape(-1, CHANNELS).max(0) for v in values], axis=0)
        return peaks.max() / np.median(peaks)

    before = spread([f["x"] for f in feeds])
    after = spread([session.run([read], feed)[0] for feed in feeds])
    assert before > 20 and after < before / 4, (before, after)
