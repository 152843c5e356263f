"""A stand-in for CuPy on machines without a GPU, so that ntkdist's GPU path (device checks,
task placement, tiles built and applied on the device, results back to the host) runs in CI.

Its arrays are "device" arrays of a type of their own, :class:`FakeDeviceArray`, holding a
NumPy array, and they refuse host/device mix-ups as CuPy's do, so that such a mix-up fails
here as it would on a GPU:

* ``np.asarray(x)`` / ``np.array(x)`` (anything calling ``__array__``) raises TypeError
  (CuPy's message); ``x.get()`` and ``cupy.asnumpy(x)`` return NumPy copies;
* ``cupy.asarray(a)`` / ``cupy.array(a)`` of a host array is a device copy (a transfer);
* arithmetic, comparisons, ``@`` and the module's functions with a NumPy array operand (any
  shape, 0-d included) raise TypeError, either operand first (``np_a + x`` too: NumPy hands
  its ufuncs to ``__array_ufunc__``); Python and NumPy scalars are fine, as in CuPy;
* a NumPy function called on a device array runs the fake module's function of that name
  (``__array_function__``, as CuPy does) or fails if the fake has none;
* reductions and scalar indexing give 0-d device arrays (``float()``, ``int()``, ``bool()``
  sync them to Python values), and an index may hold NumPy/list index arrays (CuPy moves
  them over); assigning a non-scalar NumPy array to a basic slice raises ValueError (CuPy's
  ``fill``), into an advanced index it is transferred (CuPy does the same).

``cupy.get_array_module`` recognises the fake type, which is how
``ntkdist.kernels.limiting.array_module`` picks the module, so the tile function takes its
array-module path (the CPU's fused NumPy path refuses non-NumPy arrays). The real CuPy path
is checked on a GPU by scripts/gpu_check.py.

Installed by putting ``module()`` at ``sys.modules["cupy"]`` (tests/test_gpu.py's fixture:
the test cluster's workers run in the test process, so they import it too).
"""

import contextlib
import types

import numpy as np

NAME = "fake GPU (NumPy stand-in)"

#: CuPy's message when a device array is converted to a NumPy array implicitly.
IMPLICIT = ("Implicit conversion to a NumPy array is not allowed. Please use `.get()` to "
            "construct a NumPy array explicitly.")


def _mixup(obj):
    return TypeError(f"Unsupported type {type(obj)} (fake CuPy: a host NumPy array where a "
                     "device array is needed, a host/device mix-up)")


def _host(obj):
    """Arguments of a device function, unwrapped: device arrays to their NumPy storage;
    a NumPy array (a host array) is refused, as CuPy refuses it."""
    if isinstance(obj, FakeDeviceArray):
        return obj._a
    if isinstance(obj, np.ndarray):
        raise _mixup(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_host(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _host(v) for k, v in obj.items()}
    return obj


def _index(key):
    """An index, unwrapped: device index arrays, and host ones (CuPy transfers those)."""
    if isinstance(key, FakeDeviceArray):
        return key._a
    if isinstance(key, tuple):
        return tuple(_index(k) for k in key)
    return key


def _basic(key) -> bool:
    keys = key if isinstance(key, tuple) else (key,)
    return not any(isinstance(k, (FakeDeviceArray, np.ndarray, list)) for k in keys)


def _device(obj):
    """Results onto the "device": NumPy arrays and scalars as device arrays (0-d for a
    scalar, as CuPy's reductions and indexing give)."""
    if isinstance(obj, np.ndarray):
        return FakeDeviceArray(obj)
    if isinstance(obj, np.generic):
        return FakeDeviceArray(np.asarray(obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_device(o) for o in obj)
    return obj


def _on_device(fn, name=None):
    """``fn`` (a NumPy function) as a device function: device arrays in and out."""

    def call(*args, **kwargs):
        out = kwargs.get("out")
        result = fn(*_host(args), **_host(kwargs))
        if out is not None:  # as given (a ufunc's out may come as a 1-tuple)
            return out[0] if isinstance(out, tuple) and len(out) == 1 else out
        return _device(result)

    call.__name__ = name or getattr(fn, "__name__", "function")
    call.__qualname__ = call.__name__
    return call


class FakeDeviceArray:
    """A "device" array: a NumPy array that does not convert to the host implicitly."""

    __slots__ = ("_a",)
    __array_priority__ = 100  # as CuPy's

    def __init__(self, a):
        if not isinstance(a, np.ndarray):
            raise TypeError(f"FakeDeviceArray holds a NumPy array, got {type(a)}")
        self._a = a

    # -- the host boundary ------------------------------------------------------------------
    def __array__(self, dtype=None, copy=None):
        raise TypeError(IMPLICIT)

    def get(self, stream=None, order="C", out=None):
        if out is not None:
            out[...] = self._a
            return out
        return np.array(self._a, order=order)

    def tolist(self):
        return self._a.tolist()

    def item(self, *args):
        return self._a.item(*args)

    def __float__(self):
        return float(self._a)

    def __int__(self):
        return int(self._a)

    def __index__(self):
        return self._a.__index__()

    def __bool__(self):
        return bool(self._a)

    def __complex__(self):
        return complex(self._a)

    def __repr__(self):
        return "fake_device_" + repr(self._a)

    def __str__(self):
        return str(self._a)

    def __reduce__(self):  # picklable, as CuPy arrays are (through the host)
        return (FakeDeviceArray, (self._a,))

    # -- NumPy's protocols: NumPy functions and ufuncs run as the fake's -------------------
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if ufunc.__name__ not in _FUNCS:
            return NotImplemented
        if method == "__call__":
            return _FUNCS[ufunc.__name__](*inputs, **kwargs)
        out = kwargs.get("out")
        result = getattr(ufunc, method)(*_host(inputs), **_host(kwargs))
        if out is not None:
            return out[0] if isinstance(out, tuple) and len(out) == 1 else out
        return _device(result)

    def __array_function__(self, func, types_, args, kwargs):
        impl = _FUNCS.get(func.__name__) if func.__module__ == "numpy" else None
        if impl is None:
            return NotImplemented
        return impl(*args, **kwargs)

    # -- attributes -------------------------------------------------------------------------
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: FakeDeviceArray(self._a.T))
    real = property(lambda self: FakeDeviceArray(self._a.real))
    imag = property(lambda self: FakeDeviceArray(self._a.imag))
    device = property(lambda self: types.SimpleNamespace(id=0))

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (_device(x) for x in self._a)

    # -- methods ----------------------------------------------------------------------------
    def astype(self, dtype, order="K", casting=None, subok=None, copy=True):
        if not copy and np.dtype(dtype) == self._a.dtype:
            return self
        return FakeDeviceArray(self._a.astype(dtype, order=order))

    def copy(self, order="C"):
        return FakeDeviceArray(self._a.copy(order=order))

    def fill(self, value):
        if isinstance(value, np.ndarray) and value.shape != ():
            raise ValueError("non-scalar numpy.ndarray cannot be used for fill")
        self._a.fill(_host(value) if isinstance(value, FakeDeviceArray) else value)

    def set(self, arr):  # CuPy's explicit host-to-device copy into this array
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"Only numpy.ndarray can be set to cupy.ndarray, got {type(arr)}")
        if arr.shape != self._a.shape:
            raise ValueError("Shape mismatch")
        self._a[...] = arr

    def view(self, dtype=None):
        return FakeDeviceArray(self._a.view() if dtype is None else self._a.view(dtype))

    # -- indexing ---------------------------------------------------------------------------
    def __getitem__(self, key):
        return _device(self._a[_index(key)])

    def __setitem__(self, key, value):
        if isinstance(value, np.ndarray) and value.shape != () and _basic(key):
            raise ValueError("non-scalar numpy.ndarray cannot be used for fill")
        self._a[_index(key)] = _index(value)  # an advanced index transfers a host value

    __hash__ = None  # unhashable, as CuPy's (and NumPy's) arrays

    # Methods and binary operators: set below, from the module's functions.

    def __neg__(self):
        return _FUNCS["negative"](self)

    def __pos__(self):
        return _FUNCS["positive"](self)

    def __abs__(self):
        return _FUNCS["absolute"](self)

    def __invert__(self):
        return _FUNCS["invert"](self)


# The CuPy functions the fake offers (all of them exist in CuPy, with NumPy's meaning), by
# name; a NumPy function or ufunc called on a device array runs the one of its name here.
_NUMPY_NAMES = """
    add subtract multiply divide true_divide floor_divide remainder mod fmod power
    float_power matmul negative positive absolute abs fabs sign reciprocal square sqrt cbrt
    exp exp2 expm1 log log2 log10 log1p sin cos tan arcsin arccos arctan arctan2 hypot sinh
    cosh tanh arcsinh arccosh arctanh deg2rad rad2deg floor ceil rint trunc fix around round
    maximum minimum fmax fmin clip copysign signbit nextafter ldexp frexp
    isfinite isinf isnan equal not_equal less less_equal greater greater_equal
    logical_and logical_or logical_not logical_xor bitwise_and bitwise_or bitwise_xor invert
    left_shift right_shift
    where nonzero argwhere flatnonzero count_nonzero allclose isclose array_equal
    sum prod cumsum cumprod mean std var max min amax amin argmax argmin all any ptp
    dot vdot inner outer tensordot einsum trace kron
    triu tril diag diagonal diagflat
    reshape ravel transpose swapaxes moveaxis squeeze expand_dims broadcast_to atleast_1d
    atleast_2d concatenate stack vstack hstack column_stack split array_split tile repeat
    flip fliplr flipud roll take sort argsort unique searchsorted
    zeros_like empty_like ones_like full_like copy
""".split()

_FUNCS = {name: _on_device(getattr(np, name), name) for name in _NUMPY_NAMES}


def _method(name):
    def method(self, *args, **kwargs):
        out = kwargs.get("out")
        result = getattr(self._a, name)(*_host(args), **_host(kwargs))
        return out if out is not None else _device(result)

    method.__name__ = method.__qualname__ = name
    return method


for _name in ("reshape", "ravel", "flatten", "transpose", "swapaxes", "squeeze", "sum", "prod",
              "max", "min", "mean", "std", "var", "all", "any", "argmax", "argmin", "cumsum",
              "dot", "clip", "nonzero", "diagonal", "trace", "take", "repeat", "conj", "round",
              "sort", "argsort"):
    setattr(FakeDeviceArray, _name, _method(_name))


def _binary(name, reflected=False, inplace=False):
    """An operator through the module's function ``name`` (which refuses host arrays)."""
    if inplace:
        def op(self, other):
            _FUNCS[name](self, other, out=self)
            return self
    elif reflected:
        def op(self, other):
            return _FUNCS[name](other, self)
    else:
        def op(self, other):
            return _FUNCS[name](self, other)
    return op


for _op, _name in (("add", "add"), ("sub", "subtract"), ("mul", "multiply"),
                   ("truediv", "divide"), ("floordiv", "floor_divide"), ("mod", "remainder"),
                   ("pow", "power"), ("matmul", "matmul"), ("and", "bitwise_and"),
                   ("or", "bitwise_or"), ("xor", "bitwise_xor"), ("lshift", "left_shift"),
                   ("rshift", "right_shift")):
    setattr(FakeDeviceArray, f"__{_op}__", _binary(_name))
    setattr(FakeDeviceArray, f"__r{_op}__", _binary(_name, reflected=True))
    setattr(FakeDeviceArray, f"__i{_op}__", _binary(_name, inplace=True))
for _op, _name in (("lt", "less"), ("le", "less_equal"), ("gt", "greater"),
                   ("ge", "greater_equal"), ("eq", "equal"), ("ne", "not_equal")):
    setattr(FakeDeviceArray, f"__{_op}__", _binary(_name))
del _op, _name


# Creation functions: shape and dtype in, a device array out.
_CREATION = {name: _on_device(getattr(np, name), name)
             for name in ("zeros", "empty", "ones", "full", "arange", "linspace", "eye",
                          "identity", "tri")}


def asarray(a, dtype=None, order=None):
    """A device array: ``a`` itself if already one (cast if asked), else a device copy."""
    if isinstance(a, FakeDeviceArray):
        return a if dtype is None else a.astype(dtype, copy=False)
    return FakeDeviceArray(np.array(a, dtype=dtype, order=order or "K"))  # a transfer


def array(obj, dtype=None, copy=True, order="K", ndmin=0):
    if isinstance(obj, FakeDeviceArray):
        return FakeDeviceArray(np.array(obj._a, dtype=dtype, copy=copy, order=order,
                                        ndmin=ndmin))
    return FakeDeviceArray(np.array(obj, dtype=dtype, order=order, ndmin=ndmin))


def ascontiguousarray(a, dtype=None):
    if not isinstance(a, FakeDeviceArray):
        raise _mixup(a)
    return FakeDeviceArray(np.ascontiguousarray(a._a, dtype=dtype))


def asnumpy(a, stream=None, order="C", out=None):
    """A host (NumPy) array: a copy of a device array's contents; a host array as it is."""
    if isinstance(a, FakeDeviceArray):
        return a.get(order=order, out=out)
    if out is not None:
        out[...] = a
        return out
    return np.asarray(a, order=order)


def cupyx_modules() -> dict:
    """``cupyx``, ``cupyx.scipy`` and ``cupyx.scipy.linalg`` (``solve_triangular``) for
    ``sys.modules``, on the fake device."""
    import scipy.linalg

    cx, cs = types.ModuleType("cupyx"), types.ModuleType("cupyx.scipy")
    cl = types.ModuleType("cupyx.scipy.linalg")
    cl.solve_triangular = _on_device(scipy.linalg.solve_triangular, "solve_triangular")
    cx.scipy, cs.linalg = cs, cl
    cx.errstate = lambda **kw: contextlib.nullcontext()  # the fake Cholesky always raises
    return {"cupyx": cx, "cupyx.scipy": cs, "cupyx.scipy.linalg": cl}


_C_TYPES = {"float64": ("double", np.float64), "float32": ("float", np.float32),
            "int32": ("int", np.int32), "int64": ("long long", np.int64),
            "bool": ("int", np.int32)}
_compiled: dict = {}


class ElementwiseKernel:
    """CuPy's ``ElementwiseKernel`` on the fake device: the operation (C) compiled by the
    host's C compiler into a loop over the broadcast arguments, called through ctypes. Host
    NumPy arrays are refused as arguments, as CuPy refuses them; a compiler error raises at
    construction (CuPy compiles at the first call), and so are device arrays of another
    dtype than declared. More lenient than CuPy: ``bool`` travels as an int, and the host
    compiler does not contract to fused multiply–adds as NVRTC does."""

    def __init__(self, in_params: str, out_params: str, operation: str, name: str):
        def parse(params):
            return [tuple(p.split()) for p in params.split(",")]

        self.ins, self.outs = parse(in_params), parse(out_params)
        args = [f"const {_C_TYPES[t][0]}* {n}_arr" for t, n in self.ins]
        args += [f"{_C_TYPES[t][0]}* {n}_arr" for t, n in self.outs]
        loads = "".join(f"const {_C_TYPES[t][0]} {n} = {n}_arr[i]; " for t, n in self.ins)
        decls = "".join(f"{_C_TYPES[t][0]} {n}; " for t, n in self.outs)
        stores = "".join(f"{n}_arr[i] = {n}; " for _, n in self.outs)
        src = (f"#include <math.h>\n#include <stdbool.h>\nvoid {name}(long n, "
               f"{', '.join(args)}) {{\n  for (long i = 0; i < n; ++i) {{ {loads}{decls}\n"
               f"{{ {operation} }}\n{stores}}}\n}}\n")
        self._fn = _compile(src, name)

    def __call__(self, *args):
        import ctypes

        if len(args) != len(self.ins):
            raise TypeError(f"wrong number of arguments: {len(args)} for {len(self.ins)}")
        for a, (t, name) in zip(args, self.ins):
            if isinstance(a, np.ndarray) and a.ndim:
                raise _mixup(a)
            if isinstance(a, FakeDeviceArray) and a._a.dtype != _C_TYPES[t][1] and t != "bool":
                raise TypeError(f"Type is mismatched. {name} {a._a.dtype} {t}")  # as CuPy
        arrays = np.broadcast_arrays(*(a._a if isinstance(a, FakeDeviceArray) else np.asarray(a)
                                       for a in args))
        ins = [np.ascontiguousarray(a, dtype=_C_TYPES[t][1]) for a, (t, _) in zip(arrays,
                                                                                  self.ins)]
        shape = arrays[0].shape if arrays else ()
        outs = [np.empty(shape, dtype=_C_TYPES[t][1]) for t, _ in self.outs]
        self._fn(ctypes.c_long(int(np.prod(shape))),
                 *(a.ctypes.data_as(ctypes.c_void_p) for a in ins + outs))
        outs = [FakeDeviceArray(o) for o in outs]
        return outs[0] if len(outs) == 1 else tuple(outs)


def _compile(src: str, name: str):
    """The C function ``name`` of ``src``, compiled once per source into a shared library."""
    import ctypes
    import hashlib
    import os
    import subprocess
    import tempfile

    key = hashlib.sha256(src.encode()).hexdigest()[:16]
    if key not in _compiled:
        with tempfile.TemporaryDirectory(prefix="fakecupy-") as folder:
            c, so = os.path.join(folder, "k.c"), os.path.join(folder, "k.so")
            with open(c, "w") as f:
                f.write(src)
            subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", so, c, "-lm"], check=True,
                           capture_output=True)
            _compiled[key] = ctypes.CDLL(so)  # loaded: the files may go
    fn = getattr(_compiled[key], name)
    fn.restype = None
    return fn


def module(devices: int = 1, free: int = 8 * 2 ** 30):
    """A fake ``cupy`` module: ``devices`` GPUs (0: CUDA finds none), each with ``free``
    bytes of free memory."""
    cp = types.ModuleType("cupy")
    cp.__dict__.update(_FUNCS)
    cp.__dict__.update(_CREATION)
    cp.ndarray = FakeDeviceArray
    cp.asarray, cp.array, cp.asnumpy = asarray, array, asnumpy
    cp.ascontiguousarray = ascontiguousarray
    for name in ("float64", "float32", "float16", "int64", "int32", "int16", "int8",
                 "uint64", "uint32", "uint8", "intp", "bool_", "complex128", "complex64",
                 "dtype", "pi", "e", "inf", "nan", "newaxis", "result_type", "can_cast",
                 "issubdtype", "floating", "integer"):
        setattr(cp, name, getattr(np, name))

    def get_array_module(*args):
        return cp if any(isinstance(a, FakeDeviceArray) for a in args) else np

    cp.get_array_module = get_array_module
    cp.ElementwiseKernel = ElementwiseKernel
    cp.linalg = types.SimpleNamespace(inv=_on_device(np.linalg.inv, "inv"),
                                      cholesky=_on_device(np.linalg.cholesky, "cholesky"))

    def count():
        if devices < 1:
            raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")
        return devices

    runtime = types.SimpleNamespace(getDeviceCount=count,
                                    getDeviceProperties=lambda i: {"name": NAME.encode()},
                                    memGetInfo=lambda: (free, 2 * free))
    device = types.SimpleNamespace(id=0, synchronize=lambda: None)
    cp.cuda = types.SimpleNamespace(runtime=runtime, Device=lambda *a: device)
    pool = types.SimpleNamespace(free_all_blocks=lambda: None, free_bytes=lambda: 0)
    cp.get_default_memory_pool = lambda: pool
    return cp
