"""End-to-end quantization of the digits CNN: int8 PTQ, 2-bit weight PTQ (MSE vs absmax), 2-bit weight QAT."""

import jax

import jaxopt_big as jb
from jaxopt_big.tree import Rule
from jaxopt_big.quant import MSE, PER_CHANNEL, AbsMax, QuantSpec
import digits_util as du

W8 = QuantSpec(bits=8, granularity=PER_CHANNEL)
A8 = QuantSpec(bits=8)


def test_int8_ptq_weights_and_static_activations_within_half_a_point(digits):
    _, apply, params, float_acc = du.dense_cnn()
    train, test = digits
    qparams = jb.quant.quantize_params(params, W8)
    batches = [(params, train.x[i:i + 128]) for i in range(0, 8 * 128, 128)]  # N = 8 calibration batches
    scales = jb.quant.calibrate_activations(apply, batches, A8)
    acc = du.accuracy(jb.quant.qat(apply, activations=A8, scales=scales), qparams, test)
    print(f"digits CNN float {float_acc:.4f} int8 PTQ (w per-channel, static act) {acc:.4f}")
    assert acc >= float_acc - 0.005


def test_2bit_weight_only_ptq_mse_holds_where_absmax_collapses(digits):
    _, apply, params, float_acc = du.dense_cnn()
    _, test = digits
    acc = {}
    for cal in (MSE(), AbsMax()):
        # The 10-way classifier head (1280 of 38k weights) stays 8-bit, as is usual; every other kernel is 2-bit.
        rules = [Rule("Dense_1/kernel", W8), Rule(".*", QuantSpec(bits=2, granularity=PER_CHANNEL, calibration=cal))]
        qparams = jb.quant.quantize_params(params, rules)
        acc[type(cal).__name__] = du.accuracy(jb.quant.qat(apply), qparams, test)
    print(f"digits CNN float {float_acc:.4f} 2-bit weight-only PTQ {acc}")
    assert acc["MSE"] >= 0.95
    assert acc["AbsMax"] < acc["MSE"] - 0.1


def test_2bit_weight_qat_within_one_and_a_half_points(digits):
    _, apply, params, float_acc = du.dense_cnn()
    train, test = digits
    spec = QuantSpec(bits=2, granularity=PER_CHANNEL, calibration=MSE(steps=16))
    qat_apply = jb.quant.qat(apply, weights=spec)
    tuned = du.fit(qat_apply, params, train, epochs=4, lr=1e-3)
    acc = du.accuracy(qat_apply, tuned, test)
    print(f"digits CNN float {float_acc:.4f} 2-bit weight QAT {acc:.4f}")
    assert acc >= float_acc - 0.015
