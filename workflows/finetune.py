"""Fine-tune a backbone on a target with one strategy, on Ray Train (DDP over --workers N): a run of
``tl.runs`` without a source.

    python -m workflows.finetune --set target=mnistm --set strategy=finetune --set params.frozen=2
"""

from __future__ import annotations


from workflows import _cli


def main() -> int:
    p = _cli.parser("finetune", "Fine-tune a backbone on a target task with Ray Train.")
    p.add_argument("--workers", type=int, default=None, help="Ray Train workers (default 2)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker, bf16 mixed precision")
    args = p.parse_args()

    from tl.config import load_config
    from tl.runs import RunConfig, run
    from tl.runtime import resolve_storage

    base: dict = {"params": {"steps": 300, "batch_size": 64, "lr": 0.01}}
    if args.smoke_test:
        base = {"limit": 128, "checkpoint_every": 5, "params": {"steps": 10, "batch_size": 32, "lr": 0.01}}
    if args.workers is not None:
        base["workers"] = args.workers
    if args.gpu:
        base.update(use_gpu=True, amp=True)
    cfg = load_config(RunConfig, args.config, args.overrides, base=base)
    if args.check:
        return _cli.checked(cfg)
    storage = resolve_storage(args.storage)
    output = args.output or f"results/finetune/{cfg.key()}"
    _cli.init_ray(args.address)
    with _cli.output_folder(output) as folder:
        record = run(cfg, storage, folder)
    print(f"{cfg.test_split} accuracy: {record['history'][-1]['target_test_accuracy']:.4f}")
    print(f"model and run record: {output}")
    return 0


if __name__ == "__main__":
    _cli.run(main)
