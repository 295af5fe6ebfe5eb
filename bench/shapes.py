"""Input shapes to benchmark: every batch-norm input of ResNet-50, edge-case shapes, named presets."""

from __future__ import annotations

from dataclasses import dataclass

# torchvision ResNet-50: (planes, blocks, stride of the first block) per stage; a bottleneck widens
# its output to planes * 4.
RESNET50_STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))
BOTTLENECK_EXPANSION = 4

# Batch sizes for the ResNet-50 shapes: a training batch on a GPU, a smaller one on the CPU where
# the same batch would take minutes per row.
GPU_BATCH = 256
CPU_BATCH = 32

PUBLIC_PRESETS = ("quick", "resnet50", "all")
# "tiny" exists for the test suite: one small shape, seconds per run.
PRESETS = (*PUBLIC_PRESETS, "tiny")


@dataclass(frozen=True)
class Shape:
    """An NCHW input shape and where it comes from (a ResNet-50 layer or an edge case)."""

    n: int
    c: int
    h: int
    w: int
    origin: str = ""

    @property
    def dims(self) -> tuple[int, int, int, int]:
        """The shape as the tuple torch expects."""
        return (self.n, self.c, self.h, self.w)

    @property
    def numel(self) -> int:
        """Number of elements of an input of this shape."""
        return self.n * self.c * self.h * self.w

    def __str__(self) -> str:
        return f"{self.n}x{self.c}x{self.h}x{self.w}"


# Shapes where PyTorch's kernels are known to be weak; the same on every device.
EDGE_SHAPES = (
    Shape(8, 32, 512, 512, "small C, large HxW"),
    Shape(64, 2048, 7, 7, "large C, small HxW"),
    Shape(4096, 1024, 1, 1, "BatchNorm1d-like"),
    Shape(2, 64, 256, 256, "small batch"),
)


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    """Spatial output size of a convolution or pooling window."""
    return (size + 2 * padding - kernel) // stride + 1


def resnet50_bn_layers(image_size: int = 224) -> list[tuple[str, int, int, int]]:
    """Every BatchNorm2d of torchvision's ResNet-50 in forward order, as (name, C, H, W) of its input.

    torchvision's Bottleneck (ResNet v1.5) puts the stride in the 3x3 conv, so in the first block of
    a stage bn1 sees the previous resolution and bn2, bn3 and the downsample BN the reduced one.
    """
    layers = []
    size = _conv_out(image_size, kernel=7, stride=2, padding=3)
    layers.append(("bn1", 64, size, size))
    size = _conv_out(size, kernel=3, stride=2, padding=1)  # max pool
    in_channels = 64
    for stage, (planes, blocks, first_stride) in enumerate(RESNET50_STAGES, start=1):
        out_channels = planes * BOTTLENECK_EXPANSION
        for block in range(blocks):
            stride = first_stride if block == 0 else 1
            prefix = f"layer{stage}.{block}"
            layers.append((f"{prefix}.bn1", planes, size, size))
            size = _conv_out(size, kernel=3, stride=stride, padding=1)
            layers.append((f"{prefix}.bn2", planes, size, size))
            layers.append((f"{prefix}.bn3", out_channels, size, size))
            if block == 0 and (stride != 1 or in_channels != out_channels):
                layers.append((f"{prefix}.downsample.1", out_channels, size, size))
            in_channels = out_channels
    return layers


def resnet50_shapes(batch: int, image_size: int = 224) -> list[Shape]:
    """The distinct batch-norm input shapes of ResNet-50 in order of first use; each origin names
    the first layer with that shape and how many layers share it."""
    first: dict[tuple[int, int, int], str] = {}
    count: dict[tuple[int, int, int], int] = {}
    for name, c, h, w in resnet50_bn_layers(image_size):
        first.setdefault((c, h, w), name)
        count[(c, h, w)] = count.get((c, h, w), 0) + 1
    return [Shape(batch, c, h, w, f"resnet50 {name} (x{count[(c, h, w)]})") for (c, h, w), name in first.items()]


def preset_shapes(preset: str, device_type: str) -> list[Shape]:
    """The shapes of a named preset on a device type ("cpu" or "cuda")."""
    batch = GPU_BATCH if device_type == "cuda" else CPU_BATCH
    if preset == "tiny":
        # Odd sizes so a layout or indexing slip cannot hide behind round numbers.
        return [Shape(3, 5, 4, 7, "tiny (tests)")]
    if preset == "quick":
        # One shape per regime: many small planes, mid-size, large C with small planes, 1d-like.
        by_chw = {(s.c, s.h, s.w): s for s in resnet50_shapes(batch)}
        return [by_chw[(64, 56, 56)], by_chw[(256, 14, 14)], by_chw[(2048, 7, 7)], EDGE_SHAPES[2]]
    if preset == "resnet50":
        return resnet50_shapes(batch)
    if preset == "all":
        return [*resnet50_shapes(batch), *EDGE_SHAPES]
    raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")


def parse_shapes(text: str) -> list[Shape]:
    """Parse "NxCxHxW[,NxCxHxW...]" as given to --shapes."""
    shapes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"bad shape {item!r}: expected NxCxHxW with positive integers, e.g. 32x64x56x56")
        n, c, h, w = (int(p) for p in parts)
        shapes.append(Shape(n, c, h, w, "--shapes"))
    return shapes
