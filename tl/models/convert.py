"""A weights file in foreign names, converted onto a backbone's architecture (``workflows.convert_weights``).

A checkpoint whose names are neither the backbone's own, timm's nor torchvision's (a port from
another framework, another library's module names) still fits when its tensors match the
architecture's one to one, in order and shape: that is what the ImageNet releases of
``tl.models.imagenet_weights`` are, and what this does for a user's own file. It writes the
tensors under the architecture's names as safetensors, which ``weights: FILE`` then loads like any
other; a count or shape mismatch is refused at the first one, naming both sides.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tl.models.imagenet_weights import map_by_position
from tl.models.registry import make_backbone
from tl.models.timm_extra import is_timm, timm_arch, timm_module
from tl.models.weights import read_weights


def architecture_state(backbone: str) -> tuple[dict[str, torch.Tensor], str]:
    """The architecture's state dict in the names its weights files use, and what it is: timm's
    model (classifier included) for ``timm:`` names, else the tl backbone's own stage names."""
    if is_timm(backbone):
        arch = timm_arch(backbone)
        return timm_module().create_model(arch, pretrained=False).state_dict(), f"timm {arch}"
    return make_backbone(backbone).state_dict(), f"backbone '{backbone}'"


def convert_weights(source: str, backbone: str, output: str | Path) -> dict:
    """Map the weights file ``source`` onto ``backbone`` by position (``map_by_position``) and write
    them to ``output`` (safetensors); returns what was done (tensors, names on each side)."""
    from safetensors.torch import save_file

    src, _ = read_weights(source)
    dst, what = architecture_state(backbone)
    state = map_by_position(src, dst, source, what)
    out = Path(output)
    if out.suffix != ".safetensors":
        out = out.with_suffix(".safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(tmp))
    tmp.replace(out)  # never a half-written file under the final name
    first_src = next(k for k in src if not k.endswith("num_batches_tracked"))
    first_dst = next(k for k in dst if not k.endswith("num_batches_tracked"))
    mapped = sum(1 for k in state if not k.endswith("num_batches_tracked"))  # the counters are the architecture's
    return {"output": str(out), "tensors": mapped, "architecture": what, "first": (first_src, first_dst)}
