"""Security rules that a code change could quietly break: model files are read with safetensors or
``torch.load(weights_only=True)`` only, nothing unpickles a user's file, and the library never
starts Ray or parses arguments."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCES = sorted([*REPO.glob("tl/**/*.py"), *REPO.glob("workflows/**/*.py"), *REPO.glob("benchmarks/**/*.py")])


def _calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_every_torch_load_is_weights_only():
    found = 0
    for path in SOURCES:
        for node, name in _calls(path):
            if name == "torch.load":
                found += 1
                kw = {k.arg: k.value for k in node.keywords}
                assert "weights_only" in kw and ast.literal_eval(kw["weights_only"]) is True, \
                    f"{path.relative_to(REPO)}:{node.lineno}: torch.load without weights_only=True"
    assert found >= 1


def test_nothing_unpickles_files():
    banned = {"pickle.load", "pickle.loads", "cloudpickle.load", "cloudpickle.loads", "joblib.load", "dill.load",
              "numpy.load", "np.load", "pd.read_pickle", "pandas.read_pickle"}
    for path in SOURCES:
        for node, name in _calls(path):
            assert name not in banned, f"{path.relative_to(REPO)}:{node.lineno}: {name} can execute code from a file"


def test_library_never_starts_ray_or_parses_arguments():
    for path in REPO.glob("tl/**/*.py"):
        for node, name in _calls(path):
            assert name not in ("ray.init", "argparse.ArgumentParser"), f"{path.relative_to(REPO)}:{node.lineno}: {name}"
