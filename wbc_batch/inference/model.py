"""Loading an ONNX model with onnxruntime, checked against the metadata it carries."""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .metadata import ModelError, ModelMetadata

if TYPE_CHECKING:
    import onnx

#: Short provider names accepted by ``--provider``.
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}
DEFAULT_MODEL_NAME = "wbc-default.onnx"


def default_model_path() -> Path:
    """The shipped model: inside the installed package, else ``export/`` of a source checkout."""
    packaged = resources.files("wbc_batch") / "_model" / DEFAULT_MODEL_NAME
    if packaged.is_file():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "export" / DEFAULT_MODEL_NAME


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_providers(provider: str) -> list[str]:
    """``cpu``/``cuda``/... (or a full onnxruntime name) to a provider list ending in CPU."""
    import onnxruntime as ort

    name = PROVIDERS.get(provider.lower(), provider)
    available = ort.get_available_providers()
    if name not in available:
        raise ModelError(
            f"onnxruntime provider {name!r} is not available here (available: {', '.join(available)}); "
            "for cuda install onnxruntime-gpu"
        )
    return [name] if name == "CPUExecutionProvider" else [name, "CPUExecutionProvider"]


def read_metadata(model: str | os.PathLike[str] | onnx.ModelProto) -> ModelMetadata:
    """The contract a model carries (labels, input, preprocessing, output), checked; a :class:`ModelError` says what is wrong.

    ``model``: an ONNX proto held in memory (export and :mod:`wbc_batch.modelfile` edit protos), read from its
    ``metadata_props`` with no session and no onnx import; or a model file, opened as classify opens it
    (:func:`load_model`, one thread, the graph checked against the metadata): onnx is no inference dependency,
    so onnxruntime is the parser a file has here.
    """
    props = getattr(model, "metadata_props", None)
    if props is not None:
        return ModelMetadata.from_props({p.key: p.value for p in props})
    return load_model(model, threads=1).metadata


@dataclass
class Model:
    """An onnxruntime session and the contract it was checked against."""

    path: Path
    metadata: ModelMetadata
    session: object  # onnxruntime.InferenceSession
    sha256: str
    providers: tuple[str, ...]
    #: The graph's batch dimension when it is a fixed number (exported with a static batch), else None.
    fixed_batch: int | None = None
    #: The file's bytes as read once: worker processes build their sessions from these, never from
    #: the path again, so a file replaced mid-run cannot change the model (or its sha256) under a run.
    data: bytes = field(default=b"", repr=False)

    @property
    def labels(self) -> tuple[str, ...]:
        return self.metadata.labels

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities ``(N, C)`` float32 for a ``(N, H, W, 3)`` uint8 batch."""
        return self.infer(batch)[0]

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities ``(N, C)`` and, for a model with a domain check, its out-of-domain scores ``(N,)`` (else None).

        One ``session.run`` gives both: the score is a second output of the same graph.
        """
        md = self.metadata
        x = batch
        if md.layout == "NCHW":
            x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        if md.dtype == "float32":
            x = x.astype(np.float32)
        fb = self.fixed_batch
        if fb is None or len(x) == fb:
            out, ood = self._run(x)
        else:
            # A static-batch graph refuses any other N: feed it slices, the last one zero-padded.
            parts = [(np.zeros((0, len(md.labels)), np.float32), np.zeros(0, np.float32))]
            for i in range(0, len(x), fb):
                part = x[i : i + fb]
                n = len(part)
                if n < fb:
                    part = np.concatenate([part, np.zeros((fb - n, *part.shape[1:]), part.dtype)])
                p, s = self._run(part)
                parts.append((p[:n], None if s is None else s[:n]))
            out = np.concatenate([p for p, _ in parts])
            ood = None if md.domain is None else np.concatenate([s for _, s in parts])
        if md.output_kind == "logits":
            out = out - out.max(axis=1, keepdims=True)
            np.exp(out, out=out)
            out /= out.sum(axis=1, keepdims=True)
        return out, ood

    def _run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        md = self.metadata
        domain = md.domain
        names = [md.output_name] if domain is None else [md.output_name, domain.output]
        outs = self.session.run(names, {md.input_name: x})  # type: ignore[attr-defined]
        probs = np.array(outs[0], dtype=np.float32)  # a copy: the softmax in infer writes in place
        return probs, None if domain is None else np.asarray(outs[1], dtype=np.float32).reshape(len(x))


def _check_io(session, md: ModelMetadata) -> int | None:
    """Refuse a graph that does not match its metadata; returns the graph's fixed batch size, if any."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ModelError(f"the model has {len(inputs)} inputs; exactly one image input is supported")
    inp = inputs[0]
    if inp.name != md.input_name:
        raise ModelError(f"metadata names input {md.input_name!r} but the graph's input is {inp.name!r}")
    want_type = {"uint8": "tensor(uint8)", "float32": "tensor(float)"}[md.dtype]
    if inp.type != want_type:
        raise ModelError(f"metadata says input dtype {md.dtype} but the graph takes {inp.type}")
    shape = list(inp.shape)
    expected = [None, md.height, md.width, 3] if md.layout == "NHWC" else [None, 3, md.height, md.width]
    if len(shape) != 4 or any(isinstance(s, int) and e is not None and s != e for s, e in zip(shape, expected, strict=True)):
        raise ModelError(
            f"the graph's input shape {shape} does not match the metadata ({md.layout} {md.height}x{md.width}x3, "
            f"expected {['N' if e is None else e for e in expected]})"
        )
    outs = {o.name: o for o in session.get_outputs()}
    if md.output_name not in outs:
        raise ModelError(f"metadata names output {md.output_name!r} but the graph's outputs are {sorted(outs)}")
    oshape = outs[md.output_name].shape
    if len(oshape) != 2 or (isinstance(oshape[1], int) and oshape[1] != len(md.labels)):
        raise ModelError(f"output {md.output_name!r} has shape {oshape}; expected [N, {len(md.labels)}] for {len(md.labels)} labels")
    _check_domain_output(outs, md)
    return shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None


def _check_domain_output(outs: dict, md: ModelMetadata) -> None:
    """A domain section must name a graph output of one score per image."""
    domain = md.domain
    if domain is None:
        return
    if domain.output not in outs:
        raise ModelError(f"metadata names a domain-check output {domain.output!r} but the graph's outputs are {sorted(outs)}")
    shape = outs[domain.output].shape
    if len(shape) != 1:
        raise ModelError(f"domain-check output {domain.output!r} has shape {shape}; expected [N] (one score per image)")


def load_model(
    path: str | os.PathLike[str] | None = None,
    *,
    provider: str = "cpu",
    threads: int = 0,
    spinning: bool = True,
) -> Model:
    """Open ``path`` (default: the shipped model) and check it against its metadata.

    ``threads`` is onnxruntime's intra-op thread count (0: its default, all cores). Turn
    ``spinning`` off when several processes share the cores, so idle threads do not burn them.
    The file is read once: the session and the sha256 come from the same bytes.
    """
    p = Path(path) if path is not None else default_model_path()
    if not p.is_file():
        hint = " (the default model is missing from this installation)" if path is None else ""
        raise ModelError(f"model file not found: {p}{hint}")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ModelError(f"cannot read {p}: {e.strerror or e}") from e
    return model_from_bytes(data, p, provider=provider, threads=threads, spinning=spinning)


def model_from_bytes(
    data: bytes,
    path: str | os.PathLike[str],
    *,
    provider: str = "cpu",
    threads: int = 0,
    spinning: bool = True,
) -> Model:
    """A :class:`Model` from a model file's bytes (``path`` only names it in messages and the sidecar)."""
    import onnxruntime as ort

    p = Path(path)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = max(0, threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = resolve_providers(provider)
    try:
        session = ort.InferenceSession(data, sess_options=so, providers=providers)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
        raise ModelError(f"{p} is not a loadable ONNX model: {str(e).splitlines()[0][:300]}") from e
    md = ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map)
    fixed_batch = _check_io(session, md)
    return Model(p, md, session, hashlib.sha256(data).hexdigest(), tuple(session.get_providers()), fixed_batch, data)


def network_rate(model: Model, images: np.ndarray, batch: int = 32, repeat: int = 1) -> float:
    """Images/s of the network alone on already-decoded batches (after one warm-up batch; best of ``repeat`` passes)."""
    model.predict(images[:batch])
    best = 0.0
    for _ in range(repeat):
        t = time.perf_counter()
        for i in range(0, len(images), batch):
            model.predict(images[i : i + batch])
        best = max(best, len(images) / (time.perf_counter() - t))
    return best
