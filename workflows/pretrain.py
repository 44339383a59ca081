"""Pretrain a backbone on the source task with Ray Train (DDP over --workers N).

    python -m workflows.pretrain [--config FILE] [--set epochs=20] [--workers 2] [--smoke-test]
"""

from __future__ import annotations

from workflows import _cli


def main() -> int:
    p = _cli.parser("pretrain", "Pretrain a backbone on the source digits with Ray Train.")
    p.add_argument("--workers", type=int, default=None, help="Ray Train workers (default 2)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker")
    args = p.parse_args()

    from tl.config import load_config
    from tl.pretrain import PretrainConfig, pretrain
    from tl.runtime import resolve_storage

    base: dict = {"epochs": 1, "limit": 512} if args.smoke_test else {}
    if args.workers is not None:
        base["workers"] = args.workers
    if args.gpu:
        base["use_gpu"] = True
    cfg = load_config(PretrainConfig, args.config, args.overrides, base=base)
    if args.check:
        return _cli.checked(cfg)
    storage = resolve_storage(args.storage)
    _cli.init_ray(args.address)
    result = pretrain(cfg, storage)
    print(f"source validation accuracy: {result.val_accuracy:.4f}")
    print(f"backbone weights and metadata: {result.path}")
    return 0


if __name__ == "__main__":
    _cli.run(main)
