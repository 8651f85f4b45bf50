"""What a device tool-chain is told about the model: name, version, task, labels, preprocessing, author, licence.

The manifest carries these for the SDK's own agent; Core ML (Vision) and TFLite (ML Model Binding, the Task
Library, MediaPipe Tasks) read them from inside the model file instead. ``convert`` builds one :class:`ModelCard`
and hands it to every converter through ``ConvertOptions.extra`` (the one channel every derived conversion
context shares), so the Core ML converters and the TFLite metadata writer describe the model the same way.

User-settable through ``ConvertOptions.extra``: ``model_author``, ``model_license``, ``model_description``
(declared by the Core ML converters, see :data:`CARD_OPTIONS`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from edge_sdk.converters.base import ConvertOptions, OptionSpec
from edge_sdk.preprocessing import Preprocessing

__all__ = ["CARD_OPTIONS", "MODEL_CARD_KEY", "ModelCard", "card_of", "with_card"]

MODEL_CARD_KEY = "_model_card"  # set by the pipeline after the options were checked; never by the user
CARD_OPTIONS = (
    OptionSpec("model_author", str, "", help="author written into Core ML / TFLite metadata"),
    OptionSpec("model_license", str, "", help="licence written into Core ML / TFLite metadata"),
    OptionSpec("model_description", str, "", help="one-line description for Core ML / TFLite metadata"),
)


@dataclass(frozen=True)
class ModelCard:
    """The facts about a model that its artifacts carry for the vendors' tool-chains."""

    name: str
    version: str
    task: str = "other"  # edge_sdk.schema Task value: "classification", ...
    labels: tuple[str, ...] | None = None
    preprocessing: Preprocessing | None = None
    author: str = ""
    license: str = ""
    description: str = ""

    @property
    def is_classifier(self) -> bool:
        """A classifier with class names: the only case the tool-chains' classifier support applies to."""
        return self.task == "classification" and bool(self.labels)

    @property
    def summary(self) -> str:
        """The description, or one made from the facts (what Xcode / Android Studio show)."""
        if self.description:
            return self.description
        what = f"{len(self.labels)}-class classifier" if self.is_classifier else f"{self.task} model"
        return f"{self.name} {self.version}: {what} converted by edge_sdk"

    @property
    def author_or_default(self) -> str:
        return self.author or "unspecified (set ConvertOptions.extra['model_author'])"

    @property
    def license_or_default(self) -> str:
        return self.license or "unspecified (set ConvertOptions.extra['model_license'])"


def with_card(options: ConvertOptions, *, name: str, version: str, task: str, labels: list[str] | None,
              preprocessing: Preprocessing | None) -> ConvertOptions:
    """``options`` with the model card added (author / licence / description taken from its extra keys)."""
    extra = options.extra
    card = ModelCard(name=name, version=str(version), task=task, labels=tuple(labels) if labels else None,
                     preprocessing=preprocessing, author=str(extra.get("model_author", "")),
                     license=str(extra.get("model_license", "")),
                     description=str(extra.get("model_description", "")))
    return replace(options, extra={**extra, MODEL_CARD_KEY: card})


def card_of(options: ConvertOptions) -> ModelCard | None:
    """The model card the pipeline attached, or None (a converter called directly)."""
    card: Any = options.extra.get(MODEL_CARD_KEY)
    return card if isinstance(card, ModelCard) else None
