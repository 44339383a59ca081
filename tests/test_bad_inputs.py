"""The catalogue of bad inputs: each is one clear error naming the file, class or key, a non-zero
exit, and no output that looks complete. Every case runs the real workflow command line (four as
their own process, the rest through the same entry point in the test's process)."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tl.data import load_embedded

REPO = Path(__file__).resolve().parent.parent
SENTINEL = Path("/tmp/tl-bad-input-pickle-was-executed")


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {SENTINEL}",))


def _folder(root: Path, per_class: int = 8, classes: int = 3) -> Path:
    data = load_embedded("optdigits")
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for j, i in enumerate(np.flatnonzero(data.labels == c)[:per_class]):
            Image.fromarray((data.images[i].transpose(1, 2, 0) * 255).astype(np.uint8)).save(root / f"c{c}" / f"{j}.png")
    return root


def _mine(kind: str, path) -> list[str]:
    return ["--set", "targets=[mine]", "--set", f"data={{mine: {{{kind}: '{path}'}}}}", "--set", "shots=[1]",
            "--set", "weights=random",
            "--set", "queries=2", "--set", "episodes=1", "--set", "strategies=[{strategy: prototype}]"]


def _case_corrupt(tmp):
    root = _folder(tmp / "imgs")
    (root / "c1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return "compare", _mine("folder", root), "broken.png"


def _case_truncated_parquet(tmp):
    rows = pd.DataFrame({"image": [b"x" * 10] * 4, "label": ["a", "b"] * 2})
    rows.to_parquet(tmp / "d.parquet")
    data = (tmp / "d.parquet").read_bytes()
    (tmp / "d.parquet").write_bytes(data[: len(data) // 2])
    return "compare", _mine("parquet", tmp / "d.parquet"), "d.parquet"


def _case_csv_missing_column(tmp):
    (tmp / "m.csv").write_text("file,label\na.png,x\n")
    return "compare", _mine("csv", tmp / "m.csv"), "has no column 'path'"


def _case_missing_path(tmp):
    return "compare", _mine("folder", tmp / "nowhere"), "'" + str(tmp / "nowhere") + "' does not exist"


def _case_too_few_images(tmp):
    root = _folder(tmp / "imgs", per_class=8)
    for f in sorted((root / "c2").iterdir())[1:]:
        f.unlink()
    return "compare", _mine("folder", root), "class 'c2' has 1 images, fewer than shots + one query = 1 + 1"


def _case_empty_class_folder(tmp):
    root = _folder(tmp / "imgs")
    (root / "c9").mkdir()
    return "compare", _mine("folder", root), "class folder '" + str(root / "c9") + "' is empty"


def _case_label_not_in_class_list(tmp):
    root = _folder(tmp / "imgs")
    return "compare", _mine("folder", root) + ["--set", "data.mine.classes=[c0, c1]"], "c2"


def _case_mixed_sizes(tmp):
    root = _folder(tmp / "imgs")
    Image.new("L", (40, 30), 90).save(root / "c1" / "big.png")
    return "compare", _mine("folder", root), "have 2 different sizes: '" + str(root / "c1" / "big.png") + "' is 40x30"


def _case_unlabelled_folder_where_labels_are_needed(tmp):
    root = _folder(tmp / "imgs")
    flat = tmp / "flat"
    flat.mkdir()
    for f in sorted(root.glob("c*/*.png")):
        f.rename(flat / f"{f.parent.name}_{f.name}")
    return "finetune", ["--set", f"target={flat}", "--set", "weights=random"], \
        f"image folder '{flat}' holds 24 images but no class subfolders"


def _case_target_label_not_in_source(tmp):
    src = _folder(tmp / "src")
    tgt = _folder(tmp / "tgt", classes=4)
    return "adapt", ["--set", f"source={src}", "--set", f"targets=[{tgt}]", "--set", "weights=random",
                     "--set", "seeds=[0]"], "target 'tgt' has a label that source 'src' does not have"


def _case_unknown_backbone(tmp):
    return "compare", ["--set", "backbone=vgg99"], "unknown backbone 'vgg99'"


def _case_unknown_strategy(tmp):
    return "compare", ["--set", "strategies=[{strategy: maml}]"], "unknown strategy 'maml'"


def _case_unknown_key(tmp):
    return "compare", ["--set", "episdoes=5"], "unknown config key 'episdoes'"


def _case_wrong_type(tmp):
    return "compare", ["--set", "episodes=many"], "config key 'episodes'"


def _case_negative_shots(tmp):
    return "compare", ["--set", "shots=[-5]"], "config key 'shots'"


def _case_weights_other_arch(tmp):
    from safetensors.torch import save_file

    from tl.models import build_backbone

    save_file({k: v.contiguous() for k, v in build_backbone("resnet18").state_dict().items()}, tmp / "r18.safetensors")
    return "compare", ["--set", f"weights={tmp / 'r18.safetensors'}", "--set", "targets=[optdigits]",
                       "--set", "shots=[1]"], "do not fit backbone 'digits_cnn'"


def _case_not_weights(tmp):
    (tmp / "w.safetensors").write_text("hello, I am a text file")
    return "compare", ["--set", f"weights={tmp / 'w.safetensors'}"], "w.safetensors' is not a safetensors file"


def _case_pickle(tmp):
    with open(tmp / "w.pt", "wb") as f:
        pickle.dump({"stage": _Evil()}, f)
    return "compare", ["--set", f"weights={tmp / 'w.pt'}"], "w.pt' was refused: it holds objects other than tensors"


def _case_empty_choice(tmp):
    return "search", ["--set", "space={lr: {choice: []}}"], "'space.lr': 'choice' has an empty list"


def _case_dead_address(tmp):
    return "compare", ["--address", "127.0.0.1:9", "--set", "shots=[1]"], "--address 127.0.0.1:9: no Ray cluster answers"


def _case_storage_not_writable(tmp):
    (tmp / "file").write_text("x")
    return "compare", ["--storage", str(tmp / "file" / "home")], "is not writable: '" + str(tmp / "file") + "' is a file"


def _case_frozen_out_of_range(tmp):
    return "compare", ["--set", "strategies=[{strategy: finetune, params: {frozen: 9}}]"], "frozen depth 9 is out of range"


def _case_unknown_target(tmp):
    return "compare", ["--set", "targets=[mnistx]"], "'mnistx' is neither an embedded dataset"


def _case_missing_config_file(tmp):
    return "compare", ["--config", str(tmp / "nope.yaml")], "nope.yaml"


def _case_bad_yaml(tmp):
    (tmp / "bad.yaml").write_text("shots: [1, 5\nepisodes: 3\n")
    return "compare", ["--config", str(tmp / "bad.yaml")], "bad.yaml"


def _case_same_val_and_test_split(tmp):
    return "compare", ["--set", "val_split=test"], "validation episodes must share no image with test episodes"


def _case_bad_augment(tmp):
    return "compare", ["--set", "strategies=[{strategy: lp_ft, params: {augment: mixup}}]"], "augment must be one of"


def _case_one_class_folder(tmp):
    root = _folder(tmp / "imgs", classes=1)
    return "compare", _mine("folder", root), \
        f"image folder '{root}' has one class subfolder with images, 'c0': at least two classes are needed"


def _case_symlink_loop(tmp):
    root = _folder(tmp / "imgs")
    (root / "c1" / "again").symlink_to("..")
    return "compare", _mine("folder", root), "'c1/again' is a symbolic link to '" + str(root) + "', a folder that " \
        "contains the link itself: a loop"


CASES = [_case_one_class_folder, _case_symlink_loop, _case_corrupt, _case_truncated_parquet, _case_csv_missing_column, _case_missing_path, _case_too_few_images,
         _case_empty_class_folder, _case_label_not_in_class_list, _case_mixed_sizes,
         _case_unlabelled_folder_where_labels_are_needed, _case_target_label_not_in_source, _case_unknown_backbone, _case_unknown_strategy,
         _case_unknown_key, _case_wrong_type, _case_negative_shots, _case_weights_other_arch, _case_not_weights,
         _case_pickle, _case_empty_choice, _case_dead_address, _case_storage_not_writable, _case_frozen_out_of_range,
         _case_unknown_target, _case_missing_config_file, _case_bad_yaml, _case_same_val_and_test_split,
         _case_bad_augment]


# these run as their own process, exactly the documented command line (the address case needs a
# process whose Ray is not started yet); the rest call the same entry point (``_cli.run`` of the
# workflow's ``main``, what ``python -m`` runs) in this process, on the session's Ray, which spares
# each case the interpreter start and the imports (about 5 s each)
OWN_PROCESS = {"corrupt", "pickle", "unknown_key", "dead_address"}


def _run_workflow(workflow: str, argv: list[str], address: str, monkeypatch, capfd) -> tuple[int, str]:
    """The exit status and stderr of ``python -m workflows.<workflow> ARGV``, run here."""
    import importlib

    from workflows import _cli

    module = importlib.import_module(f"workflows.{workflow}")
    monkeypatch.setattr(sys, "argv", [f"{workflow}.py", *argv])
    monkeypatch.setenv("RAY_ADDRESS", address)
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_:
        _cli.run(module.main)
    return exit_.value.code, capfd.readouterr().err


@pytest.mark.parametrize("case", CASES, ids=[c.__name__[6:] for c in CASES])
def test_bad_input_is_one_clear_error(case, ray_local, tmp_path, monkeypatch, capfd):
    SENTINEL.unlink(missing_ok=True)
    workflow, args, expected = case(tmp_path)
    out = tmp_path / "out"
    address = ray_local.get_runtime_context().gcs_address
    argv = ["--output", str(out)]
    if "--storage" not in args:
        argv += ["--storage", str(tmp_path / "home")]
    argv += args
    if case.__name__[6:] in OWN_PROCESS:
        r = subprocess.run([sys.executable, "-m", f"workflows.{workflow}", *argv], cwd=REPO,
                           env={**os.environ, "RAY_ADDRESS": address}, capture_output=True, text=True, timeout=300)
        code, stderr = r.returncode, r.stderr
    else:
        code, stderr = _run_workflow(workflow, argv, address, monkeypatch, capfd)
    assert code == 2, (code, stderr[-3000:])
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr[-3000:]
    assert expected in errors[0], errors[0]
    print(f"\n| {case.__name__[6:]} | `{errors[0][:200]}` |")  # the catalogue's table (pytest -s)
    assert "Traceback" not in stderr
    for f in ("rows.parquet", "summary.md", "best.yaml", "trials.csv"):
        assert not (out / f).exists(), f"a failed run left {f}"
    assert not out.exists(), f"a failed run left its output folder: {sorted(os.listdir(out))}"
    assert not SENTINEL.exists(), "a pickle was executed"


def test_image_with_other_channel_counts_is_converted(ray_local, tmp_path):
    """Grey, grey+alpha, RGBA and palette images are converted to RGB (stated in tl.data.sources)."""
    from tl.data import load_image_folder

    root = tmp_path / "imgs"
    for mode, name in (("L", "grey"), ("LA", "grey_alpha"), ("RGBA", "rgba"), ("P", "palette"), ("RGB", "rgb")):
        (root / name).mkdir(parents=True)
        Image.new(mode, (9, 7)).save(root / name / "a.png")
    data = load_image_folder(root, (28, 28))
    assert data.images.shape == (5, 3, 28, 28) and data.images.dtype == np.float32


def test_a_one_class_folder_is_refused_by_check_dry_run_and_export(ray_local, tmp_path, monkeypatch, capfd):
    """`--check` lists the user's data (no Ray, nothing decoded), so a one-class folder is refused
    before anything runs, as it is by --dry-run and by export; a failed export writes no model and
    leaves no folder behind."""
    root = _folder(tmp_path / "imgs", classes=1)
    expected = f"error: image folder '{root}' has one class subfolder with images, 'c0': at least two classes are needed"
    address = ray_local.get_runtime_context().gcs_address
    home = ["--storage", str(tmp_path / "home")]
    for workflow, args in (("compare", _mine("folder", root) + ["--check"]),
                           ("compare", _mine("folder", root) + ["--dry-run"]),
                           ("export", ["--set", "strategy=prototype", "--set", f"data={root}", "--check"]),
                           ("export", ["--set", "strategy=prototype", "--set", f"data={root}", "--set", "weights=random",
                                       "--output", str(tmp_path / "models" / "mine")])):
        code, stderr = _run_workflow(workflow, home + args, address, monkeypatch, capfd)
        errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
        assert code == 2 and len(errors) == 1 and errors[0].startswith(expected), (workflow, args, stderr[-2000:])
    assert not (tmp_path / "models").exists()
    # a folder that is not on this machine (a cluster's) is a note of --check, not an error
    code, _ = _run_workflow("compare", home + _mine("folder", tmp_path / "elsewhere") + ["--check"], address,
                            monkeypatch, capfd)
    assert code == 0


def test_every_bad_file_of_a_folder_is_listed_in_one_error(ray_local, tmp_path, monkeypatch, capfd):
    """Ten bad files in a folder split in halves: one error lists all ten, both halves together, each
    with its path and a readable reason (an empty file, not an image, a damaged image), never PIL's
    in-memory stream; the run leaves no output folder."""
    from tl.data.spec import DataSpec, load_target

    root = _folder(tmp_path / "imgs", per_class=12)
    good = (root / "c0" / "0.png").read_bytes()
    bad = {}
    for j in range(10):
        f = root / f"c{j % 3}" / f"bad{j}.png"
        if j < 4:
            f.write_bytes(b"")
            bad[f] = "empty file (0 bytes)"
        elif j < 7:
            f.write_text("a note, not a picture")
            bad[f] = "not an image: no image format recognised in its 21 bytes"
        else:
            f.write_bytes(good[: len(good) // 2])
            bad[f] = "a damaged image, it cannot be decoded"
    halves = load_target("mine", DataSpec(folder=str(root), split="halves", size=(8, 8)), lazy=True)
    where = {str(f): [k for k, part in halves.items() if str(f) in set(part.images.paths)] for f in bad}
    assert {k for ks in where.values() for k in ks} == {"test", "val"}, "the bad files lie in both halves"
    out = tmp_path / "new" / "out"
    code, stderr = _run_workflow("compare", ["--output", str(out), "--storage", str(tmp_path / "home")]
                                 + _mine("folder", root) + ["--set", "data.mine.split=halves"],
                                 ray_local.get_runtime_context().gcs_address, monkeypatch, capfd)
    assert code == 2, stderr[-3000:]
    assert stderr.count("error: ") == 1 and "error: 10 unreadable images in 'mine'" in stderr, stderr[-3000:]
    listed = {line.strip().split(": ", 1)[0]: line.strip().split(": ", 1)[1] for line in stderr.splitlines()
              if line.startswith("  /")}
    assert set(listed) == {str(f) for f in bad}
    for f, reason in bad.items():
        assert listed[str(f)].startswith(reason), (f, listed[str(f)])
    assert "BytesIO" not in stderr
    assert not (tmp_path / "new").exists(), "a failed run left an empty output folder"


def test_no_empty_folder_removes_only_what_it_made_empty(tmp_path):
    from workflows import _cli

    with pytest.raises(RuntimeError):
        with _cli.no_empty_folder(str(tmp_path / "a" / "b" / "c")):
            (tmp_path / "a" / "b" / "c").mkdir(parents=True)
            raise RuntimeError("bad input")
    assert not (tmp_path / "a").exists()
    with pytest.raises(RuntimeError):
        with _cli.no_empty_folder(str(tmp_path / "a" / "b" / "c")):
            (tmp_path / "a" / "b" / "c").mkdir(parents=True)
            (tmp_path / "a" / "b" / "keep.txt").write_text("written by the run")
            raise RuntimeError("bad input")
    assert (tmp_path / "a" / "b" / "keep.txt").is_file() and not (tmp_path / "a" / "b" / "c").exists()
    (tmp_path / "there").mkdir()
    with pytest.raises(RuntimeError):
        with _cli.no_empty_folder(str(tmp_path / "there")):
            raise RuntimeError("bad input")
    assert (tmp_path / "there").is_dir()
    with _cli.no_empty_folder(str(tmp_path / "fine")):
        (tmp_path / "fine").mkdir()
    assert (tmp_path / "fine").is_dir()
