"""ONNX-ML (scikit-learn) operators lowered to standard ONNX (converters/onnx_ml_lowering.py), issue 11.

skl2onnx is not installed: the graphs are written with onnx.helper the way skl2onnx writes them, from REAL fitted
scikit-learn models (binary logistic regression as two rows -w / w + LOGISTIC + Normalizer L1, multinomial as
SOFTMAX, one-vs-rest as LOGISTIC + L1, then ZipMap). Every lowering is checked against ONNX Runtime running the
original ai.onnx.ml graph on random inputs (1e-5), then one end-to-end convert to tflite + openvino fp32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from edge_sdk.converters.onnx_ml_lowering import (
    OnnxMlError,
    labels_to_index,
    lower_onnx_ml,
    ml_op_types,
    zipmap_to_array,
)

sklearn = pytest.importorskip("sklearn")
from sklearn.datasets import load_iris  # noqa: E402
from sklearn.linear_model import LinearRegression, LogisticRegression  # noqa: E402

ML = "ai.onnx.ml"
IRIS_NAMES = ["setosa", "versicolor", "virginica"]


def _model(nodes: list, inputs: list, outputs: list, opset: int | None = 15, inits: list | None = None
           ) -> onnx.ModelProto:
    imports = [helper.make_opsetid(ML, 1)] + ([helper.make_opsetid("", opset)] if opset else [])
    m = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits), opset_imports=imports)
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _seq_map(name: str, key: int) -> onnx.ValueInfoProto:
    return helper.make_value_info(name, helper.make_sequence_type_proto(
        helper.make_map_type_proto(key, helper.make_tensor_type_proto(TensorProto.FLOAT, []))))


def _classifier(coef: np.ndarray, intercepts: np.ndarray, *, post: str, labels: list, normalize: bool = False,
                zipmap: bool = True, n_features: int = 4, opset: int | None = 15) -> onnx.ModelProto:
    strings = isinstance(labels[0], str)
    lab_attr = {"classlabels_strings": labels} if strings else {"classlabels_ints": labels}
    nodes = [helper.make_node("LinearClassifier", ["X"], ["label", "scores"], domain=ML, name="lin",
                              coefficients=coef.astype(np.float32).ravel().tolist(),
                              intercepts=intercepts.astype(np.float32).ravel().tolist(), post_transform=post,
                              multi_class=0, **lab_attr)]
    probs = "scores"
    if normalize:
        nodes.append(helper.make_node("Normalizer", ["scores"], ["normed"], domain=ML, norm="L1"))
        probs = "normed"
    outputs = [helper.make_tensor_value_info("label", TensorProto.STRING if strings else TensorProto.INT64, [None])]
    if zipmap:
        zm = {"classlabels_strings": labels} if strings else {"classlabels_int64s": labels}
        nodes.append(helper.make_node("ZipMap", [probs], ["probabilities"], domain=ML, **zm))
        outputs.append(_seq_map("probabilities", TensorProto.STRING if strings else TensorProto.INT64))
    else:
        outputs.append(helper.make_tensor_value_info(probs, TensorProto.FLOAT, [None, None]))
    return _model(nodes, [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, n_features])], outputs, opset)


def _compare(model: onnx.ModelProto, x: np.ndarray, atol: float = 1e-5) -> list[np.ndarray]:
    """ORT(original) vs ORT(lowered) on ``x``; ZipMap / string outputs converted as the reference run does."""
    low = lower_onnx_ml(model)
    assert low is not None and not ml_op_types(low.model)
    assert all(o.domain != ML for o in low.model.opset_import)
    ref_sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    new_sess = ort.InferenceSession(low.model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in model.graph.output]
    ref = ref_sess.run(names, {"X": x})
    got = new_sess.run(names, {"X": x})
    for name, r, g in zip(names, ref, got, strict=True):
        if name in low.zipmap_outputs:
            r = zipmap_to_array(r, low.zipmap_outputs[name])
        elif name in low.label_maps:
            r = labels_to_index(r, low.label_maps[name])
        assert isinstance(g, np.ndarray) and g.shape == np.asarray(r).shape, name
        if g.dtype == np.int64:
            np.testing.assert_array_equal(g, r, err_msg=name)  # labels: exact
        else:
            np.testing.assert_allclose(g, r, atol=atol, rtol=0, err_msg=name)
    return got


@pytest.fixture(scope="module")
def iris() -> tuple[np.ndarray, np.ndarray]:
    x, y = load_iris(return_X_y=True)
    return x.astype(np.float32), y


def _rand(n: int, f: int = 4, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=(n, f)) * 3 + 3).astype(np.float32)


def test_binary_logreg_as_skl2onnx_writes_it(iris) -> None:
    x, y = iris
    clf = LogisticRegression(max_iter=500).fit(x, (y == 2).astype(int))
    w, b = clf.coef_[0], clf.intercept_[0]
    model = _classifier(np.stack([-w, w]), np.array([-b, b]), post="LOGISTIC", labels=[0, 1], normalize=True)
    label, probs = _compare(model, _rand(64))
    np.testing.assert_allclose(probs, clf.predict_proba(_rand(64)), atol=1e-5)  # and it is sklearn's model
    np.testing.assert_array_equal(label, clf.predict(_rand(64)))


@pytest.mark.parametrize("post", ["NONE", "LOGISTIC", "SOFTMAX", "SOFTMAX_ZERO", "PROBIT"])
def test_binary_one_row(iris, post: str) -> None:
    """One coefficient row: label by the sign of the raw score s; ORT 1.32 writes [sigmoid(-s), sigmoid(s)] for
    LOGISTIC and [1 - s, s] otherwise; PROBIT (a broken layout in ORT) is refused."""
    x, y = iris
    clf = LogisticRegression(max_iter=500).fit(x, (y == 1).astype(int))
    model = _classifier(clf.coef_, clf.intercept_, post=post, labels=[3, 7], zipmap=False)
    if post == "PROBIT":
        with pytest.raises(OnnxMlError, match="PROBIT"):
            lower_onnx_ml(model)
        return
    label, _ = _compare(model, _rand(60))
    assert set(np.unique(label)) == {3, 7}
    with pytest.raises(OnnxMlError, match="exactly 2 class labels"):
        lower_onnx_ml(_classifier(clf.coef_, clf.intercept_, post=post, labels=[0, 1, 2], zipmap=False))


@pytest.mark.parametrize("post", ["NONE", "LOGISTIC", "SOFTMAX", "SOFTMAX_ZERO", "PROBIT"])
def test_multiclass_post_transforms(iris, post: str) -> None:
    x, y = iris
    clf = LogisticRegression(max_iter=1000).fit(x, y)
    coef, icpt = clf.coef_, clf.intercept_
    if post == "SOFTMAX_ZERO":  # a class whose score is exactly 0 is left out of the sum
        coef, icpt = np.vstack([coef, np.zeros((1, 4))]), np.append(icpt, 0.0)
    model = _classifier(coef, icpt, post=post, labels=[10, 20, 30, 40][: len(icpt)])
    if post == "PROBIT":  # ORT's float32 ErfInv approximation: 2e-4 apart from any graph near 0.5, refused
        with pytest.raises(OnnxMlError, match="PROBIT is not lowered"):
            lower_onnx_ml(model)
        return
    _compare(model, _rand(80))


def test_multinomial_string_labels_and_iris_ovr(iris) -> None:
    x, y = iris
    clf = LogisticRegression(max_iter=1000).fit(x, np.array(IRIS_NAMES)[y])
    model = _classifier(clf.coef_, clf.intercept_, post="SOFTMAX", labels=IRIS_NAMES)
    low = lower_onnx_ml(model)
    assert low.label_maps == {"label": IRIS_NAMES} and low.zipmap_outputs == {"probabilities": IRIS_NAMES}
    label, probs = _compare(model, x)
    assert [IRIS_NAMES[k] for k in label] == list(clf.predict(x))
    np.testing.assert_allclose(probs, clf.predict_proba(x), atol=1e-5)
    # one-vs-rest as the ORT test model (LOGISTIC + Normalizer L1), and no default-domain opset import at all
    ovr = _classifier(clf.coef_, clf.intercept_, post="LOGISTIC", labels=[0, 1, 2], normalize=True, opset=None)
    _compare(ovr, _rand(30))
    assert [o.version for o in lower_onnx_ml(ovr).model.opset_import if o.domain == ""] == [13]


def test_linear_regressor_scaler_normalizer_pipeline(iris) -> None:
    x, y = iris
    targets = np.stack([y, x[:, 0] * 2 - 1], axis=1).astype(np.float32)
    reg = LinearRegression().fit(x[:, 1:], targets)
    mean, scale = x[:, 1:].mean(0), 1 / x[:, 1:].std(0)
    for norm in ("MAX", "L1", "L2"):
        nodes = [helper.make_node("Scaler", ["X"], ["s"], domain=ML, offset=mean.tolist(), scale=scale.tolist()),
                 helper.make_node("Normalizer", ["s"], ["n"], domain=ML, norm=norm),
                 helper.make_node("LinearRegressor", ["n"], ["Y"], domain=ML, coefficients=reg.coef_.ravel().tolist(),
                                  intercepts=reg.intercept_.tolist(), targets=2),
                 helper.make_node("LinearRegressor", ["X"], ["Y1"], domain=ML, coefficients=reg.coef_[0].tolist(),
                                  intercepts=[float(reg.intercept_[0])], targets=1)]
        model = _model(nodes, [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 3])],
                       [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, 2]),
                        helper.make_tensor_value_info("Y1", TensorProto.FLOAT, [None, 1]),
                        helper.make_tensor_value_info("n", TensorProto.FLOAT, [None, 3])])
        xs = np.vstack([_rand(40, 3), mean[None]]).astype(np.float32)  # the last row scales to 0: norm 0 kept as is
        _compare(model, xs)
    np.testing.assert_allclose(_compare(model, x[:, 1:].copy())[1][:, 0], reg.predict(x[:, 1:])[:, 0], atol=1e-4)


def test_binarizer_and_array_feature_extractor() -> None:
    nodes = [helper.make_node("ArrayFeatureExtractor", ["X", "idx"], ["picked"], domain=ML),
             helper.make_node("Binarizer", ["picked"], ["Y"], domain=ML, threshold=0.5)]
    model = _model(nodes, [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 5])],
                   [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, 3])],
                   inits=[onnx.numpy_helper.from_array(np.array([4, 0, 2], np.int64), "idx")])
    _compare(model, _rand(20, 5) - 3)


def _tree_model() -> onnx.ModelProto:
    tree = helper.make_node(
        "TreeEnsembleClassifier", ["X"], ["label", "probabilities"], domain=ML, name="forest",
        classlabels_int64s=[0, 1], nodes_treeids=[0, 0, 0], nodes_nodeids=[0, 1, 2], nodes_featureids=[0, 0, 0],
        nodes_values=[0.0, 0.0, 0.0], nodes_modes=["BRANCH_LEQ", "LEAF", "LEAF"], nodes_truenodeids=[1, 0, 0],
        nodes_falsenodeids=[2, 0, 0], class_treeids=[0, 0], class_nodeids=[1, 2], class_ids=[0, 1],
        class_weights=[1.0, 1.0])
    return _model([tree], [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 4])],
                  [helper.make_tensor_value_info("label", TensorProto.INT64, [1]),
                   helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [1, 2])])


def test_unknown_ml_op_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(OnnxMlError, match=r"^ONNX-ML operator\(s\) TreeEnsembleClassifier have no standard-ONNX"):
        lower_onnx_ml(_tree_model())
    onnx.save(_tree_model(), str(tmp_path / "tree.onnx"))
    val = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    res = _results(source=tmp_path / "tree.onnx", out=tmp_path / "b", to="onnx,openvino", precision="fp32",
                   val=val, ort=False, quiet=True)
    assert res["onnx/fp32"].status == "passed", res["onnx/fp32"].reason  # ONNX Runtime runs ai.onnx.ml as is
    ov = res["openvino/fp32"]  # every route of the target stops on the refusal: an error naming the op
    assert ov.status == "error" and "TreeEnsembleClassifier have no standard-ONNX lowering" in ov.reason, ov.reason


def _results(**kwargs) -> dict:
    from edge_sdk.converters.pipeline import convert
    from edge_sdk.errors import ValidationError

    try:
        results = convert(**kwargs).results  # type: ignore[attr-defined]
    except ValidationError as exc:
        results = exc.results  # type: ignore[attr-defined]
    return {r.key: r for r in results}


def test_end_to_end_multiclass_logreg_to_tflite_and_openvino(iris, tmp_path: Path) -> None:
    """A multinomial iris classifier with string labels and ZipMap reaches tflite and openvino fp32 and validates
    (labels exactly, probabilities to fp32 tolerance) against ONNX Runtime on the ORIGINAL ai.onnx.ml graph."""
    pytest.importorskip("openvino")
    pytest.importorskip("onnx2tf")
    x, y = iris
    clf = LogisticRegression(max_iter=1000).fit(x, np.array(IRIS_NAMES)[y])
    model = _classifier(clf.coef_, clf.intercept_, post="SOFTMAX", labels=IRIS_NAMES)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4  # a fixed batch, like ORT's iris model
    onnx.save(model, str(tmp_path / "iris.onnx"))
    val = x[np.random.default_rng(0).permutation(len(x))[:96]]  # 24 calls of 4 rows
    res = _results(source=tmp_path / "iris.onnx", out=tmp_path / "b", to="tflite,openvino,onnx", precision="fp32",
                   val=val, ort=False, quiet=True)
    for key in ("tflite/fp32", "openvino/fp32", "onnx/fp32"):
        assert res[key].status == "passed", (key, res[key].reason)
        assert res[key].validation.cosine > 0.9999 and res[key].validation.max_abs_error < 1e-4, key
