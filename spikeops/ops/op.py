"""Kernel entry points as ``torch.library`` custom ops that plain eager code calls directly.

Every kernel entry point is a custom op ``spikeops::<name>``: that is what makes spikeops
traceable (``torch.compile`` without graph breaks, FakeTensor, ``opcheck``). A call through the
custom op costs tens to hundreds of microseconds of Python on the host, though (the dispatcher,
and an autograd wrapper that re-reads the op's schema on every call: ~40 us for a 12-argument
op), where the kernel itself takes a few microseconds at small shapes. Measured on the 2-core CPU
VM (torch 2.13, [4, 64] input): ``spikeops.lif`` forward + backward 270-410 us through the custom
op, where the forward kernel called alone takes 3.5 us. On a GPU that host time is what a small
layer's step costs.

:class:`Op` registers the custom op and, for plain eager tensors (:func:`eager_call_ok`), calls
the same Python function directly: through a ``torch.autograd.Function`` with the op's own
``setup_context`` and ``backward`` when autograd records the call, else as a plain call. The
same code runs on the same arguments either way; tracing, fake tensors, modes and functorch
transforms get the custom op.
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch
from torch.autograd.function import once_differentiable
from torch.utils import _python_dispatch


def eager_call_ok(*tensors: torch.Tensor) -> bool:
    """True when a kernel may be called without its custom op: plain ``torch.Tensor`` arguments, and
    nothing tracing (``torch.compile``, ``make_fx``), no dispatch or torch-function mode and no
    functorch transform active."""
    if torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled():
        return False
    if _python_dispatch._get_current_dispatch_mode() is not None:
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    return all(type(t) is torch.Tensor for t in tensors)


class Op:
    """``spikeops::<name>``, a custom op over ``fn`` (which needs full type annotations, as
    ``torch.library.custom_op`` does), called through :meth:`__call__` with positional arguments."""

    def __init__(self, name: str, fn: Callable):
        self._fn = fn
        self.op = torch.library.custom_op(f"spikeops::{name}", mutates_args=())(fn)
        params = inspect.signature(fn).parameters.values()
        self._arity = len(params)
        self._defaults = tuple(p.default for p in params if p.default is not inspect.Parameter.empty)
        self._function = None
        self.__doc__ = fn.__doc__

    def register_fake(self, fake: Callable) -> Callable:
        """The op's shapes and dtypes for tracing (``torch.library.register_fake``)."""
        return self.op.register_fake(fake)

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        """The op's gradient (``torch.library.register_autograd``), also used by the eager path."""
        self.op.register_autograd(backward, setup_context=setup_context)
        fn = self._fn

        def forward(ctx, *args):  # forward(ctx, ...): Function.apply binds a separate setup_context's
            output = fn(*args)     # arguments with inspect.signature on every call (~20 us)
            setup_context(ctx, args, output)
            return output

        self._function = type(f"{self._fn.__name__}_function", (torch.autograd.Function,), {
            "forward": staticmethod(forward),
            "backward": staticmethod(once_differentiable(backward)),
        })

    def __call__(self, *args):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if not eager_call_ok(*tensors):
            return self.op(*args)
        if self._function is not None and torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            missing = self._arity - len(args)  # setup_context sees every argument, as the custom op fills them
            return self._function.apply(*args, *(self._defaults[len(self._defaults) - missing:] if missing else ()))
        return self._fn(*args)


def custom_op(name: str) -> Callable[[Callable], Op]:
    """Decorator: ``@custom_op("lif_forward")`` over a kernel entry point makes it an :class:`Op`."""
    return lambda fn: Op(name, fn)
