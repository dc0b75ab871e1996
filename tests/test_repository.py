"""The committed `model_repository/`: the generator's output, in Triton's layout, and what the
export adds to its served copy. (That tritonserver loads the served copy is what every serving
test checks.)"""

from __future__ import annotations

import importlib.util
import inspect
import json
import shutil
from dataclasses import fields
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from medpclip import export, repository
from medpclip.config import DEFAULT_CHECKPOINT
from medpclip_core import tensors as T

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "model_repository"
REGENERATE = (
    "run `python -m medpclip.repository` from the checkout's root and commit model_repository/"
)
# what the export adds to the committed part (onnxruntime flavour)
ARTIFACTS = {
    *(f"{spec.name}/1/model.onnx" for spec in T.ENCODERS),
    "tokenizer/1/tokenizer.json",
    "preprocess/1/tokenizer.json",
    "prompt_preprocess/1/tokenizer.json",
    repository.EXPORT_RECORD,
}


def _files(directory: Path) -> dict[str, bytes]:
    """relative path -> content of every file (Python's __pycache__ aside)."""
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in directory.rglob("*")
        if p.is_file() and "__pycache__" not in p.relative_to(directory).parts
    }


@pytest.fixture(scope="module")
def generated() -> dict[str, bytes]:
    files = repository.source_files(DEFAULT_CHECKPOINT)
    return {name: text.encode() for name, text in files.items()}


def test_committed_repository_is_the_generators_output(generated):
    committed = _files(COMMITTED)
    committed.pop("README.md")
    missing = sorted(set(generated) - set(committed))
    extra = sorted(set(committed) - set(generated))
    differ = sorted(n for n in set(generated) & set(committed) if generated[n] != committed[n])
    assert not (missing or extra or differ), (
        f"model_repository/ is stale ({REGENERATE}): missing {missing}, not generated {extra}, "
        f"differs {differ}"
    )


def test_check_cli_agrees(capsys):
    assert repository.main(["--check", "--out", str(COMMITTED)]) == 0, capsys.readouterr().err


def test_committed_part_uses_the_exports_default_options():
    """The committed configs are those of `python -m medpclip.export` without options."""
    defaults = {f.name: f.default for f in fields(export.ExportOptions)}
    params = inspect.signature(repository.source_files).parameters
    for name in ("ort_threads", "instances", "queue_delay_us"):
        assert params[name].default == defaults[name], name


def test_committed_repository_is_in_tritons_layout():
    declared = {spec.name for spec in T.ALL_MODELS}
    assert {p.name for p in COMMITTED.iterdir() if p.is_dir()} == declared
    for spec in T.ALL_MODELS:
        d = COMMITTED / spec.name
        cfg = text_format.Parse((d / "config.pbtxt").read_text(), mc.ModelConfig())
        assert cfg.name == spec.name
        assert (d / "1").is_dir()
        if isinstance(spec, T.EnsembleSpec):
            assert cfg.platform == "ensemble"
            assert [p.name for p in (d / "1").iterdir()] == [repository.KEEP_FILE]
            continue
        assert cfg.backend == "python"
        module = f"medpclip_core.backend.{repository.BACKEND_MODULES[spec.name]}"
        source = (d / "1" / "model.py").read_text()
        assert f"from {module} import TritonPythonModel" in source
        assert importlib.util.find_spec(module) is not None, module


def test_check_names_every_stale_file_and_the_command(tmp_path, capsys):
    repo = tmp_path / "repo"
    shutil.copytree(COMMITTED, repo)
    (repo / "postprocess" / "config.pbtxt").write_text("name: 'edited by hand'\n")
    (repo / "tokenizer" / "1" / "model.py").unlink()
    (repo / "image_encoder" / "1" / "model.onnx").write_bytes(b"not committed")
    (repo / "old_model").mkdir()
    (repo / "old_model" / "config.pbtxt").write_text('name: "old_model"\n')
    assert repository.main(["--check", "--out", str(repo)]) == 1
    err = capsys.readouterr().err
    assert f"run python -m medpclip.repository --out {repo}" in err
    for line in (
        "postprocess/config.pbtxt (differs)",
        "tokenizer/1/model.py (missing)",
        "image_encoder/1/model.onnx (not generated)",
        "old_model/config.pbtxt (not generated)",
    ):
        assert line in err
    # writing repairs all of it, and leaves the hand-written README alone
    assert repository.main(["--out", str(repo)]) == 0
    assert repository.main(["--check", "--out", str(repo)]) == 0
    assert _files(repo) == _files(COMMITTED)


def test_served_copy_of_the_default_model_is_the_committed_part_plus_artifacts(tmp_path):
    """`generate` (the export's last step) on the default model: every committed file byte for
    byte, and beyond them only the artifacts."""
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    for spec in T.ENCODERS:
        (onnx_dir / f"{spec.name}.onnx").write_bytes(b"placeholder")
    served = repository.generate(
        tmp_path / "repo", onnx_dir, DEFAULT_CHECKPOINT, log=lambda *_: None
    )
    files = _files(served)
    committed = _files(COMMITTED)
    committed.pop("README.md")
    assert set(files) == set(committed) | ARTIFACTS
    for name, data in committed.items():
        assert files[name] == data, name
    record = json.loads(files[repository.EXPORT_RECORD])
    assert (record["flavour"], record["int8"]) == ("onnxruntime", False)


def test_exported_served_copy_has_the_committed_layout_plus_artifacts(build_dir, checkpoint):
    """The real export (of the tests' fresh model, whose logit scale differs from the default
    model's): the committed file set plus the artifacts, each generated file as the generator
    writes it for that checkpoint, and all but the checkpoint's numbers as committed."""
    served = _files(build_dir / "model_repository")
    own = {n: t.encode() for n, t in repository.source_files(checkpoint).items()}
    committed = _files(COMMITTED)
    committed.pop("README.md")
    assert set(own) == set(committed)
    assert set(served) == set(own) | ARTIFACTS
    for name, data in own.items():
        assert served[name] == data, name
    assert served["tokenizer/1/tokenizer.json"] == (checkpoint / "tokenizer.json").read_bytes()
    differ = {n for n in committed if committed[n] != served[n]}
    # the checkpoint's logit_scale (postprocess) and identity (postprocess and the ensembles):
    # the configs' parameters, nothing else
    assert differ <= {"postprocess/config.pbtxt", *_ENSEMBLE_CONFIGS}, differ
    for name in differ:
        ours, theirs = (
            text_format.Parse(files[name].decode(), mc.ModelConfig())
            for files in (served, committed)
        )
        ours.ClearField("parameters")
        theirs.ClearField("parameters")
        assert ours == theirs, name
    identity = repository.model_identity(checkpoint)
    for name in _ENSEMBLE_CONFIGS:
        assert _parameters(served[name]) == identity, name


_ENSEMBLE_CONFIGS = {f"{spec.name}/config.pbtxt" for spec in T.ENSEMBLES}


def _parameters(config: bytes) -> dict[str, str]:
    cfg = text_format.Parse(config.decode(), mc.ModelConfig())
    return {k: v.string_value for k, v in cfg.parameters.items()}


def test_every_ensemble_and_postprocess_state_the_models_identity():
    """The identity clients read (`MedPClipClient.model_identity`, from the ensemble they
    call, readable with the API key behind the gateway): the same dict in every ensemble's
    config, exactly its keys there, and in postprocess's beside its own parameters."""
    identity = repository.model_identity(DEFAULT_CHECKPOINT)
    assert set(identity) == set(repository.IDENTITY_KEYS)
    assert all(identity.values())
    for spec in T.ENSEMBLES:
        assert _parameters((COMMITTED / spec.name / "config.pbtxt").read_bytes()) == identity
    post = _parameters((COMMITTED / "postprocess" / "config.pbtxt").read_bytes())
    assert {k: post[k] for k in repository.IDENTITY_KEYS} == identity
