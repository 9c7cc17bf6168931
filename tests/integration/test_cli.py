"""The `recsys` command end to end, in process: exit codes, one-line errors, store round trip."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from recsys_cli.main import main

TINY = "synthetic:users=120,items=40,max_len=10,min_len=4"


def run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str):
    monkeypatch.setattr(sys, "argv", ["recsys", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["train", "--hidden", "abc"], "Invalid value for '--hidden'"),
        (["train", "--hidden", "30", "--n-heads", "4"], "not divisible"),
        (["train", "--recipe", "missing.toml"], "recipe not found"),
        (["train", "--data", "nowhere.txt"], "no such file"),
        (["train", "--data", "synthetic:users=zero"], "users"),
        (["bogus"], "No such command"),
        (["evaluate", "x", "--stage", "train"], "--stage must be 'test' or 'valid'"),
        (["store", "show", "a@b"], "malformed model reference"),
        (["serve", "--variant", "full"], "--variant 'full': expected NAME=VALUE"),
        (["serve", "--variant", "a=m@1", "--weight", "b=1"], "weights name unknown variants"),
        (["serve", "--variant", "a=m@1", "--weight", "a=x"], "'x' is not a valid value"),
        (["serve", "--variant", "a=m@1", "--max-wait-s", "-1"], "settings.batch.max_wait_s"),
        (["export", "nothing@1"], "does not exist; point --store"),
        (["quantize", "m@1", "--mode", "int4", "--block-size", "24"], "'column' or one of 16/32"),
        (["quantize", "m@1", "--block-size", "16"], "apply to --mode int4, not 'dynamic'"),
        (["quantize", "m@1", "--mode", "int4", "--qat-epochs", "-1"], "--qat-epochs"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(monkeypatch, capsys, tmp_path, args, expected) -> None:
    monkeypatch.setenv("RECSYS_STORE", str(tmp_path / "store"))
    code, _, err = run(monkeypatch, capsys, *args)
    assert code == 2
    assert expected in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_bad_recipe_key_names_file_and_key(monkeypatch, capsys, tmp_path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text("[model]\nhiden = 32\n")
    code, _, err = run(monkeypatch, capsys, "train", "--recipe", str(recipe))
    assert code == 2 and str(recipe) in err and "hiden" in err


def test_train_store_evaluate_round_trip(monkeypatch, capsys, tmp_path) -> None:
    store = str(tmp_path / "store")
    args = ["--store", store]
    code, out, err = run(
        monkeypatch,
        capsys,
        "train",
        "--data",
        TINY,
        "--name",
        "tiny",
        "--hidden",
        "8",
        "--max-len",
        "10",
        "--max-epochs",
        "2",
        "--no-progress",
        *args,
    )
    assert code == 0, err
    assert "popularity" in out and "tiny@1" in out
    code, out, _ = run(monkeypatch, capsys, "store", "list", *args)
    assert code == 0 and "tiny@1" in out and "teacher" in out
    code, out, _ = run(monkeypatch, capsys, "store", "show", "tiny@latest", *args)
    manifest = json.loads(out)
    assert manifest["kind"] == "teacher" and manifest["architecture"]["hidden"] == 8
    assert {"model.safetensors", "model.onnx", "items.json"} == set(manifest["artifacts"])
    assert manifest["artifacts"]["model.onnx"]["format"] == "onnx"
    assert manifest["metrics"]["parity_top10_agreement"] > 0.99
    assert manifest["metrics"]["test_ndcg@10"] >= 0 and manifest["dataset"]["n_items"] == 40
    code, out, err = run(monkeypatch, capsys, "evaluate", "tiny", *args)
    assert code == 0, err
    assert f"{manifest['metrics']['test_ndcg@10']:.4f}" in out  # same numbers as at publish

    # data that is not what the model was trained on is refused: item ids would not line up
    other = TINY.replace("users=120", "users=121")
    code, _, err = run(monkeypatch, capsys, "evaluate", "tiny", "--data", other, *args)
    assert code == 2 and "differs from the data" in err
    # a tampered artifact is refused with one line naming it
    (Path(store) / "tiny" / "1" / "model.safetensors").write_bytes(b"garbage")
    code, _, err = run(monkeypatch, capsys, "evaluate", "tiny@1", *args)
    assert code == 2 and "model.safetensors" in err and err.count("\n") == 1


def _events_csv(folder: Path) -> Path:
    """A generic event log whose columns must be named: users u*, items item*, times."""
    rows = ["who,what,when"]
    rng = __import__("random").Random(0)
    for user in range(40):
        for t in range(8):
            rows.append(f"u{user},item{rng.randrange(25)},{1000 + t}")
    path = folder / "events.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


COLUMNS = ("--user-col", "who", "--item-col", "what", "--time-col", "when")


def test_train_from_generic_event_csv(monkeypatch, capsys, tmp_path) -> None:
    path = _events_csv(tmp_path)
    store = str(tmp_path / "store")
    base = [
        "train",
        "--data",
        str(path),
        "--hidden",
        "8",
        "--max-len",
        "8",
        "--max-epochs",
        "1",
        "--no-progress",
        "--store",
        store,
        "--name",
        "ev",
    ]
    code, _, err = run(monkeypatch, capsys, *base)
    assert code == 2 and "who" in err  # columns must be named for a generic CSV
    code, _, err = run(monkeypatch, capsys, *base, *COLUMNS)
    assert code == 0, err
    from compression.data.sequences import read_item_mapping

    mapping = read_item_mapping(Path(store) / "ev" / "1" / "items.json")
    assert mapping and all(item.startswith("item") for item in mapping)  # the user's own ids

    # The trained model, used as an ONNX teacher from elsewhere, teaches a student on the same
    # event log: --data with its columns, as for import-onnx.
    items = tmp_path / "teacher-items.txt"
    items.write_text("\n".join(mapping) + "\n")
    recipe = tmp_path / "student.toml"
    recipe.write_text(
        'name = "ev-student"\nteacher = "external"\n'
        "[model]\nhidden = 8\nmax_len = 8\nn_blocks = 1\n"
        "[train]\nmax_epochs = 1\nthreads = 1\n[distill]\ntop_k = 5\n"
    )
    teacher = str(Path(store) / "ev" / "1" / "model.onnx")
    distill = ["distill", "--recipe", str(recipe), "--teacher-onnx", teacher,
               "--teacher-items", str(items), "--data", str(path), "--teacher-context", "8",
               "--no-progress", "--store", store]  # fmt: skip
    code, _, err = run(monkeypatch, capsys, *distill)
    assert code == 2 and "who" in err  # the same column check as for training
    code, out, err = run(monkeypatch, capsys, *distill, *COLUMNS)
    assert code == 0, err
    assert "published ev-student@1" in out
    manifest = json.loads((Path(store) / "ev-student" / "1" / "manifest.json").read_text())
    assert manifest["recipe"]["external_teacher"]["unknown_items"] == 0


def test_distill_refuses_data_flags_without_an_onnx_teacher(monkeypatch, capsys, tmp_path) -> None:
    code, _, err = run(
        monkeypatch, capsys, "distill", "--recipe", "r.toml", "--data", "x.csv", "--user-col", "u"
    )
    assert code == 2 and "--data, --user-col only apply with --teacher-onnx" in err


def test_time_limit_before_the_first_validation_still_publishes(
    monkeypatch, capsys, tmp_path
) -> None:
    # A limit that runs out in epoch 1 (with validation every 5 epochs, since retired, this
    # once ended in KeyError 'hr@10')
    recipe = tmp_path / "r.toml"
    recipe.write_text("[train]\nmax_epochs = 10\n")
    store = str(tmp_path / "store")
    code, out, err = run(
        monkeypatch, capsys, "train", "--recipe", str(recipe), "--data", TINY, "--name", "tl",
        "--hidden", "8", "--max-len", "10", "--time-limit-s", "0.000001", "--no-progress",
        "--store", store,
    )  # fmt: skip
    assert code == 0, err
    assert "tl@1" in out and "1 epochs (best 1)" in out
    code, out, _ = run(monkeypatch, capsys, "store", "show", "tl@1", "--store", store)
    manifest = json.loads(out)
    assert manifest["recipe"]["stopped_by"] == "time_limit"
    assert manifest["metrics"]["valid_ndcg@10"] >= 0 and manifest["metrics"]["best_epoch"] == 1


@pytest.mark.slow
def test_demo_builds_the_family_and_writes_the_report(monkeypatch, capsys, tmp_path) -> None:
    store = tmp_path / "models"
    code, out, err = run(
        monkeypatch, capsys, "demo", "--store", str(store), "--no-progress",
        "--data", "synthetic:users=150,items=40,max_len=12,min_len=5,seed=5",
    )  # fmt: skip
    assert code == 0, err
    assert "built 5 models" in out and "demo-student-int8-dynamic" in out
    report = json.loads((tmp_path / "reports" / "compare-demo.json").read_text())
    names = {v["ref"].split("@")[0] for v in report["variants"]}
    assert {"demo-teacher", "demo-student", "demo-student-int8-dynamic",
            "demo-student-labels", "demo-teacher-int8-dynamic"} <= names  # fmt: skip
    assert report["batch_sizes"] == [1, 64]
    # It ends with the short table and the command that serves teacher and INT8 student.
    table = out[out.index("variant  ") :]
    for label in ("teacher", "student (distilled)", "student INT8", "control: labels only"):
        assert label in table
    assert out.rstrip().endswith(
        f"recsys serve --store {store} --variant full=demo-teacher@1 "
        "--variant small=demo-student-int8-dynamic@1 --port 8000"
    )


BUILD = """
family = "rep"
[data]
path = "synthetic:users=80,items=30,max_len=8,min_len=4,seed=3"
[teacher]
model = { hidden = 8, max_len = 8, n_blocks = 1 }
train = { max_epochs = 1 }
[[quantize]]
source = "rep-teacher"
config = { mode = "dynamic" }
[compare]
batch_sizes = [1]
"""


def test_build_and_compare_reports_go_to_the_store_not_the_source_tree(
    monkeypatch, capsys, tmp_path
) -> None:
    # Run from the repository root, where a relative default like benchmarks/results would land.
    repo = Path(__file__).resolve().parents[2]
    results = repo / "benchmarks" / "results"
    before = set(results.rglob("*")) if results.exists() else set()
    monkeypatch.chdir(repo)
    recipe = tmp_path / "rep.toml"
    recipe.write_text(BUILD)
    store = tmp_path / "models"
    fast = ["--repeats-b1", "2", "--repeats-b64", "1"]
    code, out, err = run(
        monkeypatch, capsys, "build", "--recipe", str(recipe), "--store", str(store), *fast
    )  # fmt: skip
    assert code == 0, err
    # Output captured, not a terminal: log lines instead of progress bars that print nothing.
    assert re.search(r"^epoch +1 ", out, re.MULTILINE), out
    assert (tmp_path / "reports" / "compare-rep.json").is_file()
    assert {"compare-rep.md", "compare-rep.png"} <= {
        p.name for p in (tmp_path / "reports").iterdir()
    }
    code, _, err = run(
        monkeypatch, capsys, "compare", "rep-teacher", "--store", str(store), "--histories", "8",
        *fast,
    )  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "reports" / "compare-rep-teacher-1.json").is_file()
    # --out wins, for both commands
    code, _, err = run(
        monkeypatch, capsys, "build", "--recipe", str(recipe), "--store", str(store),
        "--no-progress", "--out", str(tmp_path / "mine"), *fast,
    )  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "mine" / "compare-rep.json").is_file()
    code, _, err = run(
        monkeypatch, capsys, "compare", "rep-teacher@1", "--store", str(store),
        "--histories", "8", "--out", str(tmp_path / "mine"), "--stem", "c", *fast,
    )  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "mine" / "c.json").is_file()
    after = set(results.rglob("*")) if results.exists() else set()
    assert not [p for p in after - before if "rep" in p.name], "a report went into the source tree"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--precision", "int4"], "--precision 'int4'"),
        (["--index", "annoy"], "--index 'annoy'"),
        (["--index", '{"type": "hnsw", "m": 1}'], "m"),
    ],
)
def test_two_stage_refuses_bad_options_in_one_line(
    monkeypatch, capsys, tmp_path, args: list[str], message: str
) -> None:
    code, _, err = run(monkeypatch, capsys, "two-stage", "t@1", *args, "--store", str(tmp_path))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
