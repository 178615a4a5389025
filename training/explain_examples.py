"""The page's example images, so that anyone can try the models without a photo of their own:
the first Fashion-MNIST test image of each class (28x28 PNG, as the small networks see them) and
the sample photos (skimage's and matplotlib's, reduced to 320 pixels on the longer side), written
to app/static/examples/ with an index.

    python -m training.explain_examples
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from training.data import FASHION_LABELS, load_split
from training.photos import sample_photos

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "app" / "static" / "examples"
LONGER_SIDE = 320


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    entries = []
    split = load_split("test")
    for index, label in enumerate(FASHION_LABELS):
        first = int(np.flatnonzero(split.labels == index)[0])
        name = f"fashion-{index}.png"
        Image.fromarray(split.images[first]).save(OUT / name, optimize=True)
        entries.append({"file": name, "label": label, "kind": "fashion", "source": f"Fashion-MNIST test image {first}"})
    for name, path in sample_photos().items():
        image = Image.open(path).convert("RGB")
        image.thumbnail((LONGER_SIDE, LONGER_SIDE), Image.Resampling.LANCZOS)
        image.save(OUT / f"{name}.jpg", quality=85, optimize=True)
        entries.append({"file": f"{name}.jpg", "label": name.replace("_", " "), "kind": "photo", "source": path.name})
    (OUT / "examples.json").write_text(json.dumps(entries, indent=1) + "\n")
    print(f"wrote {len(entries)} examples to {OUT}")


if __name__ == "__main__":
    main()
