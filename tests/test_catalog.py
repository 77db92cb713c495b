"""Model catalogs: a models folder and a YAML file, with errors that name the file, line and field."""

from __future__ import annotations

import pytest

from tokenloom.catalog import CatalogError, parse_keep_alive, specs_from_dir, specs_from_yaml

GOOD = """\
models:
  - name: tiny
    source: {path}
    dtype: float32
    kv_cache_gib: 0.05
    keep_alive: 10m
    sampling: {{temperature: 0.7, top_p: 0.9}}
    chat_template: "{{{{ messages[0]['content'] }}}}"
  - name: default
    source: gemma-3-270m
    quantization: int4
"""


@pytest.mark.parametrize("value,seconds", [(30, 30.0), ("30s", 30.0), ("10m", 600.0), ("2h", 7200.0),
                                           ("1.5m", 90.0), (0, 0.0), (-1, -1.0), ("-1m", -1.0), ("250ms", 0.25)])
def test_keep_alive_takes_seconds_and_durations(value, seconds):
    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", ["soon", "10 minutes", True, "5d", -5, "-3m", float("nan"), float("inf")])
def test_keep_alive_rejects_other_values(value):
    with pytest.raises(ValueError, match="keep_alive"):
        parse_keep_alive(value)


def test_a_good_catalog_gives_its_specs(tmp_path, tiny_models):
    catalog = tmp_path / "models.yaml"
    catalog.write_text(GOOD.format(path=tiny_models["llama"]))
    tiny, default = specs_from_yaml(catalog)
    assert (tiny.name, tiny.source, tiny.keep_alive_s) == ("tiny", str(tiny_models["llama"]), 600.0)
    assert tiny.engine_options == {"dtype": "float32", "kv_cache_gib": 0.05}
    assert tiny.default_sampling == {"temperature": 0.7, "top_p": 0.9}
    assert tiny.chat_template == "{{ messages[0]['content'] }}"
    assert default.engine_options == {"quantization": "int4"}
    assert default.keep_alive_s is None and default.chat_template is None


@pytest.mark.parametrize("text,where", [
    ("models:\n  - name: a\n    source: x\n    dtype: float8\n", "line 4: field 'dtype'"),
    ("models:\n  - name: a\n    source: x\n    colour: blue\n", "line 4: field 'colour': unknown option"),
    ("models:\n  - name: a\n", "line 2: field 'source': required"),
    ("models:\n  - name: a\n    source: x\n    keep_alive: soon\n", "line 4: field 'keep_alive'"),
    ("models:\n  - name: a\n    source: x\n    sampling: {temperature: -1}\n", "line 4: field 'sampling'"),
    ("models:\n  - name: a\n    source: x\n  - name: a\n    source: y\n", "line 4: field 'name': 'a' is already used"),
    ("models:\n  - name: a\n    source: [x\n", "line 4: not valid YAML"),
    ("model:\n  - name: a\n", "line 1: expected a top-level 'models:' list"),
    ("models:\n  - just a string\n", "line 2: each model must be a mapping"),
    ("models:\n  - name: a\n    source: x\n    model: y\n", "line 4: field 'model'"),
])
def test_a_malformed_catalog_names_the_line_and_field(tmp_path, text, where):
    catalog = tmp_path / "models.yaml"
    catalog.write_text(text)
    with pytest.raises(CatalogError) as info:
        specs_from_yaml(catalog)
    assert str(info.value).startswith(f"{catalog} ") and where in str(info.value)


def test_a_missing_catalog_is_a_clear_error(tmp_path):
    with pytest.raises(CatalogError, match="cannot read the catalog"):
        specs_from_yaml(tmp_path / "nope.yaml")


def test_a_models_folder_lists_hf_folders_and_gguf_files(tmp_path, tiny_models):
    root = tmp_path / "models"
    (root / "nested").mkdir(parents=True)
    (root / "llama").symlink_to(tiny_models["llama"], target_is_directory=True)
    (root / "nested" / "small.gguf").write_bytes(b"GGUF")
    specs = {s.name: s.source for s in specs_from_dir(root)}
    assert specs == {"llama": str(root / "llama"), "small": str(root / "nested" / "small.gguf")}
    (root / "llama.gguf").write_bytes(b"GGUF")
    with pytest.raises(CatalogError, match="two models named 'llama'"):
        specs_from_dir(root)
    with pytest.raises(CatalogError, match="not a directory"):
        specs_from_dir(tmp_path / "missing")


def test_a_model_folders_own_subfolders_are_not_models(tmp_path):
    from tests.encoder_models import minilm_path

    root = tmp_path / "models"
    root.mkdir()
    (root / "minilm").symlink_to(minilm_path(), target_is_directory=True)  # has 1_Pooling/config.json
    assert (minilm_path() / "1_Pooling" / "config.json").is_file()
    assert [s.name for s in specs_from_dir(root)] == ["minilm"]


def test_cli_models_list_and_show(tmp_path, tiny_models, capsys):
    from tokenloom.cli import main

    catalog = tmp_path / "models.yaml"
    catalog.write_text(f"models:\n  - name: tiny\n    source: {tiny_models['llama']}\n"
                       f"    chat_template: 'custom {{{{ messages }}}}'\n  - name: ghost\n    source: /nowhere\n")
    assert main(["models", "list", "--models-config", str(catalog)]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert any(line.startswith("tiny") and f"hf    {tiny_models['llama']}" in line for line in listed)
    assert any(line.startswith("gemma-3-270m") and "gguf" in line for line in listed)
    assert any(line.startswith("ghost") and "?" in line for line in listed)  # listed, marked unresolvable
    assert main(["models", "show", "tiny", "--models-config", str(catalog)]) == 0
    shown = capsys.readouterr().out
    assert "architecture:   LlamaForCausalLM" in shown and "context length: " in shown
    assert "parameters:     " in shown and " M" in shown and "float32" in shown
    assert "chat template:\ncustom {{ messages }}" in shown
    assert main(["models", "show", "nothing-here"]) == 2
    assert "tokenloom: error:" in capsys.readouterr().err
