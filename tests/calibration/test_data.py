"""Calibration inputs: sources, validation errors in one sentence, disjoint hold-out."""

from __future__ import annotations

import numpy as np
import pytest

from qcompiler.calibration import data as calib_data
from qcompiler.capture import TOKENIZER_KEY
from qcompiler.calibration.resolve import resolve_calibration
from qcompiler.errors import CalibrationError

NAMES = ["input_ids", "attention_mask", "token_type_ids"]


def _feeds(batch=2, seq=6, dtype=np.int64):
    return {n: np.ones((batch, seq), dtype) for n in NAMES}


def test_npz_is_batched_along_axis_0(tmp_path, minilm):
    path = tmp_path / "calib.npz"
    np.savez(path, **{n: np.ones((10, 7), np.int64) for n in NAMES})
    data = resolve_calibration(path, minilm, batch_size=4)
    assert [b["input_ids"].shape[0] for b in data.batches] == [4, 4, 2]


def test_text_needs_a_tokenizer_for_plain_onnx(tmp_path, minilm, sentences):
    path = tmp_path / "calib.txt"
    path.write_text("\n".join(sentences[:5]) + "\n\n", encoding="utf-8")
    minilm.metadata_props.pop(TOKENIZER_KEY, None)  # as an ONNX file from elsewhere would be
    with pytest.raises(CalibrationError, match="needs a tokenizer .* --tokenizer"):
        resolve_calibration(path, minilm)
    data = resolve_calibration(path, minilm, tokenizer="minilm", batch_size=2)
    assert data.num_samples == 5 and set(data.batches[0]) == set(NAMES)


def test_iterable_of_feed_dicts(minilm):
    data = resolve_calibration([_feeds(), _feeds()], minilm)
    assert len(data) == 2


@pytest.mark.parametrize(
    "feeds, message",
    [
        ({**_feeds(), "extra": np.ones((2, 6), np.int64)}, "'extra' is not a model input"),
        ({k: v for k, v in _feeds().items() if k != "attention_mask"}, "model input 'attention_mask' is missing"),
        (_feeds(dtype=np.int32), "dtype int32 but the model expects int64"),
        ({**_feeds(), "input_ids": np.ones((2, 6, 1), np.int64)}, "rank 3 .* expects rank 2"),
    ],
)
def test_mismatched_batches_are_named(minilm, feeds, message):
    with pytest.raises(CalibrationError, match=message) as info:
        resolve_calibration([feeds], minilm)
    assert "\n" not in str(info.value)


def test_fixed_dims_and_nan_are_rejected():
    import onnx_ir as ir
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    model = ir.serde.deserialize_model(helper.make_model(graph))
    with pytest.raises(CalibrationError, match="size 5 on axis 1 but the model expects 4"):
        resolve_calibration([{"x": np.ones((2, 5), np.float32)}], model)
    bad = np.ones((2, 4), np.float32)
    bad[1, 2] = np.nan
    with pytest.raises(CalibrationError, match="contains NaN or Inf"):
        resolve_calibration([{"x": bad}], model)


def test_bad_files(tmp_path, minilm):
    with pytest.raises(CalibrationError, match="does not exist"):
        resolve_calibration(tmp_path / "nope.npz", minilm)
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"not a zip")
    with pytest.raises(CalibrationError, match="not a readable .npz"):
        resolve_calibration(corrupt, minilm)
    ragged = tmp_path / "ragged.npz"
    np.savez(ragged, input_ids=np.ones((3, 4)), attention_mask=np.ones((2, 4)))
    with pytest.raises(CalibrationError, match="share a non-empty sample axis 0"):
        resolve_calibration(ragged, minilm)


def test_holdout_is_disjoint_from_calibration(minilm_calibration):
    calib, holdout = minilm_calibration.split(0.25)
    assert len(calib) + len(holdout) == len(minilm_calibration) and len(holdout) >= 1
    assert not {id(b) for b in calib.batches} & {id(b) for b in holdout.batches}
    single = calib_data.CalibrationData([_feeds(batch=4)], "one batch")
    first, second = single.split()
    assert first.num_samples == 2 and second.num_samples == 2


def _image_model(batch):
    import onnx_ir as ir
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3, 4, 4])])
    return ir.serde.deserialize_model(helper.make_model(graph))


def test_a_model_exported_for_batch_1_is_calibrated_in_batches_of_1(tmp_path):
    """Exporters often fix the batch ([1, 3, 224, 224]); an .npz of many images must still calibrate it."""
    path = tmp_path / "images.npz"
    np.savez(path, x=np.ones((5, 3, 4, 4), np.float32))
    data = resolve_calibration(path, _image_model(1), batch_size=8)
    assert [b["x"].shape[0] for b in data.batches] == [1] * 5
    assert [b["x"].shape[0] for b in resolve_calibration(path, _image_model("N"), batch_size=2).batches] == [2, 2, 1]


def test_paddle_negative_dims_are_symbolic(tmp_path):
    """Paddle2ONNX writes dim_value -1 for a dynamic axis; it is no fixed size to check batches against."""
    import onnx
    from onnx import TensorProto, helper

    from qcompiler.capture import load_onnx_file

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 3, 4, 4])])
    onnx.save(helper.make_model(graph), tmp_path / "paddle.onnx")
    model = load_onnx_file(tmp_path / "paddle.onnx")
    assert not isinstance(model.graph.inputs[0].shape[0], int) and model.graph.inputs[0].shape[1] == 3
    data = resolve_calibration([{"x": np.ones((2, 3, 4, 4), np.float32)}], model)
    assert data.batches[0]["x"].shape == (2, 3, 4, 4)
