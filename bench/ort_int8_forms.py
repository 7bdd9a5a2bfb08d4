"""ONNX Runtime's MatMulInteger forms on this CPU: speed against FP32 MatMul, and exactness on adversarial inputs.

The W8A8 ONNX lowering needs int8 x int8 products summed exactly in int32. ONNX Runtime's CPU kernels pick
their GEMM by operand types and instruction set (``lowbit/lowering/onnx/integer_matmul.py``); this script
times each form on the demo model's matmul shapes (K x N) at decode (M = 1, 4) and prefill (M = 128)
sizes, next to an FP32 ``MatMul`` of the same weight measured in the same run, and checks every form's
int32 result against exact integer math on inputs that saturate a non-VNNI uint8 x int8 kernel::

    python -m bench.ort_int8_forms                 # median of --reps runs, 2 ORT threads
    python -m bench.ort_int8_forms --m 1 --reps 500

Forms: ``u8s8`` (uint8 activations with zero point 128 x int8 weights: what lowbit emitted before, wrong on
x86 without VNNI), ``u8u8`` (weights shifted to uint8 with zero point 128: lowbit's form for 8-bit weights),
``s8s8`` (both int8), ``u8s8-split`` (the int8 weight split into two halves within [-64, 64] along K, so
uint8 x int8 cannot saturate; twice the weight bytes).
"""

from __future__ import annotations

if __package__ != "bench":  # run as a file, bench/ would lead sys.path and shadow installed packages
    raise SystemExit("run it from the repository root: python -m bench.ort_int8_forms")

import argparse
import statistics
import time

import numpy as np

from lowbit.host import describe_cpu

# SmolLM2-135M's matmul shapes (K, N) and how often each occurs in a decoder block: q/o, k/v, gate/up, down.
SHAPES = {(576, 576): 2, (576, 192): 2, (576, 1536): 2, (1536, 576): 1}
FORMS = ("fp32", "u8s8", "u8u8", "s8s8", "u8s8-split")


def adversarial(m: int, k: int, n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Signed codes: activations at +-127 and weights at +-127 in runs of four of one sign along K, half the
    activation rows signed like weight column 0 (every pair of products adds to about +-64770)."""
    signs = np.repeat(rng.choice([-1, 1], (-(-k // 4), n)), 4, axis=0)[:k]
    w = (signs * rng.integers(120, 128, (k, n))).astype(np.int8)
    a = rng.choice([-1, 1], (m, k)) * rng.integers(120, 128, (m, k))
    a[::2] = np.abs(a[::2]) * signs[:, 0]
    return a.astype(np.int64), w


def session(form: str, w: np.ndarray, threads: int):
    """(ORT session, activation encoder) computing A @ W in ``form`` for signed codes A [M, K]."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k, n = w.shape
    za = np.array(128, np.uint8)
    a_type, encode = TensorProto.UINT8, lambda a: (a + 128).astype(np.uint8)
    if form == "fp32":
        inits = {"W": w.astype(np.float32)}
        nodes = [helper.make_node("MatMul", ["A", "W"], ["Y"])]
        a_type, encode = TensorProto.FLOAT, lambda a: a.astype(np.float32)
    elif form == "u8s8":
        inits = {"W": w, "za": za}
        nodes = [helper.make_node("MatMulInteger", ["A", "W", "za"], ["Y"])]
    elif form == "u8u8":
        inits = {"W": (w.astype(np.int16) + 128).astype(np.uint8), "za": za, "zb": za}
        nodes = [helper.make_node("MatMulInteger", ["A", "W", "za", "zb"], ["Y"])]
    elif form == "s8s8":
        inits = {"W": w}
        nodes = [helper.make_node("MatMulInteger", ["A", "W"], ["Y"])]
        a_type, encode = TensorProto.INT8, lambda a: a.astype(np.int8)
    else:                                        # u8s8-split: A @ W = [A, A] @ [floor(W / 2); W - floor(W / 2)]
        hi = np.floor_divide(w, 2).astype(np.int8)
        inits = {"W": np.concatenate([hi, (w - hi).astype(np.int8)]), "za": za}
        nodes = [helper.make_node("Concat", ["A", "A"], ["A2"], axis=-1),
                 helper.make_node("MatMulInteger", ["A2", "W", "za"], ["Y"])]
    y_type = TensorProto.FLOAT if form == "fp32" else TensorProto.INT32
    graph = helper.make_graph(nodes, form, [helper.make_tensor_value_info("A", a_type, [None, k])],
                              [helper.make_tensor_value_info("Y", y_type, None)],
                              initializer=[numpy_helper.from_array(v, name) for name, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]), encode


def median_us(sess, feed: dict, reps: int) -> float:
    for _ in range(min(10, reps)):
        sess.run(None, feed)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main() -> int:
    import onnxruntime as ort

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", default="1,4,128", help="comma list of activation rows (tokens)")
    ap.add_argument("--reps", type=int, default=300, help="timed runs per cell (prefill sizes use a fifth)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"ONNX Runtime {ort.__version__}, {args.threads} threads, {describe_cpu()}\n")
    print("| M | K x N | " + " | ".join(f"{f} us" for f in FORMS) + " | exact on adversarial inputs | "
          "u8u8 vs fp32 | u8u8 weight GB/s | u8u8 GOP/s |")
    print("|---|---|" + "---|" * (len(FORMS) + 4))
    totals = {}
    for m in (int(v) for v in args.m.split(",")):
        totals[m] = {f: 0.0 for f in FORMS}
        for (k, n), per_block in SHAPES.items():
            a, w = adversarial(m, k, n, rng)
            exact = a @ w.astype(np.int64)
            cells, exact_forms = [], []
            for form in FORMS:
                sess, encode = session(form, w, args.threads)
                feed = {"A": encode(a)}
                if form != "fp32" and np.array_equal(sess.run(None, feed)[0].astype(np.int64), exact):
                    exact_forms.append(form)
                us = median_us(sess, feed, args.reps if m < 64 else max(20, args.reps // 5))
                totals[m][form] += us * per_block
                cells.append(us)
            u8u8 = cells[FORMS.index("u8u8")]
            print(f"| {m} | {k} x {n} | " + " | ".join(f"{c:.1f}" for c in cells) + f" | {', '.join(exact_forms)} | "
                  f"{cells[0] / u8u8:.2f}x | {k * n / u8u8 / 1e3:.2f} | {2 * m * k * n / u8u8 / 1e3:.1f} |")
    print("\nOne decoder block's matmuls (q, k, v, o, gate, up, down), us, and the ratio to fp32:\n")
    print("| M | " + " | ".join(FORMS) + " |")
    print("|---|" + "---|" * len(FORMS))
    for m, t in totals.items():
        print(f"| {m} | " + " | ".join(f"{t[f]:.0f} ({t['fp32'] / t[f]:.2f}x)" for f in FORMS) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
