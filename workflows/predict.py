"""Predict images with an exported model, on Ray Data (actor pool; one GPU per actor where present).

    python -m workflows.predict models/mnistm-5shot /data/new_images            # an image folder
    python -m workflows.predict models/mnistm-5shot manifest.csv --output results/pred
    python -m workflows.predict models/mnistm-5shot images.parquet --set image_column=png
    python -m workflows.predict models/mnistm-5shot mnistm:test                 # a split of the embedded suite

Writes predictions.parquet, predictions.csv (id, path, label, predicted, confidence, prob_<class>,
error) and summary.json. Unreadable images are listed on stderr and in the error column; the exit
status is non-zero only when no image could be predicted. Images the model was trained on (model.json
records them) are counted in summary.json (``training_images``, ``accuracy_new_images``) and warned about.
"""

from __future__ import annotations

import sys

from workflows import _cli


def main() -> int:
    p = _cli.parser("predict", "Predict a folder, CSV manifest, Parquet file or embedded split with an exported model.")
    p.add_argument("model", nargs="?", help="model folder written by workflows.export")
    p.add_argument("input", nargs="?", help="image folder, .csv manifest, .parquet file, or an embedded split "
                                            "such as mnistm:test")
    args = p.parse_args()

    from tl.config import load_config
    from tl.predict import PredictConfig, predict
    from tl.runtime import resolve_storage
    from tl.storage import Location

    cfg = load_config(PredictConfig, args.config, args.overrides)
    if args.check:
        if not args.smoke_test and (args.model is None or args.input is None):
            p.error("give MODEL and INPUT (or --smoke-test)")
        return _cli.checked(cfg)
    storage = resolve_storage(args.storage)
    _cli.init_ray(args.address)
    model, source = args.model, args.input
    if args.smoke_test and model is None:
        from tl.export import ExportConfig, export

        model = str(storage / "smoke" / "model")
        export(ExportConfig(strategy="prototype", target="optdigits", weights="random", train_on="shots", shots=5),
               storage, model)
        source = source or "optdigits:test"
    if model is None or source is None:
        p.error("give MODEL and INPUT (or --smoke-test)")
    output = args.output or f"results/predict-{Location.of(model).name}"
    with _cli.no_empty_folder(output):
        summary = predict(model, source, output, cfg)
    if summary.get("failed_message"):
        print(summary["failed_message"], file=sys.stderr)
    if summary.get("warning"):  # its labelled images are (some of) the model's training images
        print(f"warning: {summary['warning']}", file=sys.stderr)
    where = Location.of(output)
    print(f"predictions: {where / 'predictions.parquet'} and {where / 'predictions.csv'}\n"
          f"summary: {where / 'summary.json'}")
    return 0


if __name__ == "__main__":
    _cli.run(main)
