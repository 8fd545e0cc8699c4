"""Building blocks shared by the networks of `mri.models` and `mri.invertible`."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


def complex_to_channels(x: Tensor) -> Tensor:
    """``(B, *spatial)`` complex -> ``(B, 2, *spatial)`` real (real and imaginary parts)."""
    if not x.is_complex():
        raise TypeError(f"expected a complex image (B, *spatial), got dtype {x.dtype}")
    return torch.stack((x.real, x.imag), dim=1)


def channels_to_complex(x: Tensor) -> Tensor:
    """``(B, 2, *spatial)`` real -> ``(B, *spatial)`` complex."""
    if x.shape[1] != 2:
        raise ValueError(f"expected 2 channels (real, imaginary) in dim 1, got {tuple(x.shape)}")
    real, imag = x[:, 0], x[:, 1]
    if real.dtype not in (torch.float32, torch.float64):  # e.g. bf16 under autocast
        real, imag = real.float(), imag.float()
    return torch.complex(real, imag)


def _conv(
    conv_dim: int,
    cin: int,
    cout: int,
    kernel_size: int = 3,
    bias: bool = True,
    padding_mode: str = "zeros",
) -> nn.Conv2d | nn.Conv3d:
    if conv_dim not in (2, 3):
        raise ValueError(f"conv_dim: got {conv_dim!r}; expected 2 (slices) or 3 (volumes, cine)")
    cls = nn.Conv2d if conv_dim == 2 else nn.Conv3d
    return cls(
        cin, cout, kernel_size, padding=kernel_size // 2, bias=bias, padding_mode=padding_mode
    )


def _edge_padding(conv_dim: int) -> str:
    # The official GLEAM layers pad the hidden 3x3 convolutions by reflection in 2D and by
    # replication in 3D; the choice changes no parameter count, only the image borders.
    return "reflect" if conv_dim == 2 else "replicate"


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: got {value!r}; expected a positive int")


def _plain_layers(
    features: int, num_layers: int, conv_dim: int, conv: Callable[[int, int], nn.Module]
) -> nn.Sequential:
    widths = [2] + [features] * (num_layers - 1) + [2]
    layers: list[nn.Module] = []
    for i in range(num_layers):
        if i:
            layers.append(nn.ReLU())
        layers.append(conv(widths[i], widths[i + 1]))
    return nn.Sequential(*layers)


def _check_num_layers(num_layers: object) -> None:
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 2:
        raise ValueError(f"num_layers: got {num_layers!r}; expected an int >= 2")


def _check_image(x: Tensor, conv_dim: int) -> None:
    if not isinstance(x, Tensor) or not x.is_complex():
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"x: expected a complex image, got {got}")
    if x.dtype != torch.complex64:
        raise TypeError(
            f"x: the networks run in float32 and take complex64 images, got {x.dtype}; "
            "convert with x.to(torch.complex64)"
        )
    if x.dim() != conv_dim + 1:
        layout = "(B, H, W)" if conv_dim == 2 else "(B, D|T, H, W)"
        raise ValueError(
            f"x: a network with conv_dim={conv_dim} takes images {layout}, got shape "
            f"{tuple(x.shape)}"
        )
