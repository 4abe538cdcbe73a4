"""The layer kinds that can be tracked, each presented as one matrix map on tokens.

Everything after capture (A, S, Λ, contractions, scores) sees a tracked layer as a
matrix ``W [d_in, d_out]`` applied to tokens: inputs ``a [B, T, d_in]``, outputs (and
their gradients ``g``) ``[B, T, d_out]``, so that ``y_t = a_t · W (+ bias)`` at every
token ``t``. A *kind* says how a module class fits that form, in one place per class
(kfac-jax style: one block per layer kind):

* ``linear`` (``nnx.Linear``): tokens are every input axis but the last;
  ``d_in = in_features``, ``d_out = out_features``.
* ``conv`` (``nnx.Conv``): tokens are the output positions (× any extra batch axes), ``a_t``
  the input patch under the kernel (KFC); ``d_in = prod(kernel_size) · c_in``, ``d_out = c_out``.
* ``conv_transpose`` (``nnx.ConvTranspose``): the convolution of the stride-dilated input
  that ``lax.conv_transpose`` is, tracked as ``conv``;
* ``linear_general`` (``nnx.LinearGeneral``): tokens are the axes not contracted;
  ``d_in = prod(in_features)``, ``d_out = prod(out_features)``.
* ``einsum`` (``nnx.Einsum``): tokens are the input's letters absent from the kernel;
  ``d_in`` its contracted letters, ``d_out`` the kernel's letters kept in the output.

Kernel → matrix: the kernel's contracted axes, in kernel order, flattened row-major
into the rows, its output axes into the columns (a conv kernel ``[*k, c_in, c_out]``
becomes ``[prod(k) · c_in, c_out]``); the bias, flattened, is the extra last row of the
augmented weight ``[d_in + 1, d_out]``. :meth:`LayerKind.matrix` and
:meth:`LayerKind.kernel` map one way and back (the exact references use them).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.linear import canonicalize_padding

from influence.errors import TrackingError, Unsupported


class LayerInfo(NamedTuple):
    """A tracked layer as a matrix map ``[d_in, d_out]``; ``d_a = d_in + has_bias`` is the
    augmented input size and ``kind`` one of :data:`KIND_NAMES`."""

    name: str
    d_in: int
    d_out: int
    has_bias: bool
    kind: str = "linear"

    @property
    def d_a(self) -> int:
        return self.d_in + int(self.has_bias)


def _batched(name: str, shape: tuple, least: int) -> None:
    if len(shape) < least:
        raise TrackingError(
            f"layer {name!r} received input of shape {shape}; tracked layers need a leading batch axis "
            f"(rank at least {least})"
        )


@dataclasses.dataclass(frozen=True)
class LayerKind:
    """How one tracked module is a matrix map on tokens (static, hashable).

    Subclasses set ``kind`` and ``module_type`` and implement :meth:`of` (read and check
    the module's configuration), :meth:`inputs` and, where the layout is not the plain
    ``[B, ..., d]``, :meth:`outputs`/:meth:`from_outputs` and :meth:`matrix`/:meth:`kernel`.
    """

    name: str
    d_in: int
    d_out: int
    has_bias: bool
    kernel_shape: tuple[int, ...]
    bias_shape: tuple[int, ...] | None

    kind: ClassVar[str]
    module_type: ClassVar[type]

    @classmethod
    def of(cls, name: str, module: Any) -> LayerKind:
        """The kind's description of ``module`` (each kind reads its own settings)."""
        raise Unsupported(f"{cls.__name__} is the base of the layer kinds; each kind defines of()")

    @property
    def info(self) -> LayerInfo:
        return LayerInfo(self.name, self.d_in, self.d_out, self.has_bias, self.kind)

    def check_call(self, args: tuple, kwargs: dict) -> None:
        """Refuse call arguments that would change the map (none for most kinds)."""

    def inputs(self, x: jax.Array) -> jax.Array:
        """The layer's input as tokens ``[B, ..., d_in]`` (capture flattens ``...`` into T)."""
        _batched(self.name, x.shape, 2)
        return x

    def outputs(self, y: jax.Array) -> jax.Array:
        """The layer's output ``y`` as tokens ``[B, T, d_out]``, in the order of :meth:`inputs`."""
        return y.reshape(y.shape[0], -1, self.d_out)

    def from_outputs(self, tokens: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """Inverse of :meth:`outputs`: ``[B, T, d_out]`` back to the output's ``shape``."""
        return tokens.reshape(shape)

    def matrix(self, kernel: jax.Array) -> jax.Array:
        """The kernel as the matrix ``[d_in, d_out]`` (``[..., *kernel_shape]`` allowed)."""
        return kernel.reshape(kernel.shape[: kernel.ndim - len(self.kernel_shape)] + (self.d_in, self.d_out))

    def kernel(self, matrix: jax.Array) -> jax.Array:
        """Inverse of :meth:`matrix`: ``[d_in, d_out]`` back to ``kernel_shape``."""
        return matrix.reshape(self.kernel_shape)

    def bias_row(self, bias: jax.Array) -> jax.Array:
        """The bias as the last row ``[d_out]`` of the augmented weight."""
        return bias.reshape(self.d_out)

    def bias(self, row: jax.Array) -> jax.Array:
        return row.reshape(self.bias_shape)


def _bias_shape(module: Any) -> tuple[int, ...] | None:
    bias = getattr(module, "bias", None)
    return None if bias is None else tuple(int(s) for s in bias.shape)


@dataclasses.dataclass(frozen=True)
class Linear(LayerKind):
    """``nnx.Linear``: kernel ``[d_in, d_out]``; every input axis but the last is a token axis."""

    kind: ClassVar[str] = "linear"
    module_type: ClassVar[type] = nnx.Linear

    @classmethod
    def of(cls, name, module):
        shape = tuple(int(s) for s in module.kernel.shape)
        if len(shape) != 2:
            raise TrackingError(f"layer {name!r} has a {len(shape)}-D kernel; an nnx.Linear kernel must be 2-D")
        return cls(name, shape[0], shape[1], _bias_shape(module) is not None, shape, _bias_shape(module))

    def outputs(self, y):
        _batched(self.name, y.shape, 2)
        return super().outputs(y)

    def matrix(self, kernel):
        return kernel

    def kernel(self, matrix):
        return matrix


def _tuple(x: Any, n: int) -> tuple[int, ...]:
    x = 1 if x is None else x  # flax treats None as 1
    return (int(x),) * n if isinstance(x, int) else tuple(int(v) for v in x)


@dataclasses.dataclass(frozen=True)
class Conv(LayerKind):
    """``nnx.Conv`` (any number of spatial axes) as KFC does (Grosse & Martens 2016): the
    tokens are the output positions, ``a_t`` the input patch under the kernel at position
    ``t`` (``[*k, c_in]`` flattened, zeros where it overlaps the padding), so that
    ``y_t = a_t · kernel.reshape(-1, c_out) + bias``.

    Grouped convolutions (``feature_group_count > 1``) and masked kernels are refused:
    their weight is not one dense matrix of the patches.
    """

    kernel_size: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    padding: str | tuple[tuple[int, int], ...] = "VALID"
    input_dilation: tuple[int, ...] = ()
    kernel_dilation: tuple[int, ...] = ()
    pre_pad: tuple[tuple[int, int], ...] | None = None  # CIRCULAR/REFLECT/CAUSAL: flax pads first
    pad_mode: str = "constant"

    kind: ClassVar[str] = "conv"
    module_type: ClassVar[type] = nnx.Conv

    @classmethod
    def of(cls, name, module):
        if module.feature_group_count != 1:
            raise TrackingError(
                f"layer {name!r} is a grouped convolution (feature_group_count={module.feature_group_count}); "
                "its weight is block-diagonal, not one matrix of the input patches, and cannot be tracked: "
                "exclude it with layers=..."
            )
        if module.mask is not None:
            raise TrackingError(
                f"layer {name!r} is a masked convolution; its effective weight is kernel * mask, not the kernel, "
                "and cannot be tracked: exclude it with layers=..."
            )
        k = tuple(int(s) for s in module.kernel_size)
        n = len(k)
        if not 1 <= n <= 3:
            raise TrackingError(f"layer {name!r} has {n} spatial axes; tracked convolutions have 1 to 3")
        shape = tuple(int(s) for s in module.kernel.shape)
        dilation = _tuple(module.kernel_dilation, n)
        padding = module.padding
        pre_pad, mode = None, "constant"
        if isinstance(padding, str):
            padding = padding.upper()
            if padding in ("CIRCULAR", "REFLECT"):
                dilated = [(kk - 1) * d + 1 for kk, d in zip(k, dilation)]
                pre_pad = tuple(((s - 1) // 2, s // 2) for s in dilated)
                mode = {"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding]
                padding = "VALID"
            elif padding == "CAUSAL":
                if n != 1:
                    raise TrackingError(f"layer {name!r}: CAUSAL padding exists only for 1-D convolutions")
                pre_pad = ((dilation[0] * (k[0] - 1), 0),)
                padding = "VALID"
            elif padding not in ("SAME", "VALID", "SAME_LOWER"):
                raise TrackingError(f"layer {name!r} has padding {module.padding!r}, which flax does not define")
        else:
            padding = tuple((int(lo), int(hi)) for lo, hi in canonicalize_padding(padding, n))
        d_in = math.prod(k) * shape[-2]
        return cls(name, d_in, shape[-1], _bias_shape(module) is not None, shape, _bias_shape(module), k,
                   _tuple(module.strides, n), padding, _tuple(module.input_dilation, n), dilation, pre_pad, mode)

    def inputs(self, x):
        n = len(self.kernel_size)
        _batched(self.name, x.shape, n + 2)
        batch = x.shape[0]
        x = x.reshape((-1,) + x.shape[-(n + 1):])  # extra batch axes become tokens, as flax flattens them
        if self.pre_pad is not None:
            x = jnp.pad(x, ((0, 0), *self.pre_pad, (0, 0)), mode=self.pad_mode)
        spatial = "DHW"[-n:]
        # An identity convolution gathers the patches; HIGHEST precision keeps it an exact copy
        # on accelerators that would otherwise round float32 operands to bfloat16.
        patches = jax.lax.conv_general_dilated_patches(
            x, self.kernel_size, self.strides, self.padding, lhs_dilation=self.input_dilation,
            rhs_dilation=self.kernel_dilation, dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"),
            precision=jax.lax.Precision.HIGHEST)
        c_in = self.kernel_shape[-2]
        # patches' features are ordered (c_in, *k); the kernel flattens as (*k, c_in)
        patches = patches.reshape(batch, -1, c_in, math.prod(self.kernel_size))
        return jnp.swapaxes(patches, -1, -2).reshape(batch, -1, self.d_in)


@dataclasses.dataclass(frozen=True)
class ConvTranspose(Conv):
    """``nnx.ConvTranspose`` (``transpose_kernel=False``, flax's default): ``lax.conv_transpose``
    is a convolution of the input dilated by the strides, with stride 1 and the padding
    lax derives from the (dilated) kernel size, so it is tracked as that :class:`Conv`:
    tokens are the output positions, ``a_t`` the patch of the dilated input under the
    kernel ``[*k, c_in, c_out]``. ``CIRCULAR`` padding (a wrap of the output), masks and
    ``transpose_kernel=True`` are refused."""

    kind: ClassVar[str] = "conv_transpose"
    module_type: ClassVar[type] = nnx.ConvTranspose

    @classmethod
    def of(cls, name, module):
        from jax._src.lax.convolution import _conv_transpose_padding  # lax's own rule, not re-derived

        refused = ("a masked kernel" if module.mask is not None else
                   "transpose_kernel=True (a flipped, transposed kernel)" if module.transpose_kernel else
                   "CIRCULAR padding (the output is wrapped)" if module.padding == "CIRCULAR" else None)
        if refused:
            raise TrackingError(f"layer {name!r} is an nnx.ConvTranspose with {refused}, which is not tracked: "
                                "exclude it with layers=...")
        k = tuple(int(s) for s in module.kernel_size)
        n = len(k)
        if not 1 <= n <= 3:
            raise TrackingError(f"layer {name!r} has {n} spatial axes; tracked convolutions have 1 to 3")
        strides, dilation = _tuple(module.strides, n), _tuple(module.kernel_dilation, n)
        padding = canonicalize_padding(module.padding, n)
        if isinstance(padding, str):
            dilated = [(kk - 1) * d + 1 for kk, d in zip(k, dilation)]
            padding = tuple(_conv_transpose_padding(kk, s, padding) for kk, s in zip(dilated, strides))
        padding = tuple((int(lo), int(hi)) for lo, hi in padding)
        shape = tuple(int(s) for s in module.kernel.shape)
        return cls(name, math.prod(k) * shape[-2], shape[-1], _bias_shape(module) is not None, shape,
                   _bias_shape(module), k, (1,) * n, padding, strides, dilation, None, "constant")


def _normal_axes(axes: tuple[int, ...], ndim: int) -> tuple[int, ...]:
    return tuple(a % ndim for a in axes)


@dataclasses.dataclass(frozen=True)
class LinearGeneral(LayerKind):
    """``nnx.LinearGeneral`` (e.g. the query/key/value/out projections of
    ``nnx.MultiHeadAttention``): its ``axis`` are contracted (``d_in = prod(in_features)``),
    every other input axis is a token axis, ``d_out = prod(out_features)``. Kernels with
    ``batch_axis`` are refused."""

    axis: tuple[int, ...] = ()

    kind: ClassVar[str] = "linear_general"
    module_type: ClassVar[type] = nnx.LinearGeneral

    @classmethod
    def of(cls, name, module):
        if module.batch_axis:
            raise TrackingError(
                f"layer {name!r} is an nnx.LinearGeneral with batch_axis={dict(module.batch_axis)}: one kernel per "
                "batch index is not one matrix map and cannot be tracked: exclude it with layers=..."
            )
        shape = tuple(int(s) for s in module.kernel.shape)
        d_in, d_out = math.prod(module.in_features), math.prod(module.out_features)
        return cls(name, d_in, d_out, _bias_shape(module) is not None, shape, _bias_shape(module),
                   tuple(int(a) for a in module.axis))

    def inputs(self, x):
        _batched(self.name, x.shape, 2)
        axes = _normal_axes(self.axis, x.ndim)
        if 0 in axes:
            raise TrackingError(f"layer {self.name!r} contracts the batch axis 0 of its input {x.shape}")
        n = len(axes)
        # the contracted axes go last in kernel order; the others keep their order, as in
        # dot_general's output, so token t of a and of y are the same position
        moved = jnp.moveaxis(x, axes, tuple(range(x.ndim - n, x.ndim)))
        return moved.reshape(x.shape[0], -1, self.d_in)


@dataclasses.dataclass(frozen=True)
class Einsum(LayerKind):
    """``nnx.Einsum`` whose equation is a matrix map: ``input,kernel->output`` where every
    letter is either *token* (input and output), *contracted* (input and kernel) or
    *output* (kernel and output), and the input's first letter is a token letter (the
    batch). E.g. ``"BTD,DNH->BTNH"`` (d_in = D, d_out = N·H) or ``"BTNH,NHD->BTD"``.
    Rows of the matrix are the contracted letters in kernel order, columns the output
    letters in output order (the order flax flattens the bias in)."""

    lhs: str = ""
    rhs: str = ""
    out: str = ""

    kind: ClassVar[str] = "einsum"
    module_type: ClassVar[type] = nnx.Einsum

    @property
    def token_letters(self) -> str:
        return "".join(c for c in self.lhs if c not in self.rhs)

    @property
    def contracted(self) -> str:
        return "".join(c for c in self.rhs if c in self.lhs)

    @property
    def out_letters(self) -> str:
        return "".join(c for c in self.out if c in self.rhs)

    @staticmethod
    def parse(name: str, equation: str | None) -> tuple[str, str, str]:
        supported = 'supported: e.g. "BTD,DNH->BTNH", "BTNH,NHD->BTD"'
        if equation is None:
            raise TrackingError(f"layer {name!r} is an nnx.Einsum without an einsum_str; give the equation to the "
                                "constructor to track it, or exclude it with layers=...")
        equation = equation.replace(" ", "")
        if "..." in equation:
            raise TrackingError(f"layer {name!r}: einsum {equation!r} uses an ellipsis; write every axis ({supported})")
        operands, out = equation.split("->")
        lhs, rhs = operands.split(",")
        problems = []
        for label, s in (("input", lhs), ("kernel", rhs), ("output", out)):
            if len(set(s)) != len(s):
                problems.append(f"the {label} repeats a letter")
        for c in set(lhs + rhs + out):
            where = (c in lhs, c in rhs, c in out)
            if where == (True, True, True):
                problems.append(f"{c!r} is in the input, the kernel and the output (one kernel per index)")
            elif sum(where) == 1:
                problems.append(f"{c!r} appears in one operand only (a summed axis)")
        if not problems and (not lhs or lhs[0] in rhs):
            problems.append("the input's first letter must be the batch axis, kept in the output")
        if problems:
            raise TrackingError(f"layer {name!r}: einsum {equation!r} is not a matrix map on tokens: "
                                f"{'; '.join(sorted(problems))} ({supported})")
        return lhs, rhs, out

    @classmethod
    def of(cls, name, module):
        lhs, rhs, out = cls.parse(name, module.einsum_str)
        shape = tuple(int(s) for s in module.kernel.shape)
        if len(shape) != len(rhs):
            raise TrackingError(f"layer {name!r}: kernel of shape {shape} for einsum kernel letters {rhs!r}")
        size = dict(zip(rhs, shape))
        d_in = math.prod(size[c] for c in rhs if c in lhs)
        d_out = math.prod(size[c] for c in out if c in rhs)
        return cls(name, d_in, d_out, _bias_shape(module) is not None, shape, _bias_shape(module), lhs, rhs, out)

    def check_call(self, args, kwargs):
        equation = kwargs.get("einsum_str", args[0] if args else None)
        if equation is not None and self.parse(self.name, equation) != (self.lhs, self.rhs, self.out):
            raise TrackingError(f"layer {self.name!r} was called with einsum_str={equation!r}, not its own "
                                f"{self.lhs},{self.rhs}->{self.out}; a tracked einsum must keep one equation")

    def _kernel_order(self) -> tuple[int, ...]:
        return tuple(self.rhs.index(c) for c in self.contracted + self.out_letters)

    def _output_order(self) -> tuple[int, ...]:
        return tuple(self.out.index(c) for c in self.token_letters + self.out_letters)

    def inputs(self, x):
        _batched(self.name, x.shape, len(self.lhs))
        order = tuple(self.lhs.index(c) for c in self.token_letters + self.contracted)
        return jnp.transpose(x, order).reshape(x.shape[0], -1, self.d_in)

    def outputs(self, y):
        moved = jnp.transpose(y, self._output_order())
        return moved.reshape(moved.shape[0], -1, self.d_out)

    def from_outputs(self, tokens, shape):
        order = self._output_order()
        moved = tokens.reshape(tuple(shape[i] for i in order))
        return jnp.transpose(moved, tuple(order.index(i) for i in range(len(order))))

    def matrix(self, kernel):
        lead = kernel.ndim - len(self.kernel_shape)
        order = tuple(range(lead)) + tuple(lead + i for i in self._kernel_order())
        return jnp.transpose(kernel, order).reshape(kernel.shape[:lead] + (self.d_in, self.d_out))

    def kernel(self, matrix):
        order = self._kernel_order()
        moved = matrix.reshape(tuple(self.kernel_shape[i] for i in order))
        return jnp.transpose(moved, tuple(order.index(i) for i in range(len(order))))


#: The trackable kinds, most specific class first (a subclass of a tracked flax class is
#: tracked as its base).
KINDS: tuple[type[LayerKind], ...] = (Linear, Conv, ConvTranspose, LinearGeneral, Einsum)
KIND_NAMES = tuple(k.kind for k in KINDS)


def kind_class(module: Any) -> type[LayerKind] | None:
    """The kind that tracks ``module``, or ``None`` if its class is not trackable."""
    for kind in KINDS:
        if isinstance(module, kind.module_type):
            return kind
    return None


def describe_kinds() -> str:
    return ", ".join(f"nnx.{k.module_type.__name__}" for k in KINDS)
