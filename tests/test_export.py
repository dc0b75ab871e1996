"""The export: ONNX validity, parity with PyTorch, caching, and generated configs."""

from __future__ import annotations

import onnx
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from medpclip import export, onnx_export
from medpclip.real_inputs import real_inputs
from medpclip_core import tensors as T


@pytest.mark.parametrize("name", list(onnx_export.EXPORTABLES))
def test_onnx_is_valid_with_declared_interface(build_dir, name):
    m = onnx.load(str(build_dir / "onnx" / f"{name}.onnx"))
    onnx.checker.check_model(m, full_check=True)
    assert m.opset_import[0].version >= 17
    spec = T.spec(name)
    assert [i.name for i in m.graph.input] == [t.name for t in spec.inputs]
    assert [o.name for o in m.graph.output] == [t.name for t in spec.outputs]
    for i in m.graph.input:  # batch axis is dynamic
        assert i.type.tensor_type.shape.dim[0].dim_param == "batch"


@pytest.mark.parametrize("name", list(onnx_export.EXPORTABLES))
def test_onnx_runtime_matches_pytorch(build_dir, model, checkpoint, name):
    path = build_dir / "onnx" / f"{name}.onnx"
    ex = onnx_export.EXPORTABLES[name]
    real = real_inputs(model, checkpoint / "tokenizer.json")[name]
    for inputs in (ex.sample_inputs(model.cfg, batch=3, seed=7), real):
        diffs = onnx_export.parity(model, name, path, inputs)
        assert max(diffs.values()) <= 1e-4, diffs


def test_text_encoder_reads_labels_at_their_own_length(build_dir, model, checkpoint):
    """Labels are padded to the request's longest label (a bucket), not to the context, and the
    exported text encoder (dynamic sequence axis) gives the same embeddings either way."""
    import numpy as np

    from medpclip.onnx_export import ort_session
    from medpclip_core.labels import load_tokenizer, tokenize

    labels = ["a nodule", "a cyst", "a spiculated mass", "a calcification"]
    tok = load_tokenizer(checkpoint / "tokenizer.json", model.cfg.text.context_length)
    ids, mask = tokenize(tok, labels)
    assert ids.shape[1] == T.TOKEN_BUCKET < model.cfg.text.context_length
    full = (
        [e.ids for e in tok.encode_batch(labels)],
        [e.attention_mask for e in tok.encode_batch(labels)],
    )
    session = ort_session(build_dir / "onnx" / "text_encoder.onnx")
    short = session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    padded = session.run(
        None,
        {"input_ids": np.array(full[0], np.int64), "attention_mask": np.array(full[1], np.int64)},
    )[0]
    assert np.abs(short - padded).max() <= 1e-6


def test_second_export_reuses_everything(build_dir, checkpoint, capsys):
    before = {p: p.stat().st_mtime_ns for p in (build_dir / "onnx").glob("*.onnx")}
    assert (
        export.main(["--checkpoint", str(checkpoint), "--out", str(build_dir), "--skip-parity"])
        == 0
    )
    out = capsys.readouterr().out
    assert out.count("up to date") == len(onnx_export.EXPORTABLES) == len(T.ENCODERS) == 6
    assert before == {p: p.stat().st_mtime_ns for p in (build_dir / "onnx").glob("*.onnx")}


@pytest.mark.parametrize("spec", T.ALL_MODELS, ids=lambda s: s.name)
def test_generated_config_agrees_with_declaration(build_dir, model, spec):
    text = (build_dir / "model_repository" / spec.name / "config.pbtxt").read_text()
    cfg = text_format.Parse(text, mc.ModelConfig())
    dims = model.cfg.dims
    assert cfg.name == spec.name and cfg.max_batch_size == spec.max_batch_size
    for got, want in ((cfg.input, spec.inputs), (cfg.output, spec.outputs)):
        assert [(t.name, mc.DataType.Name(t.data_type), list(t.dims)) for t in got] == [
            (t.name, t.triton_type, t.dims(dims)) for t in want
        ]
    assert [t.optional for t in cfg.input] == [t.optional for t in spec.inputs]
    if spec.max_batch_size:
        assert cfg.HasField("dynamic_batching")
    if isinstance(spec, T.EnsembleSpec):
        produced = set(spec_input.name for spec_input in spec.inputs)
        for step in cfg.ensemble_scheduling.step:
            step_spec = T.spec(step.model_name)
            assert set(step.input_map) <= {t.name for t in step_spec.inputs}
            assert set(step.input_map.values()) <= produced, step.model_name
            assert set(step.output_map) <= {t.name for t in step_spec.outputs}
            produced |= set(step.output_map.values())
        assert {t.name for t in spec.outputs} <= produced


def test_unknown_flavour_is_refused(build_dir, checkpoint):
    with pytest.raises(SystemExit) as exc:
        export.main(
            ["--checkpoint", str(checkpoint), "--out", str(build_dir), "--flavour", "openvino"]
        )
    assert exc.value.code == 2


def test_tuning_options_reach_the_encoder_configs(build_dir, checkpoint, tmp_path):
    from medpclip import repository

    out = repository.generate(
        tmp_path / "repo",
        build_dir / "onnx",
        checkpoint,
        ort_threads=1,
        instances=2,
        queue_delay_us=500,
        log=lambda *_: None,
    )
    for spec in T.ENCODERS:
        cfg = text_format.Parse((out / spec.name / "config.pbtxt").read_text(), mc.ModelConfig())
        assert cfg.instance_group[0].count == 2
        assert cfg.dynamic_batching.max_queue_delay_microseconds == 500
        assert cfg.parameters["intra_op_threads"].string_value == "1"
    pre = text_format.Parse((out / "preprocess" / "config.pbtxt").read_text(), mc.ModelConfig())
    assert pre.instance_group[0].count == 1  # python steps keep one instance
