"""Check, before training starts, that a network meets the contracts its registry entry declares.

Why before: a network that cannot be exported, calibrated or adapted used to fail at export, after
the hours of training. One forward pass of a tiny batch with hooks on the modules shows what the
exported graph will hold: which tensor each batch norm reads, which activations feed a downsampling
layer, whether the output is the last Linear layer's (see :data:`.archs.CONTRACTS`). The hooks look
at modules, as the exporter's graph does after folding: a functional activation (``F.relu`` in a
forward) is invisible here, and the domain check's graph search does not find it either.
"""

from __future__ import annotations

import torch
from torch import nn

from .archs import Arch, ContractError, require_modules
from .config import TrainConfig

#: Activations the exported graph writes as Relu or Clip (what the domain check's stage search reads).
ACTIVATIONS = (nn.ReLU, nn.ReLU6)


_BN = nn.modules.batchnorm._BatchNorm


class _Trace:
    """One eval-mode forward with hooks on every module: the facts each contract is judged on.

    Tensors are told apart by identity: ``kinds`` says what made each output ("conv", "bn", "conv-act": the
    activation of a convolution or of its batch norm, which folds into it), and every output is kept alive
    for the pass so that no identity is reused.
    """

    def __init__(self, net: nn.Module) -> None:
        self.net = net
        self.kinds: dict[int, str] = {}
        self.keep: list[torch.Tensor] = []
        self.bn_inputs: list[tuple[str, str | None]] = []  # each batch norm and what its input was
        self.stages: list[str] = []  # downsampling layers that read a convolution's activation
        self.linear: tuple[str, int, torch.Tensor] | None = None  # the last Linear run: name, input rank, output
        self.bn_names = [n for n, m in net.named_modules() if isinstance(m, _BN)]

    def _mark(self, out: torch.Tensor, kind: str) -> None:
        self.keep.append(out)
        if self.kinds.get(id(out)) != "conv-act":  # an in-place activation inside the module (timm's BatchNormAct2d) marked it
            self.kinds[id(out)] = kind

    def _act(self, name: str):
        owner = next((b for b in self.bn_names if name.startswith(f"{b}.")), None)

        def hook(_m, inputs, out):  # inside a batch norm (BatchNormAct2d) it acts on the norm's output: judge by the norm's input
            kind = dict(self.bn_inputs).get(owner) if owner is not None else self.kinds.get(id(inputs[0]))
            if kind in ("conv", "bn"):
                self.keep.append(out)
                self.kinds[id(out)] = "conv-act"
        return hook

    def _pre(self, name: str, m: nn.Module):
        def hook(_m, inputs):
            kind = self.kinds.get(id(inputs[0]))
            if isinstance(m, _BN):
                self.bn_inputs.append((name, kind))
            elif kind == "conv-act" and (isinstance(m, nn.MaxPool2d) or (isinstance(m, nn.Conv2d) and max(m.stride) > 1)):
                self.stages.append(name)
        return hook

    def _hooks(self) -> list:
        handles = []
        for name, m in self.net.named_modules():
            handles.append(m.register_forward_pre_hook(self._pre(name, m)))
            if isinstance(m, (nn.Conv2d, _BN)):
                kind = "conv" if isinstance(m, nn.Conv2d) else "bn"
                handles.append(m.register_forward_hook(lambda _m, _i, o, k=kind: self._mark(o, k)))
            if isinstance(m, ACTIVATIONS):
                handles.append(m.register_forward_hook(self._act(name)))
            if isinstance(m, nn.Linear):
                handles.append(m.register_forward_hook(lambda _m, i, o, n=name: setattr(self, "linear", (n, i[0].dim(), o))))
        return handles

    def run(self, x: torch.Tensor) -> torch.Tensor:
        handles, training = self._hooks(), self.net.training
        try:
            self.net.eval()
            with torch.no_grad():
                return self.net(x)
        finally:
            for h in handles:
                h.remove()
            self.net.train(training)


def contract_problems(net: nn.Module, arch: Arch, num_classes: int, input_size: tuple[int, int]) -> list[str]:
    """What breaks the contracts ``arch`` declares, for ``net`` at the network input ``input_size``; empty when all hold."""
    trace = _Trace(net)
    try:
        out = trace.run(torch.zeros((2, 3, *input_size)))
    except RuntimeError as e:  # e.g. an input too small for the network's stages
        return [f"a {input_size[0]}x{input_size[1]} input does not pass through the network: {str(e).splitlines()[0]}"]
    problems = []
    if tuple(out.shape) != (2, num_classes):
        problems.append(f"the output is {tuple(out.shape)} for a batch of 2, not (2, {num_classes})")
    if "logits" in arch.contracts and (trace.linear is None or trace.linear[2] is not out or trace.linear[1] != 2):
        problems.append("logits: the output is not the last Linear layer's, applied to (batch, features)")
    if "batchnorm" in arch.contracts:
        if not trace.bn_inputs:
            problems.append("batchnorm: the network has no batch norm")
        problems += [f"batchnorm: {name} does not read a convolution's output" for name, kind in trace.bn_inputs if kind != "conv"]
    if "stages" in arch.contracts and not trace.stages:
        problems.append("stages: no ReLU of a convolution feeds a strided convolution or max pool")
    return problems


def check_contracts(net: nn.Module, arch: Arch, num_classes: int, input_size: tuple[int, int]) -> None:
    """Raise :class:`ContractError` naming every declared contract ``net`` breaks."""
    problems = contract_problems(net, arch, num_classes, input_size)
    if problems:
        raise ContractError(f"--arch {arch.name} at {input_size[0]}x{input_size[1]} breaks its declared contracts: " + "; ".join(problems))


def check_start(cfg: TrainConfig, num_classes: int) -> None:
    """Everything about the architecture that can fail, checked before any image is decoded: the modules it needs,
    its pretrained weights' file, and its declared contracts on a network built at the run's input size.

    The network is built under a forked random state, so the run's own initialisation draws what it drew before.
    """
    from .models import build
    from .pretrained import PretrainedError, weights_file

    arch = cfg.arch_entry()
    require_modules(arch)
    start = cfg.resolved_pretrained()
    if start != "none":
        try:
            weights_file(arch.weights_named(start))
        except ValueError as e:
            raise PretrainedError(str(e)) from None
    size = cfg.net_input_size()
    with torch.random.fork_rng(devices=[]):
        net = build(arch.name, num_classes, size)
    check_contracts(net, arch, num_classes, size)
