"""The contract a model file carries: labels, input tensor, preprocessing, output.

Stored as one JSON document under the ONNX ``metadata_props`` key :data:`METADATA_KEY`,
so any onnxruntime binding (C#, Java, C++, JavaScript) reads it with its model-metadata
call and no consumer has to guess. Reading a model without it is an error, not a guess.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..csv_safety import starts_formula
from ..errors import ExitCode, WbcBatchError
from .preprocess import DEFAULT_MAX_PIXELS, PreprocessSpec

METADATA_KEY = "wbc_batch"
SCHEMA_VERSION = 1
LAYOUTS = ("NHWC", "NCHW")
DTYPES = ("uint8", "float32")
OUTPUT_KINDS = ("probabilities", "logits")


class ModelError(WbcBatchError):
    """A model file that cannot be used: the message says what is wrong with it."""

    exit_code = ExitCode.MODEL


@dataclass(frozen=True)
class DomainCheck:
    """The optional ``domain`` section: a second graph output scoring how unlike the training data an image is.

    ``in_domain`` is ``score <= threshold``. A model without the section has no domain check, and its
    predictions carry no score. How the score is fitted and built into the graph is
    :class:`wbc_batch.modelfile.trust.DomainFit`.
    """

    output: str
    threshold: float

    @classmethod
    def from_section(cls, d: object) -> DomainCheck:
        """Read the section; a malformed one is a :class:`ModelError` naming the field."""
        if not isinstance(d, dict):
            raise ModelError("invalid model metadata: the 'domain' section is not a JSON object")
        out, thr = d.get("output"), d.get("threshold")
        if not isinstance(out, str) or not out:
            raise ModelError(f"invalid model metadata: domain.output must name a graph output, got {out!r}")
        if isinstance(thr, bool) or not isinstance(thr, (int, float)) or not math.isfinite(thr):
            raise ModelError(f"invalid model metadata: domain.threshold must be a finite number, got {thr!r}")
        return cls(out, float(thr))


_JSON_KINDS = {str: "a string", dict: "an object", type(None): "null", bool: "a boolean", int: "a number", float: "a number"}


def _label_problems(labels: object) -> list[str]:
    """What is wrong with ``labels`` as a model's class names (index order = output order); empty when nothing.

    Why a list is required: a string (``"ABCD"``) or an object iterates as characters or keys, and would
    silently become a model with other classes than the one it was trained with.
    """
    if not isinstance(labels, (list, tuple)):
        kind = _JSON_KINDS.get(type(labels), type(labels).__name__)
        shown = "" if labels is None else f": {labels!r}"
        return [f"labels must be a list of class names, got {kind}{shown}"]
    problems = []
    if len(labels) < 2:
        problems.append("at least two labels are needed")
    if any(not isinstance(lb, str) or not lb for lb in labels):
        problems.append(f"labels must be non-empty strings, got {list(labels)}")
    elif len(set(labels)) != len(labels):
        problems.append(f"labels repeat: {list(labels)}")
    elif formulas := [lb for lb in labels if starts_formula(lb)]:
        # predictions.csv writes labels verbatim (its label column must equal them), so one that starts a formula would run in a spreadsheet
        problems.append(f"labels may not start with = + - @ TAB or CR (a spreadsheet runs such a cell): {formulas}")
    return problems


@dataclass(frozen=True)
class ModelMetadata:
    """What a consumer needs to feed the network and read its answer."""

    labels: tuple[str, ...]
    height: int
    width: int
    input_name: str = "image"
    layout: str = "NHWC"
    dtype: str = "uint8"
    color: str = "RGB"
    resize: str = "bilinear"
    jpeg_draft: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS
    keep_aspect: bool = False  # fit and pad with black (preprocess.fit_box) instead of stretching
    output_name: str = "probabilities"
    output_kind: str = "probabilities"
    name: str = "model"
    arch: str = ""
    #: Free-form provenance (training data fingerprint, metrics, versions, dates).
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = _label_problems(self.labels)
        if isinstance(self.labels, (list, tuple)):
            object.__setattr__(self, "labels", tuple(self.labels))
        if self.layout not in LAYOUTS:
            problems.append(f"layout {self.layout!r} not in {LAYOUTS}")
        if self.dtype not in DTYPES:
            problems.append(f"dtype {self.dtype!r} not in {DTYPES}")
        if self.color != "RGB":
            problems.append(f"colour order {self.color!r} unsupported (RGB only)")
        if self.output_kind not in OUTPUT_KINDS:
            problems.append(f"output kind {self.output_kind!r} not in {OUTPUT_KINDS}")
        if not (isinstance(self.height, int) and isinstance(self.width, int)) or min(self.height, self.width) <= 0:
            problems.append(f"input size {self.height}x{self.width} is not positive integers")
        if problems:
            raise ModelError("invalid model metadata: " + "; ".join(problems))
        if self.domain is not None and self.domain.output == self.output_name:
            raise ModelError(f"invalid model metadata: domain.output {self.domain.output!r} is the probabilities output")

    @property
    def domain(self) -> DomainCheck | None:
        """The domain check the model carries (its ``domain`` section), or None for a model without one."""
        section = self.extra.get("domain")
        return None if section is None else DomainCheck.from_section(section)

    @property
    def preprocess(self) -> PreprocessSpec:
        return PreprocessSpec(
            height=self.height,
            width=self.width,
            resize=self.resize,
            jpeg_draft=self.jpeg_draft,
            max_pixels=self.max_pixels,
            keep_aspect=self.keep_aspect,
        )

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "name": self.name,
            "arch": self.arch,
            "labels": list(self.labels),
            "input": {
                "name": self.input_name,
                "layout": self.layout,
                "dtype": self.dtype,
                "height": self.height,
                "width": self.width,
                "channels": 3,
                "color": self.color,
            },
            "preprocess": {
                "resize": self.resize,
                "jpeg_draft": self.jpeg_draft,
                "max_pixels": self.max_pixels,
                "keep_aspect": self.keep_aspect,
                **({"pad": "centred; floor(size * min(W / w, H / h) + 0.5); the rest black (0, 0, 0)"} if self.keep_aspect else {}),
                "normalization": "inside the graph" if self.dtype == "uint8" else "none",
            },
            "output": {"name": self.output_name, "kind": self.output_kind},
            **self.extra,
        }

    def to_props(self) -> dict[str, str]:
        """The ONNX ``metadata_props`` entries to store in the model file."""
        return {METADATA_KEY: json.dumps(self.to_json_dict(), sort_keys=False)}

    @classmethod
    def from_json_dict(cls, d: dict[str, Any]) -> ModelMetadata:
        try:
            version = d.get("schema_version")
            if version != SCHEMA_VERSION:
                raise ModelError(f"metadata schema_version {version!r} is not supported (expected {SCHEMA_VERSION})")
            inp, pre, out = d["input"], d.get("preprocess", {}), d["output"]
            if inp.get("channels", 3) != 3:
                raise ModelError(f"only 3-channel inputs are supported, metadata says {inp.get('channels')}")
            known = {"schema_version", "name", "arch", "labels", "input", "preprocess", "output"}
            return cls(
                labels=d["labels"],
                height=int(inp["height"]),
                width=int(inp["width"]),
                input_name=str(inp["name"]),
                layout=str(inp.get("layout", "NHWC")),
                dtype=str(inp.get("dtype", "uint8")),
                color=str(inp.get("color", "RGB")),
                resize=str(pre.get("resize", "bilinear")),
                jpeg_draft=bool(pre.get("jpeg_draft", True)),
                max_pixels=int(pre.get("max_pixels", DEFAULT_MAX_PIXELS)),
                keep_aspect=bool(pre.get("keep_aspect", False)),
                output_name=str(out["name"]),
                output_kind=str(out.get("kind", "probabilities")),
                name=str(d.get("name", "model")),
                arch=str(d.get("arch", "")),
                extra={k: v for k, v in d.items() if k not in known},
            )
        except ModelError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ModelError(f"invalid model metadata: missing or malformed field {e}") from e

    @classmethod
    def from_props(cls, props: dict[str, str]) -> ModelMetadata:
        raw = props.get(METADATA_KEY)
        if raw is None:
            raise ModelError(
                f"the model carries no {METADATA_KEY!r} metadata (labels, input size, preprocessing); "
                "export it with 'wbc-batch export' or add the metadata (see README: Model metadata)"
            )
        try:
            d = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ModelError(f"the model's {METADATA_KEY!r} metadata is not valid JSON: {e}") from e
        if not isinstance(d, dict):
            raise ModelError(f"the model's {METADATA_KEY!r} metadata is not a JSON object")
        return cls.from_json_dict(d)

    def replace(self, **changes: Any) -> ModelMetadata:
        d = asdict(self)
        d.update(changes)
        return ModelMetadata(**d)
