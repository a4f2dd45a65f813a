"""Architecture description shared by the reference model and the towers.

An `AlexNetSpec` is plain data: channel counts, kernel geometry, classes, input
size, number of towers. Both `ReferenceAlexNet` and `AlexNetTower` are built
from it, which is what lets the tower-parallel model be checked against the
single-process reference layer by layer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

ALLOWED_TOWERS = (1, 2, 4, 8)


@dataclass(frozen=True)
class ConvSpec:
    """One convolution: output channels, kernel, stride, padding, and whether
    it reads every tower's maps ("cross") or only its own tower's ("own")."""

    out_channels: int
    kernel: int
    stride: int
    padding: int
    reads: str  # "image" | "own" | "all"
    bias_init: float
    lrn: bool = False
    pool: bool = False


@dataclass(frozen=True)
class AlexNetSpec:
    """Everything needed to build one AlexNet variant.

    `towers` splits every layer's output channels/neurons into equal slices;
    conv layers that read "own" maps become grouped convolutions in the
    reference model (groups=towers), as on the paper's two GPUs.
    """

    name: str
    convs: tuple[ConvSpec, ...]
    fc_widths: tuple[int, ...]  # hidden fully connected layers (fc6, fc7)
    fc_bias_init: float
    num_classes: int = 1000
    image_size: int = 224
    towers: int = 2
    dropout: float = 0.5
    # Weight init: "paper" = N(0, 0.01) with the paper's biases of 1;
    # "kaiming" = He-normal for convs, which trains small nets much faster.
    init: str = "paper"
    # LRN hyper-parameters as written in the paper (section 3.3). PyTorch's
    # LocalResponseNorm divides alpha by `size`, so we pass alpha * size to it
    # to get exactly b = a / (k + alpha * sum a^2)^beta.
    lrn_size: int = 5
    lrn_k: float = 2.0
    lrn_alpha: float = 1e-4
    lrn_beta: float = 0.75

    @property
    def pool5_size(self) -> int:
        return feature_map_sizes(self)[-1]

    @property
    def fc_in_features(self) -> int:
        return self.convs[-1].out_channels * self.pool5_size**2

    def with_towers(self, towers: int) -> "AlexNetSpec":
        return replace(self, towers=towers)

    @property
    def fc8_sliced(self) -> bool:
        """fc8 is split across towers when the classes divide evenly;
        otherwise every tower holds a full replica of it."""
        return self.num_classes % self.towers == 0


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _pool_out(size: int) -> int:
    # Overlapping max-pooling, kernel 3, stride 2 (paper section 3.4).
    return (size - 3) // 2 + 1


def feature_map_sizes(spec: AlexNetSpec) -> list[int]:
    """Spatial size after each conv stage (after its pooling, if any)."""
    size = spec.image_size
    sizes = []
    for conv in spec.convs:
        size = _conv_out(size, conv.kernel, conv.stride, conv.padding)
        if conv.pool:
            size = _pool_out(size)
        sizes.append(size)
    return sizes


def _paper_convs(widths: tuple[int, int, int, int, int], lrn: bool) -> tuple[ConvSpec, ...]:
    c1, c2, c3, c4, c5 = widths
    return (
        ConvSpec(c1, 11, 4, 2, "image", 0.0, lrn=lrn, pool=True),
        ConvSpec(c2, 5, 1, 2, "own", 1.0, lrn=lrn, pool=True),
        ConvSpec(c3, 3, 1, 1, "all", 0.0),
        ConvSpec(c4, 3, 1, 1, "own", 1.0),
        ConvSpec(c5, 3, 1, 1, "own", 1.0, pool=True),
    )


def _scaled(width: int, width_mult: float) -> int:
    # Keep every width a multiple of 8 so any allowed tower count divides it.
    return max(8, int(round(width * width_mult / 8)) * 8)


def _variant(
    name: str,
    conv_widths: tuple[int, ...],
    lrn: bool,
    fc_bias_init: float,
    num_classes: int,
    image_size: int,
    towers: int,
    width_mult: float,
    dropout: float,
    init: str,
) -> AlexNetSpec:
    widths = tuple(_scaled(w, width_mult) for w in conv_widths)
    fc = _scaled(4096, width_mult)
    return AlexNetSpec(
        name=name,
        convs=_paper_convs(widths, lrn=lrn),
        fc_widths=(fc, fc),
        fc_bias_init=fc_bias_init,
        num_classes=num_classes,
        image_size=image_size,
        towers=towers,
        dropout=dropout,
        init=init,
    )


def alexnet_spec(
    num_classes: int = 1000,
    image_size: int = 224,
    towers: int = 2,
    width_mult: float = 1.0,
    dropout: float = 0.5,
    init: str = "paper",
) -> AlexNetSpec:
    """The paper's two-tower network (Krizhevsky et al. 2012, figure 2)."""
    return _variant("alexnet", (96, 256, 384, 384, 256), True, 1.0,
                    num_classes, image_size, towers, width_mult, dropout, init)


def alexnet_owt_spec(
    num_classes: int = 1000,
    image_size: int = 224,
    towers: int = 1,
    width_mult: float = 1.0,
    dropout: float = 0.5,
    init: str = "kaiming",
) -> AlexNetSpec:
    """The single-tower "one weird trick" variant (Krizhevsky 2014), the one
    torchvision ships: 64-192-384-256-256 kernels, no LRN."""
    return _variant("alexnet_owt", (64, 192, 384, 256, 256), False, 0.0,
                    num_classes, image_size, towers, width_mult, dropout, init)


def tower_divisibility_problems(spec: AlexNetSpec) -> list[str]:
    """Why `spec` cannot be split into `spec.towers` towers (empty if it can)."""
    towers = spec.towers
    problems = []
    if towers not in ALLOWED_TOWERS:
        problems.append(f"towers={towers} is not one of {ALLOWED_TOWERS}")
        return problems
    for index, conv in enumerate(spec.convs, start=1):
        if conv.out_channels % towers:
            problems.append(
                f"conv{index} has {conv.out_channels} kernels, not divisible by towers={towers}"
            )
    for index, width in enumerate(spec.fc_widths, start=6):
        if width % towers:
            problems.append(f"fc{index} has {width} neurons, not divisible by towers={towers}")
    if spec.num_classes < towers:
        problems.append(
            f"num_classes={spec.num_classes} is smaller than towers={towers}; "
            f"use at most {spec.num_classes} towers"
        )
    if spec.pool5_size < 1:
        problems.append(f"image_size={spec.image_size} is too small: the feature maps vanish before pool5")
    return problems


def build_spec(
    name: str,
    num_classes: int,
    image_size: int,
    towers: int,
    width_mult: float = 1.0,
    dropout: float = 0.5,
    init: str = "paper",
) -> AlexNetSpec:
    """The spec for a model name: "alexnet", "alexnet_owt", or "alexnet_small"
    (the paper network; its small size comes from width_mult/image_size)."""
    builders = {"alexnet": alexnet_spec, "alexnet_small": alexnet_spec, "alexnet_owt": alexnet_owt_spec}
    if name not in builders:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(builders)}")
    spec = builders[name](
        num_classes=num_classes,
        image_size=image_size,
        towers=towers,
        width_mult=width_mult,
        dropout=dropout,
        init=init,
    )
    return replace(spec, name=name)
