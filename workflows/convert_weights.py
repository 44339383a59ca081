"""Convert a weights file in foreign names onto a backbone's architecture, as safetensors.

    python -m workflows.convert_weights my-port.pth --backbone timm:tf_efficientnet_lite0 --output lite0.safetensors
    python -m workflows.convert_weights old.pt --backbone digits_cnn --output digits.safetensors

The file's tensors are paired with the architecture's in order; every pair must have the same
shape and the counts must be equal, else nothing is written and the first mismatch is named
(docs/finetuning.md, "Backbones"). The output then loads with ``--set weights=OUTPUT``.
"""

from __future__ import annotations

import argparse

from workflows import _cli


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m workflows.convert_weights",
                                description="Map a weights file onto a backbone's architecture by position and "
                                            "write it as safetensors.")
    p.add_argument("source", help="the weights file (.pt/.pth state dict or .safetensors, local or at a URI)")
    p.add_argument("--backbone", required=True, help="the architecture: a tl backbone name or timm:<model>")
    p.add_argument("--output", required=True, help="the .safetensors file to write")
    args = p.parse_args()

    from tl.models.convert import convert_weights

    done = convert_weights(args.source, args.backbone, args.output)
    print(f"[convert] {done['tensors']} tensors of {args.source} mapped onto {done['architecture']} by position "
          f"(first: {done['first'][0]} -> {done['first'][1]})")
    print(f"weights: {done['output']} (use --set backbone={args.backbone} --set weights={done['output']})")
    return 0


if __name__ == "__main__":
    _cli.run(main)
