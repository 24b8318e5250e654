"""Shared test fixtures: real Keras models built once per session, a CLI runner, weight readers."""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def keras() -> Any:
    from kprune_batch.quiet import import_keras

    return import_keras()


# --- running the real command line -----------------------------------------------------------

class CliResult:
    def __init__(self, proc: subprocess.CompletedProcess[str]):
        self.code = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        self.args = proc.args

    def __repr__(self) -> str:
        return (f"kprune exited {self.code}\n--- args: {self.args}\n--- stdout:\n{self.stdout}"
                f"--- stderr:\n{self.stderr}")

    def expect(self, code: int) -> "CliResult":
        assert self.code == code, repr(self)
        return self


def kprune(*args: str, cwd: str | os.PathLike[str] | None = None, env: dict | None = None,
           timeout: float = 300, stdin: str | None = None) -> CliResult:
    """Run `python -m kprune_batch ARGS` in a subprocess, exactly as a user would (`stdin`: the
    text piped in; none by default)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    feed = {"stdin": subprocess.DEVNULL} if stdin is None else {"input": stdin}
    proc = subprocess.run([sys.executable, "-m", "kprune_batch", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=full_env,
                          timeout=timeout, **feed)
    return CliResult(proc)


@pytest.fixture(name="kprune")
def kprune_fixture() -> Any:
    return kprune


# --- a child process in which no Keras framework can be imported ------------------------------

FRAMEWORKS = ("tensorflow", "keras", "jax", "torch")

# Put on a child's PYTHONPATH only: Python imports sitecustomize at start-up (site.py), before
# any kprune code, so every import of a blocked framework fails as on a machine where `pip install
# kprune-batch` installed none of them. Each attempt is recorded in sitecustomize.ATTEMPTS (a
# child that imports sitecustomize reads them); the message says the test blocked it.
BLOCKER = '''\
import sys

ATTEMPTS = []


class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {blocked!r}:
            ATTEMPTS.append(name)
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)",
                                      name=name)
        return None


sys.meta_path.insert(0, _Blocked())
'''


def without_frameworks(folder: Path, frameworks: tuple[str, ...] = FRAMEWORKS) -> dict[str, str]:
    """The PYTHONPATH of a child process in which none of `frameworks` can be imported: the
    blocker written into `folder`, then this checkout, then the caller's own PYTHONPATH."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(BLOCKER.format(blocked=tuple(frameworks)))
    extra = [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []
    return {"PYTHONPATH": os.pathsep.join([str(folder), str(REPO), *extra])}


def write_spec(folder: Path, text: str, name: str = "spec.yaml") -> Path:
    path = Path(folder) / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


# --- reading weights back, independently of kprune ---------------------------------------------

def layer_weights(keras: Any, path: str | os.PathLike[str]) -> dict[str, dict[str, np.ndarray]]:
    """{layer path: {variable name: array}} of a saved model, nested models as 'outer/inner'."""
    model = keras.saving.load_model(str(path), compile=False)
    out: dict[str, dict[str, np.ndarray]] = {}

    def walk(layer: Any, prefix: str) -> None:
        for sub in layer.layers:
            name = prefix + sub.name
            if hasattr(sub, "layers") and isinstance(sub, keras.Model):
                walk(sub, name + "/")
            else:
                out[name] = {v.name: np.array(v.numpy()) for v in sub.weights}

    walk(model, "")
    return out


def assert_only_changed(before: dict, after: dict, allowed: dict[tuple[str, str], Any]) -> None:
    """Every variable is bit-identical to `before` except where `allowed[(layer, var)]` is a
    boolean mask of the elements that may differ (and which must then equal 0 in `after`)."""
    assert before.keys() == after.keys()
    for layer, variables in before.items():
        for name, old in variables.items():
            new = after[layer][name]
            assert old.shape == new.shape, (layer, name)
            mask = allowed.get((layer, name))
            if mask is None:
                assert np.array_equal(old.view(np.uint8), new.view(np.uint8)), \
                    f"{layer}/{name} changed but should be bit-identical"
            else:
                assert np.array_equal(old[~mask].view(np.uint8), new[~mask].view(np.uint8)), \
                    f"{layer}/{name} changed outside the zeroed filters"


# README "Silence": a BN consuming a zeroed channel through these layers is its follower
FOLLOWER_ACTIVATIONS = {"Activation", "ReLU", "LeakyReLU", "ELU"}  # any value, mapped
ZERO_KEEPING = {"Dropout", "SpatialDropout2D", "MaxPooling2D", "AveragePooling2D",
                "ZeroPadding2D", "Cropping2D", "UpSampling2D"}  # while the channel is 0


def bn_followers(model: Any, layer: Any, value: float, through_concat: bool = False
                 ) -> list[tuple[Any, float, int]]:
    """The BatchNormalization layers of `model` that README "Silence" neutralises for a
    zeroed filter of `layer` whose pre-activation output is `value`, each with the constant it
    receives and the shift of the filter's channel there: reached from its output through
    layers called once, activation layers (the value mapped by Keras's function) and, while
    the value is 0, pooling, dropout, padding, cropping and upsampling layers; with
    `through_concat` (batchnorm: neutralize_concat) also through Concatenates on the last axis,
    input i's channel c being the result's sum of the earlier inputs' widths + c (the widths
    read from the Keras tensors' shapes)."""
    found, todo = [], [(layer.output, _through(layer, value), 0)]
    while todo:
        tensor, v, shift = todo.pop()
        for nxt in model.layers:
            inputs = nxt.input if isinstance(nxt.input, list) else [nxt.input]
            if not any(t is tensor for t in inputs) or len(nxt._inbound_nodes) != 1:
                continue
            cls = type(nxt).__name__
            if cls == "Concatenate":
                if through_concat and nxt.axis in (-1, len(tensor.shape) - 1):
                    slot = next(i for i, t in enumerate(inputs) if t is tensor)
                    offset = sum(int(t.shape[-1]) for t in inputs[:slot])
                    todo.append((nxt.output, v, shift + offset))
            elif len(inputs) != 1:
                continue
            elif cls == "BatchNormalization":
                found.append((nxt, v, shift))
            elif cls in FOLLOWER_ACTIVATIONS:
                todo.append((nxt.output, _through(nxt, v), shift))
            elif cls in ZERO_KEEPING and v == 0.0:
                todo.append((nxt.output, v, shift))
    return found


def zeroed_reference(keras: Any, model: Any, selection: dict[str, list[int]],
                     bias: str = "zero", neutralize: bool = True, clone: bool = True,
                     through_concat: bool = False) -> Any:
    """The contract's reference: zero the kernel slice (and the bias unless bias: keep);
    neutralise a BN follower (bn_followers; gamma = beta = 0, with scale=False beta = 0 and the
    moving mean the constant it receives, as README "Silence") unless batchnorm: keep; with
    `through_concat` (batchnorm: neutralize_concat) also those after Concatenates, at the
    filter's channel there. With clone=False the model itself is edited (for graphs
    clone_model cannot rebuild)."""
    ref = keras.models.clone_model(model) if clone else model
    if clone:
        ref.set_weights(model.get_weights())
    for name, filters in selection.items():
        layer = ref
        for part in name.split("/"):  # a layer inside a nested model: 'outer/inner'
            layer = layer.get_layer(part)
        w = layer.get_weights()
        cls = type(layer).__name__
        if cls.startswith("Depthwise"):  # kernel (..., in, mult): filter f = c * mult + m
            w[0].reshape(w[0].shape[:-2] + (-1,))[..., filters] = 0  # a view of w[0]
        else:  # pointwise kernel for separable, else kernel: filters on the last axis
            w[1 if "Separable" in cls else 0][..., filters] = 0
        if bias == "zero" and layer.use_bias:
            w[-1][filters] = 0
        layer.set_weights(w)
        if not neutralize:
            continue
        followers: dict[float, list[tuple[Any, float, int]]] = {}  # by the filter's output
        edits: dict[int, tuple[Any, dict[int, float]]] = {}  # id(bn): (bn, {channel: constant})
        for f in filters:
            pre = float(w[-1][f]) if layer.use_bias else 0.0
            if pre not in followers:
                followers[pre] = bn_followers(ref, layer, pre, through_concat)
            for bn, constant, shift in followers[pre]:
                edits.setdefault(id(bn), (bn, {}))[1][f + shift] = constant
        for bn, constants in edits.values():
            # keras/src/layers/normalization/batch_normalization.py build(): gamma if
            # scale, beta if center, then the moving mean and variance
            bw = dict(zip([n for n, on in (("gamma", bn.scale), ("beta", bn.center)) if on]
                          + ["mean", "var"], bn.get_weights()))
            fs = list(constants)
            if "gamma" in bw:
                bw["gamma"][fs] = 0
            else:  # scale=False: the mean set to the constant input (exact when it is 0)
                bw["mean"][fs] = list(constants.values())
            if "beta" in bw:
                bw["beta"][fs] = 0
            bn.set_weights(list(bw.values()))
    return ref


# layers a removed channel passes unchanged (activations map its constant)
REMOVAL_PASS_THROUGH = {"Activation", "ReLU", "MaxPooling2D", "AveragePooling2D", "Dropout",
                "GlobalAveragePooling2D", "GlobalMaxPooling2D", "ZeroPadding2D"}


def _through(layer: Any, value: float | None) -> float | None:
    """A constant channel value after an elementwise layer (Keras's own function of it)."""
    if value is None:
        return None
    fn = getattr(layer, "activation", None)
    x = np.full((1, 1), value, np.float32)
    return float(np.asarray(fn(x) if fn is not None else layer(x))[0, 0])


def expected_removal_params(model: Any, selection: dict[str, list[int]],
                            through_concat: bool = False) -> dict[str, int]:
    """Each layer's parameter count after removing `selection` (with the design's defaults:
    bias zeroed, a BN follower neutralised: bn_followers; with `through_concat` those after
    Concatenates too), worked out here from the input model's shapes alone, not from kprune.

    Walks the graph in layer order, carrying per tensor {removed channel: the constant it holds}
    (None where it varies across positions): a removed filter outputs its activation of 0 (a
    depthwise layer's too: its filters are its input's channels, so the selection must name
    exactly the channels it receives; a separable conv's input channel takes its depthwise
    slices and their pointwise rows); a neutralised BN follower outputs 0; another BN maps c
    to gamma*(c - mean)/sqrt(var + eps) + beta; an activation applies Keras's function to the
    constant; Concatenate offsets the channels, Flatten spreads them over the positions, a
    Reshape keeping the channel axis last passes them, Add and Multiply must see the same
    channels from every input (a coupled group) and sum or multiply them. A consumer loses the
    input rows of the removed channels; one without a bias gains one where a non-zero constant
    is folded into it. A layer no removed channel reaches keeps its parameters."""
    producer = {id(layer.output): layer for layer in model.layers}
    neutralised: dict[str, set[int]] = {}  # BN followers of the removed filters: channels
    for name, filters in selection.items():
        for bn, _, shift in bn_followers(model, model.get_layer(name), 0.0, through_concat):
            neutralised.setdefault(bn.name, set()).update(f + shift for f in filters)
    gone: dict[str, dict[int, float | None]] = {}
    params: dict[str, int] = {}
    for layer in model.layers:
        cls = type(layer).__name__
        ins = layer.input if isinstance(layer.input, list) else [layer.input]
        feeds = [producer[id(t)] for t in ins] if cls != "InputLayer" else []
        removed = [gone[p.name] for p in feeds]
        channels = int(layer.output.shape[-1])
        if cls == "InputLayer" or not any(removed) and layer.name not in selection:
            out: dict[int, float | None] = {}
        elif cls in ("Conv2D", "Dense"):
            assert cls == "Dense" or layer.groups == 1, layer.name
            (rin,) = removed
            assert None not in rin.values(), f"{layer.name}: a varying constant (not foldable)"
            kernel = tuple(layer.kernel.shape)
            kept_in = kernel[-2] - len(rin)
            kept_out = kernel[-1] - len(selection.get(layer.name, []))
            gains_bias = not layer.use_bias and any(rin.values())
            params[layer.name] = (int(np.prod(kernel[:-2])) * kept_in * kept_out
                                  + (kept_out if layer.use_bias or gains_bias else 0))
            out = {f: _through(layer, 0.0) for f in selection.get(layer.name, [])}
        elif cls == "SeparableConv2D":
            # keras/src/layers/convolutional/base_separable_conv.py: depthwise kernel
            # (kh, kw, in, mult), pointwise (1, 1, in * mult, filters): an input channel takes
            # its depthwise slices and their pointwise rows, a filter its pointwise column
            (rin,) = removed
            assert not rin or set(rin.values()) == {0.0}, \
                f"{layer.name}: a non-zero constant reaches it (no rule here for a fold)"
            depth = tuple(layer.depthwise_kernel.shape)
            kept_in = depth[-2] - len(rin)
            kept_out = channels - len(selection.get(layer.name, []))
            params[layer.name] = (int(np.prod(depth[:-2])) * kept_in * depth[-1]
                                  + kept_in * depth[-1] * kept_out
                                  + (kept_out if layer.use_bias else 0))
            out = {f: _through(layer, 0.0) for f in selection.get(layer.name, [])}
        elif cls == "DepthwiseConv2D":
            (rin,) = removed
            assert layer.depth_multiplier == 1 and \
                sorted(rin) == sorted(selection.get(layer.name, [])), \
                f"{layer.name}: a depthwise layer loses exactly its input's removed channels"
            kept = channels - len(rin)
            params[layer.name] = int(np.prod(layer.kernel.shape[:-2])) * kept + \
                (kept if layer.use_bias else 0)
            out = {c: _through(layer, 0.0) for c in rin}
        elif cls == "BatchNormalization":
            (rin,) = removed
            g = np.asarray(layer.gamma.numpy(), np.float64) if layer.scale else np.ones(channels)
            b = np.asarray(layer.beta.numpy(), np.float64) if layer.center else np.zeros(channels)
            mean, var = (np.asarray(v.numpy(), np.float64)
                         for v in (layer.moving_mean, layer.moving_variance))
            cut = neutralised.get(layer.name, set())
            out = {c: 0.0 if c in cut else (None if v is None else float(
                g[c] * (v - mean[c]) / np.sqrt(var[c] + layer.epsilon) + b[c]))
                for c, v in rin.items()}
            params[layer.name] = len(layer.weights) * (channels - len(out))
        elif cls in REMOVAL_PASS_THROUGH:
            (rin,) = removed
            out = {c: _through(layer, v) if cls in ("Activation", "ReLU") else v
                   for c, v in rin.items()}
            if cls == "ZeroPadding2D":  # the border is 0, the inside the constant
                out = {c: (0.0 if v == 0 else None) for c, v in out.items()}
        elif cls == "Reshape":
            (rin,) = removed
            assert layer.target_shape[-1] == ins[0].shape[-1], layer.name
            out = dict(rin)
        elif cls == "Flatten":
            (rin,) = removed
            depth = int(ins[0].shape[-1])
            positions = int(np.prod(ins[0].shape[1:-1]))
            out = {p * depth + c: v for p in range(positions) for c, v in rin.items()}
        elif cls == "Concatenate":
            assert layer.axis in (-1, 3), layer.name
            out, offset = {}, 0
            for t, rin in zip(ins, removed, strict=True):
                out.update({offset + c: v for c, v in rin.items()})
                offset += int(t.shape[-1])
        elif cls in ("Add", "Multiply"):
            assert all(set(r) == set(removed[0]) for r in removed), \
                f"{layer.name}: its inputs lose different channels (a coupled group)"
            join = sum if cls == "Add" else np.prod
            out = {c: (None if any(r[c] is None for r in removed) else
                       float(join([r[c] for r in removed]))) for c in removed[0]}
        else:
            raise AssertionError(f"{layer.name}: no rule here for a {cls} layer")
        params.setdefault(layer.name, layer.count_params())
        gone[layer.name] = out
    return params


def run_model(keras: Any, model: Any, x: Any, training: bool = False,
              layer: str | None = None) -> np.ndarray:
    """The model's output (or `layer`'s output) on `x`, run as kprune runs models: on the
    channels_last twin where this CPU cannot run channels_first convolutions (TF 2.21 on some
    CPUs; KPRUNE_CHANNELS_LAST_TWIN=1 simulates one), values back in the model's own layout.
    tests/test_twin.py proves the twin equal to the model where both run."""
    from kprune_batch.twin import run_points

    (value,), _ = run_points(keras, model, x, [(layer, "output") if layer else ("", "model")],
                             training)
    return value


# --- models built once per session -----------------------------------------------------------

@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


def _seeded_weights(model: Any, seed: int) -> None:
    """Give every variable distinct, trained-looking values (BN statistics included)."""
    rng = np.random.default_rng(seed)
    for var in model.weights:
        shape = tuple(var.shape)
        if "moving_variance" in var.path:
            value = rng.uniform(0.5, 2.0, shape)
        else:
            value = rng.normal(0.0, 0.3, shape)
        var.assign(value.astype(var.dtype))


@pytest.fixture(scope="session")
def small_cnn(keras: Any, models_dir: Path) -> Path:
    """A functional CNN whose *first* conv is named conv2d_1 and second conv2d (names that
    collide with Keras's auto-generated ones), with BN, compiled and trained one step."""
    inputs = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv2d_1")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Activation("relu", name="act")(x)
    x = keras.layers.Conv2D(6, 3, activation="relu", name="conv2d")(x)
    x = keras.layers.Conv2D(4, 1, use_bias=False, name="head_conv")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = keras.layers.Dense(3, name="logits")(x)
    model = keras.Model(inputs, outputs, name="small")
    _seeded_weights(model, 1)
    model.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(0)
    model.fit(rng.normal(size=(4, 8, 8, 3)), rng.normal(size=(4, 3)), epochs=1, verbose=0)
    path = models_dir / "small.keras"
    model.save(path)
    return path


@pytest.fixture(scope="session")
def small_cnn_h5(keras: Any, small_cnn: Path, models_dir: Path) -> Path:
    model = keras.saving.load_model(str(small_cnn))
    path = models_dir / "small.h5"
    model.save(path)
    return path


def residual_model(keras: Any, folder: Path) -> None:
    """Conv2D + BN + a residual Add, a DepthwiseConv2D (multiplier 2), a Conv2DTranspose and a
    use_bias=False conv, saved as .keras and .h5."""
    L = keras.layers
    i = keras.Input((8, 8, 3))
    a = L.ReLU(name="r1")(L.BatchNormalization(name="bn1")(L.Conv2D(8, 3, padding="same",
                                                                   name="c1")(i)))
    b = L.BatchNormalization(name="bn2")(L.Conv2D(8, 3, padding="same", name="c2")(a))
    d = L.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="dw")(
        L.Add(name="add")([a, b]))
    t = L.Conv2DTranspose(6, 3, strides=2, padding="same", name="ct")(
        L.BatchNormalization(name="bn_dw")(d))
    n = L.BatchNormalization(name="bn_nb")(L.Conv2D(5, 1, use_bias=False, name="nb")(t))
    model = keras.Model(i, L.Dense(3, name="dense")(L.GlobalAveragePooling2D(name="gap")(n)))
    _seeded_weights(model, 3)
    model.save(folder / "rt.keras")
    model.save(folder / "rt.h5")
