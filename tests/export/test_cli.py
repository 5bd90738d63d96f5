"""`relinear onnx | verify | report`: the happy path, and every bad input ending with exit code 2, one line on
stderr naming the file or field, and no output file left behind."""

from __future__ import annotations

import argparse
import json

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from relinear.export.cli import add_subcommands

RECIPE = 'seed = 0\n[[rules]]\nname = "low_rank"\nrank = 2\n'


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="relinear")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.run(args)


@pytest.fixture()
def model_file(tmp_path):
    module = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).eval()
    path = tmp_path / "model.onnx"
    torch.onnx.export(module, (torch.randn(3, 5, 6),), path, dynamo=False, opset_version=17, input_names=["x"],
                      dynamic_axes={"x": {0: "batch", 1: "seq"}})
    return path


@pytest.fixture()
def recipe_file(tmp_path):
    path = tmp_path / "recipe.toml"
    path.write_text(RECIPE)
    return path


def test_onnx_verify_report_round_trip(tmp_path, model_file, recipe_file, capsys):
    out = tmp_path / "out.onnx"
    assert _main(["onnx", str(model_file), "-o", str(out), "--recipe", str(recipe_file)]) == 0
    printed = capsys.readouterr().out
    assert "low_rank" in printed and str(out) in printed

    assert _main(["verify", str(model_file), str(out), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in stats] == [o.name for o in onnx.load(model_file).graph.output]
    assert all(s["relative_rms"] > 0 for s in stats)  # rank 2 of 6 / 8 is an approximation

    assert _main(["verify", str(model_file), str(model_file)]) == 0
    assert "max abs 0.000e+00" in capsys.readouterr().out

    assert _main(["report", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"] == {"low_rank": 2}
    assert _main(["report", str(out)]) == 0
    assert "rank=2" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "out.onnx", "recipe.toml"]


def _truncated(tmp_path, model_file):
    path = tmp_path / "truncated.onnx"
    data = model_file.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path, "not a readable ONNX file"


def _not_onnx(tmp_path, model_file):
    path = tmp_path / "notes.onnx"
    path.write_text("this is not a model\n" * 20)
    return path, "not a readable ONNX file"


def _missing_file(tmp_path, model_file):
    return tmp_path / "nowhere.onnx", "no such file"


def _missing_initializer(tmp_path, model_file):
    model = onnx.load(model_file)
    name = model.graph.initializer[0].name
    del model.graph.initializer[0]
    path = tmp_path / "missing_init.onnx"
    onnx.save(model, path)
    return path, name


def _old_opset(tmp_path, model_file):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    path = tmp_path / "opset11.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)]), path)
    return path, "opset"


def _expect_bad_input(capsys, argv, *named):
    assert _main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for text in named:
        assert text in err, err


@pytest.mark.parametrize("make", [_truncated, _not_onnx, _missing_file, _missing_initializer, _old_opset])
@pytest.mark.parametrize("command", ["onnx", "verify", "report"])
def test_bad_model_file_exits_2_naming_it(tmp_path, model_file, recipe_file, capsys, make, command):
    bad, named = make(tmp_path, model_file)
    out = tmp_path / "out.onnx"
    argv = {"onnx": ["onnx", str(bad), "-o", str(out), "--recipe", str(recipe_file)],
            "verify": ["verify", str(model_file), str(bad)],
            "report": ["report", str(bad)]}[command]
    _expect_bad_input(capsys, argv, str(bad), named)
    assert not out.exists() and not (tmp_path / "out.onnx.data").exists()


@pytest.mark.parametrize("text, field", [
    ('[[rules]]\nname = "low_rank"\nrnak = 2\n', "rnak"),
    ('[[rules]]\nname = "monarc"\n', "monarc"),
    ('sed = 0\n', "sed"),
    ('[[rules]\nname = "low_rank"', "not valid TOML"),
])
def test_recipe_typo_exits_2_naming_the_field(tmp_path, model_file, capsys, text, field):
    recipe, out = tmp_path / "bad.toml", tmp_path / "out.onnx"
    recipe.write_text(text)
    _expect_bad_input(capsys, ["onnx", str(model_file), "-o", str(out), "--recipe", str(recipe)], str(recipe), field)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.toml", "model.onnx"]


def test_report_of_a_file_relinear_did_not_write(model_file, capsys):
    _expect_bad_input(capsys, ["report", str(model_file)], str(model_file), "no relinear report")


def test_output_equal_to_input_is_refused(model_file, recipe_file, capsys):
    before = model_file.read_bytes()
    _expect_bad_input(capsys, ["onnx", str(model_file), "-o", str(model_file), "--recipe", str(recipe_file)],
                      str(model_file))
    assert model_file.read_bytes() == before
