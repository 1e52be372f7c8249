"""What defines a training run: :class:`TrainConfig`, the one place each training default lives.

Imports no torch (the networks are looked up only when a method needs them), so the CLI can show
these defaults in ``--help`` on an inference-only install.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .archs import DEFAULT_ARCH, Arch, get, net_input_size
from .data import DEFAULT_GROUP_REGEX

__all__ = ["DEFAULT_ARCH", "FIELD_SIZE", "TrainConfig"]

#: Decode size when a cell crop is used: the full field at the data set's native resolution.
FIELD_SIZE = (240, 320)


@dataclass
class TrainConfig:
    data_dir: str | list[str]  # one class-folder directory, or several (labs) trained on together
    run_dir: str
    arch: str | None = None  # None: DEFAULT_ARCH, or with init_from the network of the model it starts from (see train())
    size: tuple[int, int] | None = None  # (height, width) of the decoded field; None: see resolved_size
    crop: tuple[int | None, int | None] | None = None  # (window, out) cell crop; None: the network's default (or --init's); a None part: filled by with_crop; (0, 0): none
    resize: str = "bilinear"
    epochs: int | None = None  # None: the architecture's (archs.Arch.epochs)
    batch_size: int = 64
    optimizer: str = "adamw"  # adamw | sgd | adam
    lr: float = 2e-3
    weight_decay: float = 5e-4
    schedule: str = "onecycle"  # onecycle | cosine | constant
    label_smoothing: float = 0.1
    augment: bool = True
    val_fraction: float = 0.15
    group_regex: str = DEFAULT_GROUP_REGEX
    groups_file: str | None = None  # path,group CSV; overrides group_regex
    patience: int = 8
    seed: int = 0
    workers: int = 0  # decode processes; 0 = all cores
    threads: int = 0  # torch CPU threads; 0 = all cores
    device: str = "auto"  # auto | cpu | cuda
    max_per_class: int = 0  # 0 = all; >0 subsamples (quick runs, tests)
    init_from: str | None = None  # run folder or exported .onnx to fine-tune from (see training.init_weights)
    pretrained: str | None = None  # imagenet | none: the start without init_from; None: the architecture's (see resolved_pretrained)
    class_weights: str = "balanced"  # balanced: loss weight n / (classes * n_c) per class (train split); none
    class_subset: tuple[str, ...] | None = None  # train on only these classes (None: every class folder found)
    keep_aspect: bool = True  # decode: fit inside the frame and pad with black (False: stretch, the pre-v2 runs)
    crop_follow: bool = True  # the cell crop's window follows the nucleus' size (False: fixed window, pre-v2)
    colour: str = "wide"  # with augment: hsv (wide, half the hue turns in HSV) | wide (strong, with hue +-0.12 and saturation 0.25-1.6) | strong (stain in HED space, white balance, hue, gamma, blur, ...: v2) | mild (pre-v2) | none
    jpeg: float = 0.5  # with colour hsv, wide or strong: share of training images re-compressed as JPEG, quality 10-90 (0: none, before v3)
    colour_norm: str = "background"  # background: in-graph white balance on the slide background (see models.BackgroundBalance) | none
    precise_bn: int = 20  # after each epoch, BatchNorm statistics recomputed over up to this many training batches (0: running averages)
    source_balance: bool = True  # several data dirs: each draws the same share of an epoch, classes balanced within it
    extra: dict = field(default_factory=dict)

    def data_dirs(self) -> list[str]:
        return [self.data_dir] if isinstance(self.data_dir, str) else [str(d) for d in self.data_dir]

    def arch_entry(self) -> Arch:
        """The registry entry of this run's network (DEFAULT_ARCH until train() has read an --init source's)."""
        return get(self.arch or DEFAULT_ARCH)

    def resolved(self, init_arch: str | None = None) -> TrainConfig:
        """Every default that depends on the network filled in: the network (``init_arch``, the --init source's, when the
        run names none), then its epochs. What train() runs and the run record holds."""
        arch = self.arch or init_arch or DEFAULT_ARCH
        return replace(self, arch=arch, epochs=self.epochs or get(arch).epochs)

    def resolved_pretrained(self) -> str:
        """The weights the network starts from: none with init_from (its weights replace them), else as asked or
        the architecture's default (ImageNet where the registry has weights for it: transfer by default)."""
        if self.init_from:
            return "none"
        return self.pretrained or self.arch_entry().default_pretrained

    def with_crop(self, inherited: tuple[int, int] | None = None) -> TrainConfig:
        """The crop with its unset parts filled once the network is known: all of it from ``inherited`` (the --init
        model's, same network) when the run names none; a part the run leaves open (--crop-window or --crop-size
        alone) from ``inherited`` when that model saw a crop, else from the network's default."""
        if self.crop is None:
            return self if inherited is None else replace(self, crop=tuple(inherited))
        base = tuple(inherited) if inherited is not None and inherited[0] > 0 else self.arch_entry().default_crop
        return replace(self, crop=tuple(b if c is None else c for c, b in zip(self.crop, base, strict=True)))

    def resolved_crop(self) -> tuple[int, int] | None:
        crop = self.with_crop().crop or self.arch_entry().default_crop
        return crop if crop[0] > 0 else None  # type: ignore[return-value]

    def resolved_size(self) -> tuple[int, int]:
        if self.size:
            return tuple(self.size)  # type: ignore[return-value]
        # A cell crop works on the whole field; train() derives it from the images (data.derived_size)
        # before it gets here, so this fallback is blood-cells' native 240x320.
        return FIELD_SIZE if self.resolved_crop() else self.arch_entry().default_size

    def net_input_size(self) -> tuple[int, int]:
        return net_input_size(self.resolved_size(), self.resolved_crop())
