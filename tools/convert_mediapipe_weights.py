#!/usr/bin/env python3
"""Convert MediaPipe's face-mesh and selfie-segmentation networks (Apache 2.0, the `mediapipe`
0.10.14 wheel on PyPI) to assets/face_parser.safetensors, and make numerical fixtures with
TensorFlow Lite's own interpreter (LiteRT, the runtime the mediapipe package runs them with).

    pip download --no-deps mediapipe==0.10.14 -d /tmp/mp
    python3 -m venv /tmp/mpvenv && /tmp/mpvenv/bin/pip install ai-edge-litert tflite numpy safetensors pillow
    /tmp/mpvenv/bin/python tools/convert_mediapipe_weights.py /tmp/mp/mediapipe-0.10.14-*.whl

The weights' license and provenance: LICENSES/mediapipe-Apache-2.0.md. Both outputs regenerate
byte for byte.

Networks: `mediapipe/modules/face_landmark/face_landmark.tflite` (468 3-D landmarks of a
192x192 face crop, plus a face-presence logit) and
`mediapipe/modules/selfie_segmentation/selfie_segmentation.tflite` (person mask of a 256x256
image). Their weights are stored in the files as float16 and are kept as float16 (lossless).

Keys: `mesh.<tflite layer>.{weight,bias,alpha}` and `selfie.<tflite layer>.{weight,bias}`,
in burn/PyTorch layout: convolutions `[out, in, kh, kw]`, depthwise `[C, 1, kh, kw]`, the
transposed convolution `[in, out, kh, kw]`, PReLU slopes `[C]`.

The script checks that every graph is the one src/face/mesh.rs and src/face/selfie.rs
implement (op sequence, paddings, strides, resize modes) and fails otherwise.

Fixtures (tests/fixtures/face/parser_nets.safetensors): u8 network inputs (face crops of the
bundled public-domain sample as it is, mirrored, and turned 20 degrees, so the landmarks move) and
the interpreter's float32 outputs for them.
"""
import sys
import zipfile
from pathlib import Path

import numpy as np
import tflite
from ai_edge_litert.interpreter import Interpreter
from PIL import Image
from safetensors.numpy import save_file

root = Path(__file__).resolve().parent.parent
wheel = zipfile.ZipFile(sys.argv[1])
MODELS = {
    "mesh": "mediapipe/modules/face_landmark/face_landmark.tflite",
    "selfie": "mediapipe/modules/selfie_segmentation/selfie_segmentation.tflite",
}
OPS = {v: k for k, v in tflite.BuiltinOperator.__dict__.items() if not k.startswith("_")}


def graph(buf):
    m = tflite.Model.GetRootAsModel(buf, 0)
    g = m.Subgraphs(0)

    def tensor(i):
        t = g.Tensors(i)
        b = m.Buffers(t.Buffer())
        return t.Name().decode(), (b.DataAsNumpy() if b.DataLength() else None), t

    ops = []
    for k in range(g.OperatorsLength()):
        op = g.Operators(k)
        oc = m.OperatorCodes(op.OpcodeIndex())
        code = max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode())
        name = OPS[code] if code != 32 else "CUSTOM:" + oc.CustomCode().decode()
        ops.append((name, op, [tensor(i) for i in op.InputsAsNumpy() if i >= 0],
                    [tensor(i) for i in op.OutputsAsNumpy()]))
    return ops


def fp16(t_raw, t):
    shape = list(t.ShapeAsNumpy())
    assert t.Type() == tflite.TensorType.FLOAT16, t.Name()
    return np.frombuffer(t_raw.tobytes(), dtype=np.float16).reshape(shape)


def convert(prefix, buf):
    ops = graph(buf)
    consts = {}
    for name, op, ins, outs in ops:
        if name == "DEQUANTIZE":
            consts[outs[0][0]] = fp16(ins[0][1], ins[0][2])
    out = {}
    seq = []
    for name, op, ins, outs in ops:
        if name == "DEQUANTIZE":
            continue
        layer = outs[0][0]
        if name in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            opt = (tflite.Conv2DOptions if name == "CONV_2D" else tflite.DepthwiseConv2DOptions)()
            o = op.BuiltinOptions()
            opt.Init(o.Bytes, o.Pos)
            w = consts[ins[1][0]]
            kh = w.shape[1]
            pad = "same" if opt.Padding() == tflite.Padding.SAME else "valid"
            assert opt.FusedActivationFunction() == 0, layer
            seq.append(f"{name} {layer} k{kh} s{opt.StrideH()} {pad}")
            # OHWI -> OIHW; depthwise 1HWC -> C1HW.
            w = w.transpose(0, 3, 1, 2) if name == "CONV_2D" else w.transpose(3, 0, 1, 2)
            out[f"{prefix}.{layer}.weight"] = np.ascontiguousarray(w)
            out[f"{prefix}.{layer}.bias"] = consts[ins[2][0]].reshape(-1)
        elif name == "PRELU":
            out[f"{prefix}.{layer}.alpha"] = consts[ins[1][0]].reshape(-1)
            seq.append(f"{name} {layer}")
        elif name == "CUSTOM:Convolution2DTransposeBias":
            w = consts[ins[1][0]]  # [O, kh, kw, I]
            seq.append(f"{name} {layer} k{w.shape[1]}")
            out[f"{prefix}.{layer}.weight"] = np.ascontiguousarray(w.transpose(3, 0, 1, 2))
            out[f"{prefix}.{layer}.bias"] = consts[ins[2][0]].reshape(-1)
        elif name in ("MAX_POOL_2D", "AVERAGE_POOL_2D"):
            opt = tflite.Pool2DOptions()
            o = op.BuiltinOptions()
            opt.Init(o.Bytes, o.Pos)
            seq.append(f"{name} k{opt.FilterHeight()} s{opt.StrideH()} "
                       f"{'same' if opt.Padding() == tflite.Padding.SAME else 'valid'}")
        elif name == "RESIZE_BILINEAR":
            opt = tflite.ResizeBilinearOptions()
            o = op.BuiltinOptions()
            opt.Init(o.Bytes, o.Pos)
            seq.append(f"{name} align_corners={opt.AlignCorners()} "
                       f"half_pixel={opt.HalfPixelCenters()}")
        else:
            seq.append(name)
    return out, seq


weights = {}
for prefix, path in MODELS.items():
    w, seq = convert(prefix, wheel.read(path))
    weights.update(w)
    (Path("/tmp") / f"{prefix}_ops.txt").write_text("\n".join(seq) + "\n")
    # What the Rust networks assume, checked here.
    joined = "\n".join(seq)
    if prefix == "mesh":
        kinds = {" ".join(s.split()[:1] + s.split()[2:]) for s in seq if "CONV" in s or "POOL" in s}
        assert kinds == {"CONV_2D k1 s1 valid", "CONV_2D k3 s2 same", "CONV_2D k3 s3 valid",
                         "DEPTHWISE_CONV_2D k3 s1 same", "DEPTHWISE_CONV_2D k3 s2 same",
                         "MAX_POOL_2D s2 valid"}, kinds
    else:
        assert all("align_corners=False half_pixel=True" in s for s in seq if "RESIZE" in s), seq
        assert all("AVERAGE_POOL_2D" not in s or "valid" in s for s in seq), seq

save_file(weights, str(root / "assets/face_parser.safetensors"),
          metadata={"source": "mediapipe 0.10.14 wheel (PyPI): " + ", ".join(MODELS.values()),
                    "license": "Apache-2.0 (c) The MediaPipe Authors"})
print(f"{len(weights)} tensors, {sum(v.size for v in weights.values())} weights")

# Fixtures: the sample's first frame crop (tests/fixtures/face/crop_astronaut256.png), mirrored
# and rotated variants.
crop = Image.open(root / "tests/fixtures/face/crop_astronaut256.png").convert("RGB")
variants = {
    "plain": crop,
    "mirrored": crop.transpose(Image.FLIP_LEFT_RIGHT),
    "rotated": crop.rotate(20, resample=Image.BILINEAR, fillcolor=(128, 128, 128)),
}
fixtures = {}
for prefix, path, size in [("mesh", MODELS["mesh"], 192), ("selfie", MODELS["selfie"], 256)]:
    it = Interpreter(model_content=wheel.read(path))
    it.allocate_tensors()
    for vname, img in variants.items():
        x = np.asarray(img.resize((size, size), Image.BILINEAR), dtype=np.uint8)
        it.set_tensor(it.get_input_details()[0]["index"], (x[None].astype(np.float32) / 255.0))
        it.invoke()
        fixtures[f"{prefix}.{vname}.input"] = x
        for k, d in enumerate(it.get_output_details()):
            fixtures[f"{prefix}.{vname}.output{k}"] = it.get_tensor(d["index"]).astype(np.float32).reshape(-1)
save_file(fixtures, str(root / "tests/fixtures/face/parser_nets.safetensors"),
          metadata={"interpreter": "ai-edge-litert (TensorFlow Lite), input = u8 / 255"})
print("fixtures:", {k: v.shape for k, v in fixtures.items()})
