"""Model admission and resource limits: with one allowed root, every hostile request is refused in one line before
anything outside the root is opened; a config claiming more parameters than the limit is refused before any weight
is read; pickle-only folders need a setting and then load with weights_only; CSV uploads have limits of their own."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import zoo

from engine.data.sets import DataError, load_csv
from engine.model import admission, footprint, loading
from engine.model.loading import NotAllowed, load_model, load_model_or_fallback

ROOT = Path(__file__).resolve().parents[2]
OPENED: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if OPENED is not None and event in ("open", "os.listdir", "os.scandir") and args and args[0] is not None:
        OPENED.append(os.fsdecode(args[0]) if isinstance(args[0], (str, bytes, os.PathLike)) else str(args[0]))


sys.addaudithook(_audit)


class Recording:
    """Every file or folder the process opens or lists meanwhile."""

    def __enter__(self) -> list[str]:
        global OPENED
        OPENED = []
        return OPENED

    def __exit__(self, *_exc) -> None:
        global OPENED
        OPENED = None


@pytest.fixture(scope="module")
def zoo_root(tmp_path_factory):
    base = tmp_path_factory.mktemp("admission")
    root, outside = base / "models", base / "outside"
    root.mkdir()
    outside.mkdir()
    zoo.save("bert", root / "bert")
    zoo.save("bert", outside / "secret")
    return root, outside


@pytest.fixture
def one_root(zoo_root, monkeypatch):
    root, outside = zoo_root
    monkeypatch.setenv("ENGINE_ALLOWED_MODELS", str(root))
    monkeypatch.delenv("ENGINE_MAX_MODEL_BYTES", raising=False)
    monkeypatch.delenv("ENGINE_ALLOW_PICKLE", raising=False)
    return root, outside


def refused_without_reading(name: str, outside: Path) -> str:
    with Recording() as opened:
        with pytest.raises(NotAllowed) as caught:
            load_model(name)
    message = str(caught.value)
    assert "\n" not in message and "is not allowed here" in message
    assert not [path for path in opened if str(outside) in path], opened
    return message


def test_a_folder_under_the_root_loads_and_embedded_always_does(one_root):
    root, _ = one_root
    model, _ = load_model(str(root / "bert"))
    assert model.config.num_labels == 2
    assert load_model("embedded")[0].config.num_labels == 2


def test_hostile_paths_are_refused_before_anything_outside_is_read(one_root, tmp_path):
    root, outside = one_root
    (root / "escape").symlink_to(outside / "secret")
    (root / "up").symlink_to("..")
    messages = {refused_without_reading(name, outside) for name in (
        str(outside / "secret"),  # outside the root
        str(root / "escape"),  # a symlink inside the root to a folder outside
        str(root / ".." / "outside" / "secret"),  # `..`
        str(root / "up" / "outside" / "secret"),  # a symlink to the root's parent, then down
        str(root / "bert" / ".." / ".." / "outside" / "secret"),
        str(outside / "does-not-exist"),  # the same answer whether or not it exists: no probing
        "~/../../etc",
    )}
    assert len({message.split(" is not allowed")[1] for message in messages}) == 1


def test_the_recording_sees_what_a_load_opens(zoo_root, monkeypatch):
    """The control for the checks above: with any model allowed, loading the outside folder opens its files."""
    _, outside = zoo_root
    monkeypatch.setenv("ENGINE_ALLOWED_MODELS", "any")
    with Recording() as opened:
        load_model(str(outside / "secret"))
    assert any(path.endswith("config.json") and str(outside) in path for path in opened)


def test_a_folder_whose_file_links_outside_is_refused(one_root, tmp_path):
    root, outside = one_root
    folder = root / "linked-config"
    folder.mkdir(exist_ok=True)
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((root / "bert" / name).read_bytes())
    (folder / "config.json").unlink(missing_ok=True)
    (folder / "config.json").symlink_to(outside / "secret" / "config.json")
    assert "config.json links outside" in refused_without_reading(str(folder), outside)


def test_hub_ids_need_a_rule_and_a_refusal_keeps_the_app_on_the_embedded_model(one_root, monkeypatch):
    _, outside = one_root
    refused_without_reading("someorg/somemodel", outside)
    model, _, warning = load_model_or_fallback(str(outside / "secret"), any_error=True)
    assert model.name_or_path == "embedded" and "is not allowed here" in warning
    monkeypatch.setenv("ENGINE_ALLOWED_MODELS", "someorg/*")
    with pytest.raises(loading.ModelError) as caught:  # allowed: offline here, so not found, but not refused
        load_model("someorg/somemodel")
    assert not isinstance(caught.value, NotAllowed)
    for hostile in ("someorg/..", "someorg/../x", "someorg/.hidden"):
        with pytest.raises(NotAllowed):
            load_model(hostile)


def test_the_default_follows_the_address_the_server_listens_on(zoo_root, monkeypatch, tmp_path):
    root, _ = zoo_root
    monkeypatch.delenv("ENGINE_ALLOWED_MODELS", raising=False)
    monkeypatch.setenv("ENGINE_CONFIG", str(tmp_path / "absent.toml"))
    monkeypatch.setattr(admission, "_server", {"declared": False, "address": None})
    assert admission.policy().any  # the CLI
    admission.serving("127.0.0.1")
    assert admission.policy().any  # a laptop
    admission.serving(None)  # every interface: only the project's own models
    assert not admission.policy().any
    with pytest.raises(NotAllowed, match="ENGINE_ALLOWED_MODELS"):
        load_model(str(root / "bert"))
    config = tmp_path / "engine.toml"
    config.write_text(f'allowed_models = ["{root}"]\nmax_csv_rows = 3\n')
    monkeypatch.setenv("ENGINE_CONFIG", str(config))
    assert admission.policy().roots == (os.path.realpath(root),)
    load_model(str(root / "bert"))
    with pytest.raises(DataError, match="more than 3 rows"):
        load_csv("big.csv", b"text,label\n" + b"fine,positive\n" * 4)


def _write_safetensors(path: Path, tensors: dict[str, list[int]]) -> None:
    header = json.dumps({name: {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}
                         for name, shape in tensors.items()}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header)


def test_a_config_claiming_70b_parameters_is_refused_before_any_weight_is_read(one_root, monkeypatch):
    root, _ = one_root
    folder = root / "claims-70b"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForSequenceClassification"], "model_type": "llama", "hidden_size": 8192,
        "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
        "vocab_size": 128256, "max_position_embeddings": 8192, "hidden_act": "silu"}))
    _write_safetensors(folder / "model.safetensors", {"score.weight": [2, 8192]})

    def no_weights(*_args, **_kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr(loading.AutoModelForSequenceClassification, "from_pretrained", no_weights)
    monkeypatch.setattr(torch, "load", no_weights)
    with pytest.raises(footprint.TooLarge) as caught:
        load_model(str(folder))
    message = str(caught.value)
    assert "69.57 B parameters" in message and "limit of" in message and "\n" not in message
    assert 69e9 < footprint.folder_footprint(folder, "x").params < 72e9


def test_the_limit_is_a_setting_and_the_cli_exits_2_with_both_figures(one_root):
    root, _ = one_root
    found = footprint.folder_footprint(root / "bert", "bert")
    assert found.safetensors == 1 and found.params > 0
    allowed, how = footprint.default_limit()
    assert 0 < allowed < os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") and "available" in how
    env = {**os.environ, "ENGINE_MAX_MODEL_BYTES": "1M"}
    done = subprocess.run([sys.executable, "-m", "engine", "layers", "--model", str(root / "bert"), "--json"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "over this server's limit of 1 MB (ENGINE_MAX_MODEL_BYTES)" in lines[0], lines


def test_pickle_only_folders_need_the_setting_and_load_with_weights_only(one_root, monkeypatch):
    root, outside = one_root
    folder = root / "pickled"
    if not folder.exists():
        zoo.save("bert", folder)
        from safetensors.torch import load_file

        torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    with pytest.raises(footprint.FootprintError, match="pickle"):
        load_model(str(folder))
    calls = []
    real_load = torch.load

    def recorded(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recorded)
    monkeypatch.setenv("ENGINE_ALLOW_PICKLE", "1")
    model, _ = load_model(str(folder))
    assert calls and all(calls), calls  # every torch.load ran with weights_only=True
    assert model.config.num_labels == 2


@pytest.mark.parametrize("config, why", [("{not json", "broken config.json"), (None, "cannot load model"),
                                          ('["a list"]', "not a JSON object")])
def test_a_broken_config_is_one_line(one_root, config, why):
    root, _ = one_root
    folder = root / f"broken-{abs(hash(str(config)))}"
    folder.mkdir(exist_ok=True)
    if config is not None:
        (folder / "config.json").write_text(config)
    with pytest.raises(loading.ModelError, match=why) as caught:
        load_model(str(folder))
    assert "\n" not in str(caught.value)


def test_a_broken_safetensors_header_is_one_line(one_root):
    root, _ = one_root
    folder = root / "bad-header"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text((root / "bert" / "config.json").read_text())
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(footprint.FootprintError, match="broken safetensors header"):
        load_model(str(folder))


def test_csv_uploads_have_a_size_and_a_row_limit(monkeypatch):
    monkeypatch.setenv("ENGINE_MAX_CSV_BYTES", "1K")
    with pytest.raises(DataError, match=r"over this server's limit of 0.0 MiB \(ENGINE_MAX_CSV_BYTES\)"):
        load_csv("big.csv", b"text,label\n" + b"a fine sentence,positive\n" * 100)
    monkeypatch.delenv("ENGINE_MAX_CSV_BYTES")
    monkeypatch.setenv("ENGINE_MAX_CSV_ROWS", "10")
    assert len(load_csv("ok.csv", b"text,label\n" + b"".join(b"s%d,positive\n" % i for i in range(10)))) == 9
    with pytest.raises(DataError, match="more than 10 rows"):
        load_csv("big.csv", b"text,label\n" + b"".join(b"s%d,positive\n" % i for i in range(11)))
