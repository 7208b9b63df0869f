"""Train split only: at 1 and 2 shots, `auto`'s pick against every fixed blend of two tuned methods.

Each class's train images split by name (`FolderDataset.train_only`: shots from the first half, the second
half scored), 20 seeds; prints each blend's mean accuracy minus the best single method's, in points
(docs/benchmarks.md, "`auto` blends"). Run from the repository root with the stand-in built in DATA_DIR:
`.venv/bin/python docs/scripts/fixed_blends.py ../shared/datasets/cifar10-mini /work/cache/test-data`.
"""

import itertools
import statistics
import sys
from pathlib import Path

import numpy as np

from app.encoder import create_encoder
from app.evaluation.datasets import load_folder_dataset
from app.evaluation.run import encode_dataset, sample_shots, view_rows
from app.fewshot import build_method
from app.settings import Settings
from cache_models import METHODS
from cache_models.selection import calibrated_probabilities, choose

settings = Settings(model="offline", backend="onnx", data_dir=Path(sys.argv[2]), threads=2)
encoder, _ = create_encoder(settings, torch_free=False)
dataset = load_folder_dataset(Path(sys.argv[1])).train_only()
data = encode_dataset(encoder, dataset, views=1, progress=False)
methods = [m for m in METHODS if m != "zero-shot"]
for shots in (1, 2):
    accuracy: dict[str, list[float]] = {}
    for seed in range(1, 21):
        picked = sample_shots(data.train_labels, shots, seed)
        feats, labels = data.train_views[view_rows(picked, 1)], data.train_labels[picked]
        fitted = {m: build_method(m, feats, labels, data.text, 1, scale=encoder.logit_scale) for m in METHODS}
        logits = {m: fitted[m].predict(data.test_features) for m in methods}
        temperatures = {m: r.temperature for m in methods if (r := fitted[m].tune_report) is not None}

        def blend(members: tuple[str, ...], logits: dict = logits, temperatures: dict = temperatures) -> float:
            probs = calibrated_probabilities([logits[m] for m in members], [temperatures[m] for m in members])
            return 100 * float(np.mean(np.argmax(probs, axis=1) == data.test_labels))

        choice = choose(fitted)
        accuracy.setdefault("auto", []).append(blend(choice.members) if choice else float("nan"))
        for members in [(m,) for m in methods] + list(itertools.combinations(methods, 2)):
            accuracy.setdefault("+".join(members), []).append(blend(members))
    best = max(statistics.mean(accuracy[m]) for m in methods)
    print(f"{dataset.name}, {shots} shot(s): best single method {best:.2f}%")
    for key, values in sorted(accuracy.items(), key=lambda kv: -statistics.mean(kv[1])):
        print(f"  {key:24s} {statistics.mean(values) - best:+.2f}")
