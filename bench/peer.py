"""The peer: a FastAPI + ONNX Runtime service written the way the tutorials write it.

One file, default session options, full decode with Pillow, preprocessing by hand, blocking
inference inside ``async def``. It reads model.json only to use the same preprocessing numbers.
Run: PEER_MODEL=efficientnet_lite0 uvicorn bench.peer:app --port 8100 (PEER_THREADS=N gives its
session N threads instead of ONNX Runtime's default).
"""

import io
import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, File, UploadFile
from PIL import Image

MODEL_DIR = Path(os.environ.get("PEER_MODELS_DIR", "models")) / os.environ.get("PEER_MODEL", "efficientnet_lite0")
spec = json.loads((MODEL_DIR / "model.json").read_text())
options = ort.SessionOptions()
if os.environ.get("PEER_THREADS"):  # set by bench/run.py on one core only: the default escapes taskset
    options.intra_op_num_threads = int(os.environ["PEER_THREADS"])
session = ort.InferenceSession(str(MODEL_DIR / "model.onnx"), options, providers=["CPUExecutionProvider"])
app = FastAPI()


def preprocess(image: Image.Image) -> np.ndarray:
    size = spec["input"]
    image = image.convert(size["color"])
    if size.get("resize"):
        w, h = image.size
        scale = size["resize"] / min(w, h)
        image = image.resize((int(w * scale), int(h * scale)), Image.BILINEAR)
        w, h = image.size
        left, top = (w - size["width"]) // 2, (h - size["height"]) // 2
        image = image.crop((left, top, left + size["width"], top + size["height"]))
    else:
        image = image.resize((size["width"], size["height"]), Image.BILINEAR)
    x = np.array(image, dtype=np.float32)
    x = (x - np.array(size["mean"], dtype=np.float32)) / np.array(size["std"], dtype=np.float32)
    if x.ndim == 2:
        x = x[:, :, None]
    return x.transpose(2, 0, 1)[None]


@app.post("/predict")
async def predict(file: UploadFile = File(...)):  # noqa: B008 (the tutorial way)
    image = Image.open(io.BytesIO(await file.read()))
    logits = session.run(None, {spec["input"]["name"]: preprocess(image)})[0][0]
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    top = np.argsort(-probs)[:5]
    return {"predictions": [{"label": spec["labels"][i], "score": float(probs[i])} for i in top]}
