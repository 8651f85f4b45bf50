"""Pruning (issue 7, acceptance 3): structured channel pruning of the Fashion-MNIST CNN keeps accuracy after a
short fine-tune, really shrinks the layers, and the saved result converts to ONNX; magnitude pruning is honest.

Figures (accuracy, parameters, file size, ONNX Runtime latency of interleaved runs) are printed, timing is never
asserted (the machine is shared).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

import edge_sdk  # noqa: E402
from edge_sdk.optimize.prune import PruneError, prune  # noqa: E402


def _ort_session(path: Path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _interleaved_latency_ms(sessions: dict[str, object], x: np.ndarray, rounds: int = 15, calls: int = 20):
    """Median per-call latency of each session, the sessions' runs interleaved round by round."""
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
    for k, s in sessions.items():
        s.run(None, feeds[k])
    samples: dict[str, list[float]] = {k: [] for k in sessions}
    names = list(sessions)
    for r in range(rounds):  # rotating order: the first session of a round tends to measure slower
        for k in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            for _ in range(calls):
                sessions[k].run(None, feeds[k])
            samples[k].append((time.perf_counter() - t0) * 1000 / calls)
    return {k: statistics.median(v) for k, v in samples.items()}


def _onnx_artifact(bundle) -> Path:
    return bundle.path_of(bundle.artifact("onnx", "fp32"))


@pytest.mark.slow  # ~50 s: 2 fine-tune epochs on 20,000 images, two ONNX exports
def test_structured_pruning_fashion_cnn_keeps_accuracy(fashion_torch_cnn, fashion_test, tmp_path):
    """Acceptance 3: >= 50% of the conv channels removed, <= 1 pp accuracy drop on 5,000 test images after
    fine-tuning; the saved .pt2 program converts to ONNX with the same predictions; latency and size printed."""
    from data import fashion_tensors

    x_train, y_train = fashion_tensors("train", "NCHW")
    x_val, y_val = fashion_test[0][:5000], fashion_test[1][:5000]
    result = prune(fashion_torch_cnn, method="structured", amount=0.5, example_input=x_val[:1],
                   train_data=(x_train, y_train), val_data=(x_val, y_val), finetune_epochs=2,
                   max_train_samples=20000, lr=1e-3)
    rep = result.report
    print("\n" + rep.format())

    assert rep.channels == {"features.0": (32, 16), "features.4": (64, 32)}
    removed = sum(a - b for a, b in rep.channels.values()) / sum(a for a, _ in rep.channels.values())
    assert removed >= 0.5 and rep.sparsity == pytest.approx(removed)
    layers = dict(result.model.named_modules())
    assert layers["features.1"].num_features == 16 and layers["features.5"].num_features == 32
    assert layers["features.4"].in_channels == 16 and layers["classifier.1"].in_features == 32 * 7 * 7
    assert rep.params_after == sum(p.numel() for p in result.model.parameters()) < 0.5 * rep.params_before
    assert rep.state_dict_bytes_after < 0.55 * rep.state_dict_bytes_before
    assert rep.accuracy_pruned < rep.accuracy_after  # the fine-tune did something
    drop_pp = 100 * (rep.accuracy_before - rep.accuracy_after)
    assert drop_pp <= 1.0, f"accuracy dropped {drop_pp:.2f} pp after fine-tuning"
    assert fashion_torch_cnn.features[0].out_channels == 32  # the caller's model is untouched

    saved = result.save(tmp_path / "pruned.pt2")  # a torch.export program of the example input's shape
    paths = {name: _onnx_artifact(edge_sdk.convert(source, input_shape=[1, 1, 28, 28], out=tmp_path / f"b_{name}",
                                                   to="onnx", ort=False, quiet=True))
             for name, source in (("original", fashion_torch_cnn), ("pruned", saved))}
    sessions = {name: _ort_session(p) for name, p in paths.items()}
    pruned = sessions["pruned"]
    onnx_top1 = [pruned.run(None, {pruned.get_inputs()[0].name: x_val[i:i + 1]})[0].argmax() for i in range(500)]
    with torch.no_grad():
        torch_top1 = result.model(torch.from_numpy(x_val[:500])).argmax(1).numpy()
    assert np.mean(np.array(onnx_top1) == torch_top1) >= 0.998

    sizes = {k: p.stat().st_size for k, p in paths.items()}
    lat = _interleaved_latency_ms(sessions, np.ascontiguousarray(x_val[:1]))
    print(f"ONNX size: original {sizes['original']:,} B, pruned {sizes['pruned']:,} B "
          f"({sizes['pruned'] / sizes['original']:.2f}x)")
    print(f"ORT latency batch 1 (1 thread, median of interleaved runs): original {lat['original']:.3f} ms, "
          f"pruned {lat['pruned']:.3f} ms ({lat['pruned'] / lat['original']:.2f}x)")
    assert sizes["pruned"] < 0.55 * sizes["original"]


def test_structured_pruning_tiny_cnn_saves_a_convertible_export_program(tmp_path):
    """TinyCNN (conv-BN-ReLU-pool x2, flatten, linear): channels removed, TorchScript saved and converted; the report
    without data has no accuracies."""
    from tiny_models import make_tiny

    model = make_tiny()
    x = torch.rand(1, 3, 32, 32)
    result = prune(model, amount=0.75, example_input=x)
    assert result.report.channels == {"features.0": (32, 8), "features.4": (64, 16)}
    assert result.report.accuracy_before is None and result.report.finetune_epochs == 0
    assert result.model.head[1].in_features == 16 * 8 * 8
    # the kept filters are the largest-L1 ones, weights copied exactly
    scores = model.features[0].weight.detach().abs().sum((1, 2, 3))
    keep = torch.sort(torch.topk(scores, 8).indices).values
    assert torch.equal(result.model.features[0].weight, model.features[0].weight[keep])
    saved = result.save(tmp_path / "tiny_pruned.pt")
    bundle = edge_sdk.convert(saved, input_shape=[1, 3, 32, 32], out=tmp_path / "b", to="onnx", ort=False,
                              quiet=True)
    sess = _ort_session(_onnx_artifact(bundle))
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, result.model(x).numpy(), rtol=1e-4, atol=1e-4)


def test_magnitude_pruning_is_permanent_and_reports_no_speed_gain():
    """Global L1 unstructured: the requested share of Conv/Linear weights is zero, no pruning hooks remain, the
    parameter count is unchanged, only the compressed size shrinks, and the note says so."""
    from tiny_models import make_tiny

    model = make_tiny()
    x = np.random.default_rng(0).random((256, 3, 32, 32), dtype=np.float32)
    y = np.random.default_rng(1).integers(0, 10, 256)
    result = prune(model, method="magnitude", amount=0.8, train_data=(x, y), val_data=(x[:64], y[:64]),
                   finetune_epochs=1, batch_size=64)
    rep = result.report
    weights = [m.weight for m in result.model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    zero = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zero == pytest.approx(0.8, abs=0.01) and rep.sparsity == pytest.approx(zero)
    assert not any(name.endswith("_orig") or name.endswith("_mask") for name in result.model.state_dict())
    assert rep.params_after == rep.params_before and rep.nonzero_params_after < 0.35 * rep.params_before
    assert rep.finetune_samples == 256 and rep.finetune_epochs == 1
    assert rep.gzip_bytes_after < 0.6 * rep.gzip_bytes_before
    assert abs(rep.state_dict_bytes_after - rep.state_dict_bytes_before) < 0.02 * rep.state_dict_bytes_before
    assert "same speed" in rep.note


class _Residual(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.b = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 2)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = h + self.b(h)
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(h, 1), 1))


class _Reshape(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8 * 4 * 4, 2)

    def forward(self, x):
        return self.fc(self.a(x).view(-1, 8 * 4 * 4))


def test_structured_pruning_refuses_unsafe_architectures():
    """Residual adds, reshapes and depthwise convs are refused with a one-line reason, not rewritten wrongly."""
    from torch_models import MobileNetV2

    cases = [(_Residual(), torch.rand(1, 3, 8, 8), "call_function 'add'"),
             (_Reshape(), torch.rand(1, 3, 4, 4), "'view'"),
             (MobileNetV2(), torch.rand(1, 3, 64, 64), "depthwise")]
    for model, x, words in cases:
        with pytest.raises(PruneError, match=words) as info:
            prune(model.eval(), example_input=x)
        assert "\n" not in str(info.value) and "method='magnitude'" in str(info.value)
    with pytest.raises(PruneError, match="example_input"):
        prune(_Residual())
    with pytest.raises(PruneError, match="between 0 and 1"):
        prune(_Residual(), amount=1.0, example_input=torch.rand(1, 3, 8, 8))
    with pytest.raises(PruneError, match="unknown pruning method"):
        prune(_Residual(), method="random", example_input=torch.rand(1, 3, 8, 8))


def test_prune_cli_writes_a_convertible_model(fashion_torch_cnn, fashion_test, tmp_path, capsys):
    """`edge-sdk prune STATE_DICT --model-class ... --train X Y --val X Y --out pruned.pt2` prints the report and
    writes a .pt2 program that `edge-sdk convert` turns into ONNX; a residual model is refused with exit code 2."""
    from data import fashion_tensors

    from edge_sdk.cli import main

    torch.save(fashion_torch_cnn.state_dict(), tmp_path / "fashion.pt")
    x_train, y_train = fashion_tensors("train", "NCHW", 2000)
    for name, arr in (("xt", x_train), ("yt", y_train), ("xv", fashion_test[0][:500]), ("yv", fashion_test[1][:500])):
        np.save(tmp_path / f"{name}.npy", arr)
    out = tmp_path / "pruned.pt2"
    code = main(["prune", str(tmp_path / "fashion.pt"), "--model-class", "torch_models:FashionCNN",
                 "--input-shape", "1,1,28,28", "--train", str(tmp_path / "xt.npy"), str(tmp_path / "yt.npy"),
                 "--val", str(tmp_path / "xv.npy"), str(tmp_path / "yv.npy"), "--amount", "0.5", "--epochs", "1",
                 "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and out.exists()
    assert "features.0: 32 -> 16 channels" in printed and "features.4: 64 -> 32 channels" in printed
    assert "after fine-tune" in printed and "(1 epochs on 2000 samples" in printed
    assert main(["convert", str(out), "--input-shape", "1,1,28,28", "--to", "onnx", "--out",
                 str(tmp_path / "bundle")]) == 0
    assert (tmp_path / "bundle" / "manifest.json").exists()

    torch.save(_Residual().state_dict(), tmp_path / "res.pt")
    code = main(["prune", str(tmp_path / "res.pt"), "--model-class", "test_prune:_Residual", "--input-shape",
                 "1,3,8,8", "--out", str(tmp_path / "res_pruned.pt2")])
    assert code == 2 and "call_function 'add'" in capsys.readouterr().err
    assert not (tmp_path / "res_pruned.pt2").exists()
