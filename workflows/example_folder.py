"""Write an image folder like a user's own (one subfolder per class, a few PNGs each) from the
embedded suite, for the worked example of docs/data.md and for trying tl on a folder.

    python -m workflows.example_folder --output /tmp/my-digits --set per_class=12 --set dataset=mnistm:test
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from workflows import _cli


@dataclass(frozen=True)
class FolderJob:
    dataset: str = "mnistm:test"
    per_class: int = 12
    seed: int = 0


def main() -> int:
    p = _cli.parser("example_folder", "Write a small image folder (one subfolder per class) from the embedded suite.")
    args = p.parse_args()

    import numpy as np
    from PIL import Image

    from tl.config import load_config
    from tl.data import load_embedded
    from tl.errors import ConfigError

    job = load_config(FolderJob, args.config, args.overrides, base={"per_class": 3} if args.smoke_test else {})
    if not args.output:
        raise ConfigError("--output: say where the folder goes, for example --output /tmp/my-digits")
    if args.check:
        return _cli.checked(job)
    name, _, split = job.dataset.partition(":")
    data = load_embedded(name)
    if split:
        data = data.split(split)
    out = Path(args.output)
    rng = np.random.default_rng(job.seed)
    for c, cname in enumerate(data.classes):
        folder = out / f"digit_{cname}"
        folder.mkdir(parents=True, exist_ok=True)
        for j, i in enumerate(rng.permutation(np.flatnonzero(data.labels == c))[: job.per_class]):
            img = (data.images[i].transpose(1, 2, 0) * 255).round().astype(np.uint8)
            Image.fromarray(img).save(folder / f"{j:03d}.png")
    print(f"{len(data.classes)} class folders x {job.per_class} images: {out}")
    return 0


if __name__ == "__main__":
    _cli.run(main)
